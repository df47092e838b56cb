"""Flax (nnx) modules: the entropy-aware MoxE gate and one MoxE layer on the moxe kernels.

MoxEGate takes the hyper-parameters of the MoxE authors' code by their names
(num_experts, top_k_experts, gamma, difficulty_threshold, modulation_bias and the loss
coefficients z_loss_coef, load_balancing_loss_coef, d_loss_coef, group_loss_coef), so it can
stand in for their gate; MoxEGate.from_config(config) reads them from any object that has
those attributes (their MoxEConfig). modulation_bias is "standard", "proportional",
"masked", "none", or the authors' integer codes (0 standard, 1 masked, 2 proportional).

MoxELayer is the layer of examples/moxe_layer (docs/moxe_layer.md): an sLSTM block and an
mLSTM block as the sequence mixer, the gate, E/2 mLSTM and E/2 sLSTM residual expert
blocks (per token from a zero state, or stateful over each sequence's routed tokens),
the weighted combine, optional shared experts. Its weights have the names and layouts of
the C++ LayerWeights (linear weights [out, in]); load_weights / weights move them by name,
and on the CPU in float64 its output and gradients equal the C++ host layer's
(tests/test_layer.py).

The cells, the gate and the dispatch are moxe_jax custom calls; the dense parts are jnp.
Every expert runs over the whole permuted buffer and keeps its own rows: the shapes stay
static under jit and nothing waits for the routing on the host, at E times the expert
compute of a grouped GEMM over each expert's rows (fine at the sizes of a check; a grouped
GEMM with device-side group sizes is the step for speed).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops

_AUTHORS_MODULATION = {0: "standard", 1: "masked", 2: "proportional"}


def modulation_name(modulation_bias: Any) -> str:
    """The moxe modulation kind from a name or the MoxE authors' ModulationBias code."""
    if isinstance(modulation_bias, str):
        name = modulation_bias.lower()
    elif int(modulation_bias) in _AUTHORS_MODULATION:
        name = _AUTHORS_MODULATION[int(modulation_bias)]
    else:
        raise ValueError(f"moxe_jax: unknown modulation_bias {modulation_bias!r}")
    if name not in ops.MODULATIONS:
        raise ValueError(f"moxe_jax: modulation_bias must be one of {sorted(ops.MODULATIONS)}, got {name!r}")
    return name


# ---- small dense pieces (examples/moxe_layer/ops_reference.hpp) ---------------------------------


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + eps) * w
    return y + b if b is not None else y


