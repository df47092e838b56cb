"""The moxe primitives as JAX functions: XLA FFI custom calls with exact custom VJPs.

Every function works under jax.jit (no Python callbacks: each op is one custom call, on the
CPU the moxe host references, on CUDA the device launchers on XLA's stream) and under
jax.grad / jax.vjp (reverse mode: the library's backward passes). jax.vmap folds a mapped
axis into the op's own batch axis where it has one (the mLSTM's B without segments, the
sLSTM's B when r and bias are not mapped); otherwise it runs the op once per mapped entry.

Dtypes: the element type is float32 or float64 on the CPU, float32, bfloat16 or float16 on
CUDA. States, router statistics and routing weights are float64 for float64 inputs and
float32 otherwise. Index arrays (row_map, expert_offsets, segment offsets) are int64 when
jax_enable_x64 is on and int32 otherwise (the handlers widen them for the library).

The math of each op is in docs/ of the repository (mlstm.md, slstm.md, router.md,
dispatch.md); the names here are the library's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from . import _ffi

_ffi.register()

Array = jax.Array

MODULATIONS = {"none": 0, "standard": 1, "proportional": 2, "masked": 3}
_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)

__all__ = [
    "MODULATIONS",
    "GateOutput",
    "RoutingMap",
    "mlstm_chunkwise",
    "slstm_sequence",
    "moxe_gate",
    "routing_map",
    "permute",
    "unpermute",
    "permuted_rows",
    "acc_dtype",
    "index_dtype",
]


# ---- helpers ---------------------------------------------------------------------------------


def acc_dtype(dtype) -> np.dtype:
    """The state / statistics dtype that goes with an element dtype: float64 for float64,
    float32 otherwise (the library's Acc)."""
    return np.dtype(jnp.float64) if np.dtype(dtype) == np.dtype(jnp.float64) else np.dtype(jnp.float32)


def index_dtype() -> np.dtype:
    """int64 with jax_enable_x64, int32 without (JAX has no int64 arrays then)."""
    return np.dtype(jnp.int64) if jax.config.jax_enable_x64 else np.dtype(jnp.int32)


def _none(dtype=jnp.float32) -> Array:
    """The placeholder of an absent optional buffer: shape (0,)."""
    return jnp.zeros((0,), dtype)


def _empty(dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """An optional result that is not asked for: shape (0,)."""
    return jax.ShapeDtypeStruct((0,), dtype)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def _check_float(name: str, x) -> None:
    if not any(np.dtype(x.dtype) == np.dtype(f) for f in _FLOATS):
        raise TypeError(f"moxe_jax: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check(name: str, x, shape: Sequence[int], dtype=None) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"moxe_jax: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and np.dtype(x.dtype) != np.dtype(dtype):
        raise TypeError(f"moxe_jax: {name} must be {np.dtype(dtype).name}, got {np.dtype(x.dtype).name}")


def _check_indices(name: str, x, shape: Optional[Sequence[int]] = None) -> None:
    if np.dtype(x.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"moxe_jax: {name} must be int32 or int64, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"moxe_jax: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _call(op: str, results, *args, vmap_method: Optional[str] = None, **attrs):
    attrs = {k: (np.float64(v) if isinstance(v, float) else np.int64(v)) for k, v in attrs.items()}
    return jax.ffi.ffi_call(_ffi.target(op), results, vmap_method=vmap_method)(*args, **attrs)


def _fold(x: Array, axis: int) -> Array:
    """[V, ..., B(axis+1), ...] -> [..., V*B, ...] (the mapped axis V in front)."""
    x = jnp.moveaxis(x, 0, axis)
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def _unfold(x: Array, axis: int, size: int) -> Array:
    """The inverse of _fold: [..., V*B, ...] -> [V, ..., B, ...]."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (size, shape[axis] // size) + shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _batch_folding(call, batch_axes, out_batch_axes, weight_args=()):
    """A custom_vmap around `call(*arrays)` whose rule folds the mapped axis into each
    array's batch axis (batch_axes[i]: the axis of argument i, None for placeholders),
    calls once and unfolds the results (out_batch_axes). Arguments in weight_args have no
    batch axis: when one of them is mapped the rule runs the op once per mapped entry."""

    f = custom_batching.custom_vmap(call)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        if any(in_batched[i] for i in weight_args) or any(
                b and batch_axes[i] is None and args[i].size > 0 for i, b in enumerate(in_batched)):
            return custom_batching.sequential_vmap(call).vmap_rule(axis_size, in_batched, *args)
        folded = []
        for i, (x, batched) in enumerate(zip(args, in_batched)):
            if i in weight_args or batch_axes[i] is None or x.size == 0 and x.ndim == 1:
                folded.append(x)
                continue
            if not batched:
                x = jnp.broadcast_to(x, (axis_size,) + x.shape)
            folded.append(_fold(x, batch_axes[i]))
        outs = call(*folded)
        outs = [o if a is None or o.size == 0 and o.ndim == 1 else _unfold(o, a, axis_size)
                for o, a in zip(outs, out_batch_axes)]
        return outs, [not (a is None or o.size == 0 and o.ndim == 1) for o, a in zip(outs, out_batch_axes)]

    return f


def _sequential(call):
    """A custom_vmap that runs the op once per mapped entry (lax.map)."""
    return custom_batching.sequential_vmap(call)


# ---- mLSTM -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mlstm_calls(qk_scale: float, eps: float, chunk_size: int, want_last: bool, has_segments: bool,
                 init_grads: bool):
    """The forward and backward custom calls of one configuration, with their vmap rules."""

    def forward(q, k, v, igate, fgate, c0, n0, m0, seg):
        B, NH, S, DQK = q.shape
        DV = v.shape[-1]
        slots = seg.shape[0] - 1 if has_segments else B
        acc = acc_dtype(q.dtype)
        results = [_sds((B, NH, S, DV), q.dtype)]
        if want_last:
            results += [_sds((slots, NH, DQK, DV), acc), _sds((slots, NH, DQK), acc), _sds((slots, NH), acc)]
        else:
            results += [_empty(acc)] * 3
        return _call("mlstm_forward", results, q, k, v, igate, fgate, c0, n0, m0, seg, qk_scale=qk_scale, eps=eps,
                     chunk_size=chunk_size)

    def backward(q, k, v, igate, fgate, c0, n0, m0, seg, dh, dc, dn, dm):
        B, NH, S, DQK = q.shape
        DV = v.shape[-1]
        slots = seg.shape[0] - 1 if has_segments else B
        acc = acc_dtype(q.dtype)
        results = [_sds(q.shape, q.dtype), _sds(k.shape, q.dtype), _sds(v.shape, q.dtype),
                   _sds(igate.shape, q.dtype), _sds(fgate.shape, q.dtype)]
        if init_grads:
            results += [_sds((slots, NH, DQK, DV), acc), _sds((slots, NH, DQK), acc), _sds((slots, NH), acc)]
        else:
            results += [_empty(acc)] * 3
        return _call("mlstm_backward", results, q, k, v, igate, fgate, c0, n0, m0, seg, dh, dc, dn, dm,
                     qk_scale=qk_scale, eps=eps, chunk_size=chunk_size)

    if has_segments:  # the segments pack one batch entry: a mapped axis cannot fold into it
        return _sequential(forward), _sequential(backward)
    batch = (0,) * 8 + (None,)
    return (_batch_folding(forward, batch, (0, 0, 0, 0)),
            _batch_folding(backward, batch + (0, 0, 0, 0), (0,) * 8))


@functools.lru_cache(maxsize=None)
def _mlstm_vjp(qk_scale: float, eps: float, chunk_size: int, want_last: bool, has_init: bool,
               has_segments: bool):
    fwd_call, _ = _mlstm_calls(qk_scale, eps, chunk_size, want_last, has_segments, has_init)
    _, bwd_call = _mlstm_calls(qk_scale, eps, chunk_size, True, has_segments, has_init)

    @jax.custom_vjp
    def f(q, k, v, igate, fgate, c0, n0, m0, seg):
        outs = fwd_call(q, k, v, igate, fgate, c0, n0, m0, seg)
        return tuple(outs) if want_last else outs[0]

    def f_fwd(q, k, v, igate, fgate, c0, n0, m0, seg):
        return f(q, k, v, igate, fgate, c0, n0, m0, seg), (q, k, v, igate, fgate, c0, n0, m0, seg)

    def f_bwd(res, ct):
        q, k, v, igate, fgate, c0, n0, m0, seg = res
        acc = acc_dtype(q.dtype)
        if want_last:
            dh, dc, dn, dm = ct
            dc, dn, dm = (x.astype(acc) for x in (dc, dn, dm))
        else:
            dh, dc, dn, dm = ct, _none(acc), _none(acc), _none(acc)
        grads = bwd_call(q, k, v, igate, fgate, c0, n0, m0, seg, dh.astype(q.dtype), dc, dn, dm)
        dq, dk, dv, di, df, dc0, dn0, dm0 = grads
        if not has_init:
            dc0 = dn0 = dm0 = jnp.zeros((0,), acc)  # the placeholders' (empty) cotangents
        return dq, dk, dv, di, df, dc0, dn0, dm0, None

    f.defvjp(f_fwd, f_bwd)
    return f


def mlstm_chunkwise(q: Array, k: Array, v: Array, igate: Array, fgate: Array,
                    initial_states: Optional[Tuple[Array, Array, Array]] = None, *, qk_scale: float = 0.0,
                    eps: float = 1e-6, chunk_size: int = 64, segment_offsets: Optional[Array] = None,
                    return_last_states: bool = False):
    """The mLSTM over a sequence (docs/mlstm.md): moxe::mlstm chunkwise forward and its exact
    backward (through the normaliser, eps and the stabiliser, and into the initial states).

    q, k [B, NH, S, DQK]; v [B, NH, S, DV]; igate, fgate [B, NH, S] (pre-activations), one
    float dtype. initial_states: (C [N, NH, DQK, DV], n [N, NH, DQK], m [N, NH]) in the state
    dtype (acc_dtype), N = B, or the number of segments when segment_offsets (int [N + 1],
    B = 1, 0 = o[0] <= ... <= o[N] = S) packs several sequences along S. qk_scale 0 means
    1/sqrt(DQK). chunk_size is the device's tile (16..128, a multiple of 16); the CPU's
    reference is recurrent and ignores it.
    Returns h [B, NH, S, DV], and (C, n, m) after the last step when return_last_states.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("igate", igate), ("fgate", fgate)):
        _check_float(name, x)
    if q.ndim != 4:
        raise ValueError(f"moxe_jax: q must be [B, NH, S, DQK], got shape {tuple(q.shape)}")
    if v.ndim != 4:
        raise ValueError(f"moxe_jax: v must be [B, NH, S, DV], got shape {tuple(v.shape)}")
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    _check("k", k, (B, NH, S, DQK), q.dtype)
    _check("v", v, (B, NH, S, DV), q.dtype)
    _check("igate", igate, (B, NH, S), q.dtype)
    _check("fgate", fgate, (B, NH, S), q.dtype)
    acc = acc_dtype(q.dtype)
    slots = B
    if segment_offsets is not None:
        segment_offsets = jnp.asarray(segment_offsets)
        if segment_offsets.ndim != 1 or segment_offsets.shape[0] < 2:
            raise ValueError(f"moxe_jax: segment_offsets must be [num_segments + 1], got shape "
                             f"{tuple(segment_offsets.shape)}")
        _check_indices("segment_offsets", segment_offsets)
        if B != 1:
            raise ValueError(f"moxe_jax: segment_offsets needs batch 1, got {B}")
        slots = segment_offsets.shape[0] - 1
    if initial_states is not None:
        c0, n0, m0 = initial_states
        _check("c_init", c0, (slots, NH, DQK, DV), acc)
        _check("n_init", n0, (slots, NH, DQK), acc)
        _check("m_init", m0, (slots, NH), acc)
    else:
        c0 = n0 = m0 = _none(acc)
    if chunk_size < 1:
        raise ValueError(f"moxe_jax: chunk_size must be positive, got {chunk_size}")
    seg = segment_offsets if segment_offsets is not None else _none(index_dtype())
    f = _mlstm_vjp(float(qk_scale), float(eps), int(chunk_size), bool(return_last_states),
                   initial_states is not None, segment_offsets is not None)
    out = f(q, k, v, igate, fgate, c0, n0, m0, seg)
    if return_last_states:
        h, c, n, m = out
        return h, (c, n, m)
    return out


# ---- sLSTM -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _slstm_calls(units_per_block: int, want_last: bool, init_grads: bool):
    def forward(wx, r, bias, y0, c0, n0, m0):
        S, B, _, NH, DH = wx.shape
        acc = acc_dtype(wx.dtype)
        state = _sds((B, NH, DH), acc)
        results = [_sds((S, B, NH, DH), wx.dtype)] + ([state] * 4 if want_last else [_empty(acc)] * 4)
        return _call("slstm_forward", results, wx, r, bias, y0, c0, n0, m0, units_per_block=units_per_block)

    def backward(wx, r, bias, y0, c0, n0, m0, dy, dy_last, dc_last, dn_last, dm_last):
        S, B, _, NH, DH = wx.shape
        acc = acc_dtype(wx.dtype)
        state = _sds((B, NH, DH), acc)
        results = [_sds(wx.shape, wx.dtype), _sds(r.shape, wx.dtype), _sds(bias.shape, wx.dtype)]
        results += [state] * 4 if init_grads else [_empty(acc)] * 4
        return _call("slstm_backward", results, wx, r, bias, y0, c0, n0, m0, dy, dy_last, dc_last, dn_last,
                     dm_last, units_per_block=units_per_block)

    # the forward folds a mapped axis into B (axis 1 of wx and y, 0 of the states) when r and
    # bias are not mapped; the backward cannot (dr and dbias sum over B, a mapped axis needs
    # one per entry) and runs once per mapped entry
    return (_batch_folding(forward, (1, None, None, 0, 0, 0, 0), (1, 0, 0, 0, 0), weight_args=(1, 2)),
            _sequential(backward))


@functools.lru_cache(maxsize=None)
def _slstm_vjp(units_per_block: int, want_last: bool, has_init: bool):
    fwd_call, _ = _slstm_calls(units_per_block, want_last, has_init)
    _, bwd_call = _slstm_calls(units_per_block, True, has_init)

    @jax.custom_vjp
    def f(wx, r, bias, y0, c0, n0, m0):
        outs = fwd_call(wx, r, bias, y0, c0, n0, m0)
        return tuple(outs) if want_last else outs[0]

    def f_fwd(wx, r, bias, y0, c0, n0, m0):
        return f(wx, r, bias, y0, c0, n0, m0), (wx, r, bias, y0, c0, n0, m0)

    def f_bwd(res, ct):
        wx, r, bias, y0, c0, n0, m0 = res
        acc = acc_dtype(wx.dtype)
        if want_last:
            dy, *dlast = ct
            dlast = [x.astype(acc) for x in dlast]
        else:
            dy, dlast = ct, [_none(acc)] * 4
        grads = bwd_call(wx, r, bias, y0, c0, n0, m0, dy.astype(wx.dtype), *dlast)
        dwx, dr, dbias, *dinit = grads
        if not has_init:
            dinit = [jnp.zeros((0,), acc)] * 4
        return (dwx, dr, dbias, *dinit)

    f.defvjp(f_fwd, f_bwd)
    return f


def slstm_sequence(wx: Array, r: Array, bias: Array,
                   initial_states: Optional[Tuple[Array, Array, Array, Array]] = None, *,
                   return_last_states: bool = False, units_per_block: int = 0):
    """The sLSTM over a sequence (docs/slstm.md), NX-AI xlstm layout: moxe::slstm sequence
    forward and its exact backward through time (into r, bias and the initial states,
    including the stabiliser m).

    wx [S, B, 4, NH, DH] (input projections, gate order i, f, z, o); r [NH, 4, DH, DH]
    (r[h][g][j][d] maps y[h][d] to gate g, unit j); bias [4, NH, DH]; initial_states
    (y, c, n, m), each [B, NH, DH] in the state dtype (zeros if None). units_per_block is a
    device tuning knob (0: automatic).
    Returns y [S, B, NH, DH], and (y, c, n, m) after the last step when return_last_states.
    """
    for name, x in (("wx", wx), ("r", r), ("bias", bias)):
        _check_float(name, x)
    if wx.ndim != 5 or wx.shape[2] != 4:
        raise ValueError(f"moxe_jax: wx must be [S, B, 4, NH, DH] (gates i, f, z, o), got shape {tuple(wx.shape)}")
    S, B, _, NH, DH = wx.shape
    _check("r", r, (NH, 4, DH, DH), wx.dtype)
    _check("bias", bias, (4, NH, DH), wx.dtype)
    acc = acc_dtype(wx.dtype)
    if initial_states is not None:
        if len(initial_states) != 4:
            raise ValueError("moxe_jax: initial_states must be (y, c, n, m)")
        for name, x in zip(("y_init", "c_init", "n_init", "m_init"), initial_states):
            _check(name, x, (B, NH, DH), acc)
        states = tuple(initial_states)
    else:
        states = (_none(acc),) * 4
    f = _slstm_vjp(int(units_per_block), bool(return_last_states), initial_states is not None)
    out = f(wx, r, bias, *states)
    if return_last_states:
        y, *last = out
        return y, tuple(last)
    return out


# ---- the entropy-aware gate --------------------------------------------------------------------


class GateOutput(NamedTuple):
    topk_weight: Array    # [T, K] renormalised routing weights (differentiable)
    losses: Array         # [4]: L_z, L_lb, L_d, L_g (differentiable)
    topk_idx: Array       # [T, K] int32, descending probability, ties to the lower index
    probs: Array          # [T, E] softmax of the modulated logits (no gradient)
    lse: Array            # [T] (no gradient)
    entropy: Array        # [T] normalised entropy of softmax(logits) (no gradient)
    difficulty: Array     # [T] sigmoid(difficulty_logit), zeros without it (no gradient)
    topk_prob: Array      # [T, K] probabilities before renormalisation (no gradient)
    expert_counts: Array  # [E] int32, routed (t, k) slots per expert


@functools.lru_cache(maxsize=None)
def _gate_vjp(mlstm_experts: int, top_k: int, modulation: int, gamma: float, tau: float, has_head: bool):
    def forward(logits, difficulty_logit):
        T, E = logits.shape
        acc = acc_dtype(logits.dtype)
        results = [_sds((T, E), acc), _sds((T,), acc), _sds((T,), acc), _sds((T,), acc),
                   _sds((T, top_k), jnp.int32), _sds((T, top_k), acc), _sds((T, top_k), acc),
                   _sds((E,), jnp.int32), _sds((4,), acc), _sds((E + 4,), acc)]
        return _call("gate_forward", results, logits, difficulty_logit, vmap_method="sequential",
                     mlstm_experts=mlstm_experts, top_k=top_k, modulation=modulation, gamma=gamma, tau=tau)

    def backward(logits, difficulty_logit, topk_idx, topk_prob, dweight, dlosses, totals):
        T, E = logits.shape
        results = [_sds((T, E), logits.dtype), _sds((T,), logits.dtype) if has_head else _empty(logits.dtype)]
        return _call("gate_backward", results, logits, difficulty_logit, topk_idx, topk_prob, dweight, dlosses,
                     totals, vmap_method="sequential", mlstm_experts=mlstm_experts, modulation=modulation, gamma=gamma,
                     tau=tau)

    def outputs(logits, difficulty_logit):
        probs, lse, entropy, difficulty, idx, prob, weight, counts, losses, totals = forward(logits, difficulty_logit)
        return (weight, losses, idx, probs, lse, entropy, difficulty, prob, counts), totals

    @jax.custom_vjp
    def f(logits, difficulty_logit):
        return outputs(logits, difficulty_logit)[0]

    def f_fwd(logits, difficulty_logit):
        out, totals = outputs(logits, difficulty_logit)
        return out, (logits, difficulty_logit, out[2], out[7], totals)

    def f_bwd(res, ct):
        logits, difficulty_logit, idx, prob, totals = res
        acc = acc_dtype(logits.dtype)
        dweight, dlosses = ct[0].astype(acc), ct[1].astype(acc)
        # the forward's batch sums (load per expert, loss sums, group masses): the backward
        # does not read the logits and the top-k a second time
        dlogits, ddifficulty = backward(logits, difficulty_logit, idx, prob, dweight, dlosses, totals)
        return dlogits, ddifficulty if has_head else jnp.zeros((0,), logits.dtype)

    f.defvjp(f_fwd, f_bwd)
    return f


def moxe_gate(logits: Array, difficulty_logit: Optional[Array] = None, *, top_k: int,
              mlstm_experts: Optional[int] = None, modulation: str = "standard", gamma: float = 1.0,
              tau: float = 0.5) -> GateOutput:
    """The fused entropy-aware MoxE gate (docs/router.md): moxe::router gate forward and its
    exact backward into the logits and the difficulty logit.

    logits [T, E] (the unbiased router logits), difficulty_logit [T] or None (no difficulty
    head: d = 0, no modulation, L_d = 0). Experts [0, mlstm_experts) are the mLSTM group
    (default E // 2). modulation: "none", "standard" (gamma d), "proportional"
    (gamma relu(d - tau)) or "masked" (gamma d [d > tau]).
    Gradients reach the inputs through topk_weight and the four losses (L_z, L_lb, L_d,
    L_g); the other outputs are diagnostics without gradient.
    """
    _check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"moxe_jax: logits must be [T, E], got shape {tuple(logits.shape)}")
    T, E = logits.shape
    if difficulty_logit is not None:
        _check("difficulty_logit", difficulty_logit, (T,), logits.dtype)
    if modulation not in MODULATIONS:
        raise ValueError(f"moxe_jax: modulation must be one of {sorted(MODULATIONS)}, got {modulation!r}")
    em = E // 2 if mlstm_experts is None else int(mlstm_experts)
    if not 0 <= em <= E:
        raise ValueError(f"moxe_jax: mlstm_experts must be in [0, {E}], got {em}")
    if not 1 <= int(top_k) <= E:
        raise ValueError(f"moxe_jax: top_k must be in [1, {E}], got {top_k}")
    f = _gate_vjp(em, int(top_k), MODULATIONS[modulation], float(gamma), float(tau), difficulty_logit is not None)
    out = f(logits, difficulty_logit if difficulty_logit is not None else _none(logits.dtype))
    sg = jax.lax.stop_gradient
    weight, losses, idx, probs, lse, entropy, difficulty, prob, counts = out
    return GateOutput(weight, losses, idx, sg(probs), sg(lse), sg(entropy), sg(difficulty), sg(prob), counts)


# ---- dispatch ----------------------------------------------------------------------------------


class RoutingMap(NamedTuple):
    row_map: Array         # [T, K]: row of the permuted buffer, or -1 (not routed, dropped)
    expert_offsets: Array  # [E + 1]: padded segment starts; [E] = rows used
    expert_counts: Array   # [E] int32: rows kept per expert


def permuted_rows(tokens: int, top_k: int, num_experts: int, align: int = 1) -> int:
    """Rows of the permuted buffers: T*K + E*(align-1), the worst case over all routings."""
    return tokens * top_k + num_experts * (align - 1)


def routing_map(topk_idx: Array, num_experts: int, *, capacity: int = -1, align: int = 1) -> RoutingMap:
    """Expert-major, token-stable row map (docs/dispatch.md), from topk_idx [T, K] (experts in
    [0, E), or -1 for "not routed"). capacity -1: no limit (otherwise the later tokens past
    it are dropped: row -1); align pads every expert's segment to a multiple of align rows."""
    if topk_idx.ndim != 2:
        raise ValueError(f"moxe_jax: topk_idx must be [T, K], got shape {tuple(topk_idx.shape)}")
    _check_indices("topk_idx", topk_idx)
    if num_experts < 1 or align < 1 or capacity < -1:
        raise ValueError(f"moxe_jax: need num_experts >= 1, align >= 1, capacity >= -1; got {num_experts}, "
                         f"{align}, {capacity}")
    T, K = topk_idx.shape
    idx = index_dtype()
    results = [_sds((T, K), idx), _sds((num_experts + 1,), idx), _sds((num_experts,), jnp.int32)]
    # integer in, integer out: no gradient (stop_gradient keeps autodiff from asking for one)
    out = _call("routing_map", results, jax.lax.stop_gradient(topk_idx).astype(jnp.int32), vmap_method="sequential",
                experts=int(num_experts), capacity=int(capacity), align=int(align))
    return RoutingMap(*out)


def _dispatch_checks(name: str, rows_or_x, row_map, num_experts: int, align: int, permuted: bool) -> None:
    _check_float(name, rows_or_x)
    if rows_or_x.ndim != 2:
        raise ValueError(f"moxe_jax: {name} must be 2-D, got shape {tuple(rows_or_x.shape)}")
    if row_map.ndim != 2:
        raise ValueError(f"moxe_jax: row_map must be [T, K], got shape {tuple(row_map.shape)}")
    _check_indices("row_map", row_map)
    if num_experts < 1 or align < 1:
        raise ValueError(f"moxe_jax: need num_experts >= 1 and align >= 1, got {num_experts}, {align}")
    T, K = row_map.shape
    rows = permuted_rows(T, K, num_experts, align) if permuted else T
    if rows_or_x.shape[0] != rows:
        raise ValueError(f"moxe_jax: {name} must have {rows} rows, got {rows_or_x.shape[0]}")


@functools.lru_cache(maxsize=None)
def _permute_vjp(num_experts: int, align: int):
    def forward(x, row_map):
        T, K = row_map.shape
        return _call("permute", [_sds((permuted_rows(T, K, num_experts, align), x.shape[1]), x.dtype)], x, row_map,
                     vmap_method="sequential", experts=num_experts, align=align)[0]

    def backward(dxp, row_map):
        return _call("permute_backward", [_sds((row_map.shape[0], dxp.shape[1]), dxp.dtype)], dxp, row_map,
                     vmap_method="sequential", experts=num_experts, align=align)[0]

    @jax.custom_vjp
    def f(x, row_map):
        return forward(x, row_map)

    f.defvjp(lambda x, row_map: (forward(x, row_map), row_map),
             lambda row_map, dxp: (backward(dxp.astype(dxp.dtype), row_map), None))
    return f


def permute(x: Array, row_map: Array, num_experts: int, *, align: int = 1) -> Array:
    """xp[row_map[t, k]] = x[t]: the rows of x [T, H] in expert-major order, xp
    [T*K + E*(align-1), H]; every row no (t, k) maps to is zero. Backward: dx[t] =
    sum_k dxp[row_map[t, k]]."""
    _dispatch_checks("x", x, row_map, num_experts, align, permuted=False)
    return _permute_vjp(int(num_experts), int(align))(x, row_map)


@functools.lru_cache(maxsize=None)
def _unpermute_vjp(num_experts: int, align: int):
    def forward(yp, row_map, weight):
        return _call("unpermute", [_sds((row_map.shape[0], yp.shape[1]), yp.dtype)], yp, row_map, weight,
                     vmap_method="sequential", experts=num_experts, align=align)[0]

    def backward(yp, row_map, weight, dy):
        return _call("unpermute_backward", [_sds(yp.shape, yp.dtype), _sds(weight.shape, weight.dtype)], yp,
                     row_map, weight, dy, vmap_method="sequential", experts=num_experts, align=align)

    @jax.custom_vjp
    def f(yp, row_map, weight):
        return forward(yp, row_map, weight)

    def f_bwd(res, dy):
        yp, row_map, weight = res
        dyp, dweight = backward(yp, row_map, weight, dy.astype(yp.dtype))
        return dyp, None, dweight

    f.defvjp(lambda yp, row_map, weight: (forward(yp, row_map, weight), (yp, row_map, weight)), f_bwd)
    return f


def unpermute(yp: Array, row_map: Array, weight: Array, num_experts: int, *, align: int = 1) -> Array:
    """The weighted combine y[t] = sum_k weight[t, k] yp[row_map[t, k]] (accumulated in the
    state dtype): y [T, H] from the expert-major rows yp [T*K + E*(align-1), H] and the
    routing weights weight [T, K] (cast to the state dtype). Backward: dyp (zero on unused
    rows) and dweight[t, k] = <dy[t], yp[row_map[t, k]]>."""
    _dispatch_checks("yp", yp, row_map, num_experts, align, permuted=True)
    T, K = row_map.shape
    if tuple(weight.shape) != (T, K):
        raise ValueError(f"moxe_jax: weight must have shape {(T, K)}, got {tuple(weight.shape)}")
    return _unpermute_vjp(int(num_experts), int(align))(yp, row_map, weight.astype(acc_dtype(yp.dtype)))