def _group_norm(x, groups, w, eps):
    n, c = x.shape
    xg = x.reshape(n, groups, c // groups)
    mean = xg.mean(-1, keepdims=True)
    var = ((xg - mean) ** 2).mean(-1, keepdims=True)
    return ((xg - mean) / jnp.sqrt(var + eps)).reshape(n, c) * w


def _causal_conv(x, batch, w, b):
    """Depthwise causal conv along the sequence of rows x [B*S, C]: y[s] = b + sum_j
    w[:, j] x[s - (W-1) + j]."""
    c, width = w.shape
    xs = x.reshape(batch, -1, c)
    padded = jnp.pad(xs, ((0, 0), (width - 1, 0), (0, 0)))
    seq = xs.shape[1]
    y = sum(padded[:, j:j + seq] * w[:, j] for j in range(width)) + b
    return y.reshape(-1, c)


def _linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


class _Weights(nnx.Module):
    """A module whose parameters are named tensors (the C++ LayerWeights names)."""

    def _param(self, name: str, shape, mean: float, std: float, rngs: nnx.Rngs, dtype):
        value = mean + std * jax.random.normal(rngs.params(), shape, dtype)
        setattr(self, name, nnx.Param(value))

    def named(self) -> Dict[str, nnx.Param]:
        return {n: getattr(self, n) for n in self.NAMES}


def _init(module: _Weights, shapes: Dict[str, tuple], rngs: nnx.Rngs, dtype) -> None:
    """LayerWeights::random's distributions: norm weights and the skip N(1, 0.1), linear
    weights N(0, 1/fan_in), the mLSTM gate biases N(0.5, 1), the sLSTM cell biases N(0, 0.5),
    the conv and recurrent weights N(0, 1/width), every other bias N(0, 0.1)."""
    for name, shape in shapes.items():
        if name in ("norm_w", "out_norm_w", "ffn_norm_w", "skip"):
            mean, std = 1.0, 0.1
        elif name == "b_gates":
            mean, std = 0.5, 1.0
        elif name == "bias":
            mean, std = 0.0, 0.5
        elif name in ("conv_w", "r") or len(shape) == 2:
            mean, std = 0.0, 1.0 / math.sqrt(shape[-1])
        else:
            mean, std = 0.0, 0.1
        module._param(name, shape, mean, std, rngs, dtype)


# ---- the cells on token rows ---------------------------------------------------------------------


def _mlstm_rows(qkv, gates, heads, batch, chunk_size, segment_offsets=None):
    """h rows [n, NH*dh] of the mLSTM over rows [n] = [batch, seq] (q, k, v columns of qkv,
    gates [n, 2NH]: input gates then forget gates); with segment_offsets, batch 1 and one
    recurrence per segment."""
    n, width = qkv.shape
    dh = width // 3 // heads
    cells = qkv.reshape(batch, n // batch, 3, heads, dh).transpose(2, 0, 3, 1, 4)
    gi, gf = gates.reshape(batch, n // batch, 2, heads).transpose(2, 0, 3, 1)
    h = ops.mlstm_chunkwise(cells[0], cells[1], cells[2], gi, gf, chunk_size=chunk_size,
                            segment_offsets=segment_offsets)
    return h.transpose(0, 2, 1, 3).reshape(n, heads * dh)


def _slstm_rows(wx, r, bias, heads, batch):
    """y rows [n, NH*dh] of the sLSTM over rows [n] = [batch, seq] (wx rows [n, 4*NH*dh])."""
    n, width = wx.shape
    dh = width // 4 // heads
    cells = wx.reshape(batch, n // batch, 4, heads, dh).transpose(1, 0, 2, 3, 4)
    y = ops.slstm_sequence(cells, r, bias)
    return y.transpose(1, 0, 2, 3).reshape(n, heads * dh)


# ---- the blocks --------------------------------------------------------------------------------------


class SlstmBlock(_Weights):
    """LN, conv4 + SiLU -> i, f; z, o from the normed input; sLSTM; multi-head norm; residual;
    then a gated GELU FFN with its residual."""

    NAMES = ("norm_w", "norm_b", "conv_w", "conv_b", "w_if", "w_zo", "r", "bias", "out_norm_w", "ffn_norm_w",
             "ffn_norm_b", "ffn_up_w", "ffn_up_b", "ffn_down_w", "ffn_down_b")

    def __init__(self, d_model, heads, ffn_hidden, conv_width, *, rngs, dtype=jnp.float32):
        D, NH, DH, F = d_model, heads, d_model // heads, ffn_hidden
        _init(self, {"norm_w": (D,), "norm_b": (D,), "conv_w": (D, conv_width), "conv_b": (D,), "w_if": (2 * D, D),
                     "w_zo": (2 * D, D), "r": (NH, 4, DH, DH), "bias": (4, NH, DH), "out_norm_w": (D,),
                     "ffn_norm_w": (D,), "ffn_norm_b": (D,), "ffn_up_w": (2 * F, D), "ffn_up_b": (2 * F,),
                     "ffn_down_w": (D, F), "ffn_down_b": (D,)}, rngs, dtype)
        self.heads = heads

    def __call__(self, x, batch, eps):
        xn = _layer_norm(x, self.norm_w[...], self.norm_b[...], eps)
        conv = jax.nn.silu(_causal_conv(xn, batch, self.conv_w[...], self.conv_b[...]))
        wx = jnp.concatenate([_linear(conv, self.w_if[...]), _linear(xn, self.w_zo[...])], -1)
        h = _slstm_rows(wx, self.r[...], self.bias[...], self.heads, batch)
        x1 = x + _group_norm(h, self.heads, self.out_norm_w[...], eps)
        fn = _layer_norm(x1, self.ffn_norm_w[...], self.ffn_norm_b[...], eps)
        gate, up = jnp.split(_linear(fn, self.ffn_up_w[...], self.ffn_up_b[...]), 2, -1)
        return x1 + _linear(_gelu(gate) * up, self.ffn_down_w[...], self.ffn_down_b[...])


class MlstmBlock(_Weights):
    """LN, up-projection (branch, output gate), conv4 + SiLU, q, k, v, gates from [q; k; v],
    mLSTM, multi-head norm + skip, * SiLU(z), down-projection, residual."""

    NAMES = ("norm_w", "norm_b", "w_up", "b_up", "conv_w", "conv_b", "w_q", "w_k", "w_v", "w_gates", "b_gates",
             "out_norm_w", "skip", "w_down", "b_down")

    def __init__(self, d_model, heads, proj_factor, conv_width, *, rngs, dtype=jnp.float32, chunk_size=64):
        D, NH, Di = d_model, heads, proj_factor * d_model
        _init(self, {"norm_w": (D,), "norm_b": (D,), "w_up": (2 * Di, D), "b_up": (2 * Di,), "conv_w": (Di, conv_width),
                     "conv_b": (Di,), "w_q": (Di, Di), "w_k": (Di, Di), "w_v": (Di, Di), "w_gates": (2 * NH, 3 * Di),
                     "b_gates": (2 * NH,), "out_norm_w": (Di,), "skip": (Di,), "w_down": (D, Di), "b_down": (D,)},
              rngs, dtype)
        self.heads = heads
        self.chunk_size = chunk_size

    def __call__(self, x, batch, eps):
        xn = _layer_norm(x, self.norm_w[...], self.norm_b[...], eps)
        xm, z = jnp.split(_linear(xn, self.w_up[...], self.b_up[...]), 2, -1)
        xc = jax.nn.silu(_causal_conv(xm, batch, self.conv_w[...], self.conv_b[...]))
        qkv = jnp.concatenate([_linear(xc, self.w_q[...]), _linear(xc, self.w_k[...]), _linear(xm, self.w_v[...])], -1)
        gates = _linear(qkv, self.w_gates[...], self.b_gates[...])
        h = _mlstm_rows(qkv, gates, self.heads, batch, self.chunk_size)
        hs = _group_norm(h, self.heads, self.out_norm_w[...], eps) + self.skip[...] * xc
        return x + _linear(hs * jax.nn.silu(z), self.w_down[...], self.b_down[...])


class MlstmExpert(_Weights):
    """x + W_down MHNorm(mLSTM(W_qkv LN(x), W_g LN(x) + b_g)) on the rows of one expert."""

    NAMES = ("norm_w", "norm_b", "w_qkv", "w_gates", "b_gates", "out_norm_w", "w_down", "b_down")

    def __init__(self, d_model, heads, *, rngs, dtype=jnp.float32):
        D, NH = d_model, heads
        _init(self, {"norm_w": (D,), "norm_b": (D,), "w_qkv": (3 * D, D), "w_gates": (2 * NH, D), "b_gates": (2 * NH,),
                     "out_norm_w": (D,), "w_down": (D, D), "b_down": (D,)}, rngs, dtype)
        self.heads = heads

    def cell_input(self, x, eps):
        xn = _layer_norm(x, self.norm_w[...], self.norm_b[...], eps)
        return _linear(xn, self.w_qkv[...]), _linear(xn, self.w_gates[...], self.b_gates[...])

    def output(self, x, h, eps):
        return x + _linear(_group_norm(h, self.heads, self.out_norm_w[...], eps), self.w_down[...], self.b_down[...])


class SlstmExpert(_Weights):
    """x + W_down MHNorm(sLSTM(W_x LN(x))) on the rows of one expert."""

    NAMES = ("norm_w", "norm_b", "w_x", "r", "bias", "out_norm_w", "w_down", "b_down")

    def __init__(self, d_model, heads, *, rngs, dtype=jnp.float32):
        D, NH, DH = d_model, heads, d_model // heads
        _init(self, {"norm_w": (D,), "norm_b": (D,), "w_x": (4 * D, D), "r": (NH, 4, DH, DH), "bias": (4, NH, DH),
                     "out_norm_w": (D,), "w_down": (D, D), "b_down": (D,)}, rngs, dtype)
        self.heads = heads

    def cell_input(self, x, eps):
        return _linear(_layer_norm(x, self.norm_w[...], self.norm_b[...], eps), self.w_x[...])

    def output(self, x, h, eps):
        return x + _linear(_group_norm(h, self.heads, self.out_norm_w[...], eps), self.w_down[...], self.b_down[...])


# ---- the gate ------------------------------------------------------------------------------------------


class GateResult(NamedTuple):
    topk_weight: jax.Array  # [T, K] routing weights
    topk_idx: jax.Array     # [T, K] int32 experts
    losses: jax.Array       # [4]: L_z, L_lb, L_d, L_g
    aux_loss: jax.Array     # the coefficients times the losses, summed
    gate: ops.GateOutput    # everything the fused gate gives (probs, entropy, difficulty, counts, ...)


class MoxEGate(nnx.Module):
    """The entropy-aware gate: one linear u -> [T, E + 1] (E router logits, then the
    difficulty pre-activation), then the fused moxe gate (difficulty-conditioned logits,
    softmax, normalised entropy, top-k with renormalised weights, the four losses).

    Hyper-parameters by the MoxE authors' names; the defaults are theirs."""

    def __init__(self, embedding_dim: int, num_experts: int = 4, top_k_experts: int = 2, *, gamma: float = 0.3,
                 difficulty_threshold: float = 0.8, modulation_bias: Any = "standard", z_loss_coef: float = 0.001,
                 load_balancing_loss_coef: float = 0.01, d_loss_coef: float = 0.01, group_loss_coef: float = 0.01,
                 gate_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
        if num_experts < 2 or num_experts % 2:
            raise ValueError(f"moxe_jax: num_experts must be even and >= 2 (E/2 mLSTM, E/2 sLSTM), got {num_experts}")
        self.num_experts = num_experts
        self.top_k_experts = top_k_experts
        self.gamma = gamma
        self.difficulty_threshold = difficulty_threshold
        self.modulation = modulation_name(modulation_bias)
        self.loss_coefficients = (z_loss_coef, load_balancing_loss_coef, d_loss_coef, group_loss_coef)
        self.w_router = nnx.Param(jax.random.normal(rngs.params(), (num_experts + 1, embedding_dim), dtype)
                                  / math.sqrt(embedding_dim))
        self.b_router = nnx.Param(0.1 * jax.random.normal(rngs.params(), (num_experts + 1,), dtype)) if gate_bias \
            else None

    @classmethod
    def from_config(cls, config: Any, embedding_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> "MoxEGate":
        """From an object with the authors' attribute names (their MoxEConfig)."""
        names = ("num_experts", "top_k_experts", "gamma", "difficulty_threshold", "modulation_bias", "z_loss_coef",
                 "load_balancing_loss_coef", "d_loss_coef", "group_loss_coef", "gate_bias")
        return cls(embedding_dim, rngs=rngs, dtype=dtype,
                   **{n: getattr(config, n) for n in names if hasattr(config, n)})

    def __call__(self, u: jax.Array) -> GateResult:
        E = self.num_experts
        router = _linear(u, self.w_router[...], self.b_router[...] if self.b_router is not None else None)
        g = ops.moxe_gate(router[:, :E], router[:, E], top_k=self.top_k_experts, mlstm_experts=E // 2,
                          modulation=self.modulation, gamma=self.gamma, tau=self.difficulty_threshold)
        coef = jnp.asarray(self.loss_coefficients, g.losses.dtype)
        return GateResult(g.topk_weight, g.topk_idx, g.losses, (coef * g.losses).sum(), g)


# ---- the layer -----------------------------------------------------------------------------------------


class LayerOutput(NamedTuple):
    y: jax.Array          # [B, S, D]
    losses: jax.Array     # [4]: L_z, L_lb, L_d, L_g
    aux_loss: jax.Array   # sum of the coefficients times the losses
    topk_idx: jax.Array   # [B*S, K]


class MoxELayer(nnx.Module):
    """One MoxE layer (examples/moxe_layer, docs/moxe_layer.md) on the moxe kernels.

    x [B, S, D] -> LayerOutput(y [B, S, D], losses, aux_loss, topk_idx). expert_mode:
    "per_token" (the paper's code: each routed token a length-1 sequence from a zero state)
    or "stateful" (each expert's recurrence over a sequence's routed tokens, in order).
    """

    def __init__(self, d_model: int, heads: int, *, num_experts: int = 4, top_k_experts: int = 2,
                 gamma: float = 0.3, difficulty_threshold: float = 0.8, modulation_bias: Any = "standard",
                 z_loss_coef: float = 0.001, load_balancing_loss_coef: float = 0.01, d_loss_coef: float = 0.01,
                 group_loss_coef: float = 0.01, mlstm_proj_factor: int = 2, ffn_hidden: Optional[int] = None,
                 conv_width: int = 4, expert_mode: str = "per_token", shared_experts: int = 0,
                 shared_expert_kind: str = "mlstm", norm_eps: float = 1e-5, chunk_size: int = 64,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if d_model % heads:
            raise ValueError(f"moxe_jax: d_model ({d_model}) must be a multiple of heads ({heads})")
        if expert_mode not in ("per_token", "stateful") or shared_expert_kind not in ("mlstm", "slstm"):
            raise ValueError("moxe_jax: expert_mode is 'per_token' or 'stateful', shared_expert_kind 'mlstm' or 'slstm'")
        ffn_hidden = ffn_hidden or (4 * d_model) // 3
        self.d_model, self.heads, self.norm_eps = d_model, heads, norm_eps
        self.expert_mode, self.shared_expert_kind = expert_mode, shared_expert_kind
        self.chunk_size = chunk_size
        self.slstm_block = SlstmBlock(d_model, heads, ffn_hidden, conv_width, rngs=rngs, dtype=dtype)
        self.mlstm_block = MlstmBlock(d_model, heads, mlstm_proj_factor, conv_width, rngs=rngs, dtype=dtype,
                                      chunk_size=chunk_size)
        self.post_norm_w = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (d_model,), dtype))
        self.post_norm_b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d_model,), dtype))
        self.gate = MoxEGate(d_model, num_experts, top_k_experts, gamma=gamma, difficulty_threshold=difficulty_threshold,
                             modulation_bias=modulation_bias, z_loss_coef=z_loss_coef,
                             load_balancing_loss_coef=load_balancing_loss_coef, d_loss_coef=d_loss_coef,
                             group_loss_coef=group_loss_coef, rngs=rngs, dtype=dtype)
        E = num_experts
        self.mlstm_experts = nnx.List([MlstmExpert(d_model, heads, rngs=rngs, dtype=dtype) for _ in range(E // 2)])
        self.slstm_experts = nnx.List([SlstmExpert(d_model, heads, rngs=rngs, dtype=dtype) for _ in range(E - E // 2)])
        kind = MlstmExpert if shared_expert_kind == "mlstm" else SlstmExpert
        self.shared = nnx.List([kind(d_model, heads, rngs=rngs, dtype=dtype) for _ in range(shared_experts)])

    # -- weights by the C++ names ----------------------------------------------------------------

    def named_params(self) -> Dict[str, nnx.Param]:
        """Every parameter by its LayerWeights name ("slstm_block.norm_w", "w_router", ...)."""
        out: Dict[str, nnx.Param] = {}
        for prefix, module in [("slstm_block.", self.slstm_block), ("mlstm_block.", self.mlstm_block)]:
            out.update({prefix + n: p for n, p in module.named().items()})
        out["post_norm_w"], out["post_norm_b"] = self.post_norm_w, self.post_norm_b
        out["w_router"], out["b_router"] = self.gate.w_router, self.gate.b_router
        for e, m in enumerate(self.mlstm_experts):
            out.update({f"mlstm_expert{e}.{n}": p for n, p in m.named().items()})
        for e, m in enumerate(self.slstm_experts):
            out.update({f"slstm_expert{e}.{n}": p for n, p in m.named().items()})
        for s, m in enumerate(self.shared):
            out.update({f"shared_{self.shared_expert_kind}_expert{s}.{n}": p for n, p in m.named().items()})
        return out

    def load_weights(self, weights: Dict[str, Any]) -> None:
        """Sets every parameter from a {LayerWeights name: array} dict (shapes must match)."""
        params = self.named_params()
        missing = sorted(set(params) - set(weights))
        if missing:
            raise KeyError(f"moxe_jax: weights missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for name, p in params.items():
            value = jnp.asarray(weights[name], p[...].dtype).reshape(p[...].shape)
            p[...] = value

    def weights(self) -> Dict[str, jax.Array]:
        return {n: p[...] for n, p in self.named_params().items()}

    # -- forward ---------------------------------------------------------------------------------------

    def _experts_on_rows(self, xp, row_expert, grid):
        """Every expert's block over the rows of the permuted buffer xp [R, D], each keeping
        its own rows (row_expert [R]). grid: None (per token), or (seq, pos, batch, seq_len,
        segment_offsets) for the stateful mode."""
        NH, eps = self.heads, self.norm_eps
        R = xp.shape[0]
        Em = len(self.mlstm_experts)
        yp = jnp.zeros_like(xp)
        for e, m in enumerate(self.mlstm_experts):
            qkv, gates = m.cell_input(xp, eps)
            if grid is None:
                h = _mlstm_rows(qkv, gates, NH, R, self.chunk_size)
            else:  # one varlen call: every (expert, sequence) run is a segment
                h = _mlstm_rows(qkv, gates, NH, 1, self.chunk_size, segment_offsets=grid[4])
            yp = jnp.where((row_expert == e)[:, None], m.output(xp, h, eps), yp)
        for j, m in enumerate(self.slstm_experts):
            e = Em + j
            wx = m.cell_input(xp, eps)
            if grid is None:
                h = _slstm_rows(wx, m.r[...], m.bias[...], NH, R)
            else:  # a [seq_len, batch] grid of this expert's rows, padded at the end
                seq, pos, batch, seq_len = grid[:4]
                mine = row_expert == e
                target = jnp.where(mine, pos, seq_len)  # other rows: dropped
                cells = jnp.zeros((seq_len, batch, wx.shape[1]), wx.dtype).at[target, seq].set(wx, mode="drop")
                y = ops.slstm_sequence(cells.reshape(seq_len, batch, 4, NH, -1), m.r[...], m.bias[...])
                h = y.reshape(seq_len, batch, -1)[jnp.minimum(target, seq_len - 1), seq]
            yp = jnp.where((row_expert == e)[:, None], m.output(xp, h, eps), yp)
        return yp

    def _shared_expert(self, m, u, batch, seq_len):
        NH, eps = self.heads, self.norm_eps
        T = u.shape[0]
        rows_batch = T if self.expert_mode == "per_token" else batch
        if isinstance(m, MlstmExpert):
            qkv, gates = m.cell_input(u, eps)
            h = _mlstm_rows(qkv, gates, NH, rows_batch, self.chunk_size)
        else:
            h = _slstm_rows(m.cell_input(u, eps), m.r[...], m.bias[...], NH, rows_batch)
        return m.output(u, h, eps) - u

    def __call__(self, x: jax.Array) -> LayerOutput:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"moxe_jax: x must be [B, S, {self.d_model}], got shape {tuple(x.shape)}")
        B, S, D = x.shape
        T, eps = B * S, self.norm_eps
        E, K = self.gate.num_experts, self.gate.top_k_experts
        rows = x.reshape(T, D)
        # 1. the sequence mixer: the sLSTM block, the mLSTM block; u = LN(x3)
        x2 = self.slstm_block(rows, B, eps)
        x3 = self.mlstm_block(x2, B, eps)
        u = _layer_norm(x3, self.post_norm_w[...], self.post_norm_b[...], eps)
        # 2. the gate
        g = self.gate(u)
        # 3. dispatch, the experts on their rows, the weighted combine
        rmap = ops.routing_map(g.topk_idx, E)
        xp = ops.permute(u, rmap.row_map, E)
        R = xp.shape[0]
        r = jnp.arange(R, dtype=rmap.expert_offsets.dtype)
        row_expert = jnp.searchsorted(rmap.expert_offsets[1:], r, side="right")
        grid = None
        if self.expert_mode == "stateful":
            # the token behind each row, its sequence, and its position in its (expert, sequence) run
            token = jnp.zeros((R,), r.dtype).at[rmap.row_map.reshape(-1)].set(jnp.arange(T * K, dtype=r.dtype) // K)
            seq = token // S
            counts = jnp.zeros((E, B), r.dtype).at[row_expert, seq].add(1)
            starts = rmap.expert_offsets[:-1, None] + jnp.cumsum(counts, 1) - counts  # [E, B] run starts
            pos = r - starts[row_expert, seq]
            offsets = jnp.concatenate([starts.reshape(-1), jnp.asarray([R], r.dtype)])
            grid = (seq, pos, B, S, offsets)
        yp = self._experts_on_rows(xp, row_expert, grid)
        y = x3 + ops.unpermute(yp, rmap.row_map, g.topk_weight, E)
        # 4. shared experts on every token: y += f_s(u) - u
        for m in self.shared:
            y = y + self._shared_expert(m, u, B, S)
        return LayerOutput(y.reshape(B, S, D), g.losses, g.aux_loss, g.topk_idx)
