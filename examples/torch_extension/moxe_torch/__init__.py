"""moxe_torch: PyTorch autograd functions over the moxe CUDA kernels.

A thin layer: each ``torch.autograd.Function`` calls the extension's forward and backward
(``moxe_torch._C``), which check shapes, take the current CUDA stream, allocate the
workspace from PyTorch's caching allocator and call the moxe launcher. The math is
documented in the repository's docs/ (mlstm.md, slstm.md, router.md, dispatch.md).

Element types: float32, float16, bfloat16 (no float64: the device kernels do not take it).
States, router outputs and routing weights are float32.

    h = mlstm_chunkwise(q, k, v, igate, fgate)
    y = slstm_sequence(wx, r, bias)
    gate = moxe_gate(logits, difficulty_logit, top_k=2)
    rmap = routing_map(gate.topk_idx, num_experts)
    xp = permute(x, rmap.row_map, num_experts)
    y = unpermute(expert_out, rmap.row_map, gate.topk_weight, num_experts)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

try:
    from . import _C
except ImportError as error:  # pragma: no cover - depends on the build
    raise ImportError(
        "moxe_torch._C is not built: run `python setup.py build_ext --inplace` in "
        "examples/torch_extension, or `pip install --no-build-isolation ./examples/torch_extension`"
    ) from error

__all__ = [
    "MLSTMChunkwise",
    "SLSTMSequence",
    "MoxEGate",
    "Permute",
    "Unpermute",
    "GateOutput",
    "RoutingMap",
    "mlstm_chunkwise",
    "slstm_sequence",
    "moxe_gate",
    "routing_map",
    "permute",
    "unpermute",
    "MODULATIONS",
]

Tensor = torch.Tensor

MODULATIONS = {"none": 0, "standard": 1, "proportional": 2, "masked": 3}


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _zeros_for_missing(grads, shapes, like: Tensor):
    """All-or-none upstream gradients: None if every one is None, else zeros for the missing."""
    if all(g is None for g in grads):
        return [None] * len(grads)
    return [
        torch.zeros(s, dtype=torch.float32, device=like.device) if g is None else g.contiguous()
        for g, s in zip(grads, shapes)
    ]


# ---- mLSTM ---------------------------------------------------------------------------------


class MLSTMChunkwise(torch.autograd.Function):
    """moxe::mlstm::chunkwise_forward / chunkwise_backward (the exact gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets, qk_scale, eps, chunk_size,
                return_last_states, batch_per_pass, keep_tape):
        # the tape only where a backward may read it
        keep_tape = keep_tape and any(ctx.needs_input_grad[:8])
        h, c_last, n_last, m_last, tape = _C.mlstm_chunkwise_forward(
            q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets, qk_scale, eps, chunk_size,
            return_last_states, batch_per_pass, keep_tape)
        ctx.save_for_backward(q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets)
        ctx.config = (qk_scale, eps, chunk_size, batch_per_pass)
        ctx.tape = tape  # None unless keep_tape (the backward reads it where the forward wrote it)
        ctx.set_materialize_grads(False)
        if return_last_states:
            ctx.last_shapes = (c_last.shape, n_last.shape, m_last.shape)
            return h, c_last, n_last, m_last
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, *dlast):
        q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets = ctx.saved_tensors
        qk_scale, eps, chunk_size, batch_per_pass = ctx.config
        if dh is None:
            dh = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        dc_last, dn_last, dm_last = _zeros_for_missing(dlast, ctx.last_shapes, q) if dlast else (None,) * 3
        init_grads = c_init is not None and any(ctx.needs_input_grad[5:8])
        dq, dk, dv, di, df, dc0, dn0, dm0 = _C.mlstm_chunkwise_backward(
            q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets, dh.contiguous(), dc_last, dn_last,
            dm_last, qk_scale, eps, chunk_size, init_grads, batch_per_pass, ctx.tape)
        ctx.tape = None  # (once_differentiable: one backward; the memory goes back now)
        return dq, dk, dv, di, df, dc0, dn0, dm0, None, None, None, None, None, None, None


def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
                    initial_states: Optional[Tuple[Tensor, Tensor, Tensor]] = None, *, qk_scale: float = 0.0,
                    eps: float = 1e-6, chunk_size: int = 64, segment_offsets: Optional[Tensor] = None,
                    return_last_states: bool = False, batch_per_pass: int = 0, keep_tape: bool = False):
    """The mLSTM over a sequence, chunkwise (docs/mlstm.md).

    q, k [B, NH, S, DQK]; v [B, NH, S, DV]; igate, fgate [B, NH, S] (pre-activations), all
    of one dtype. initial_states: (C [N, NH, DQK, DV], n [N, NH, DQK], m [N, NH]) float32,
    N = B, or the number of segments when segment_offsets (int64 [N + 1] on the device,
    B = 1; 0 = o[0] <= o[1] <= ... <= o[N] = S, not checked on the host) packs several
    sequences along S. qk_scale 0 means 1/sqrt(DQK).
    batch_per_pass > 0 runs the batch in passes of that many entries: the same results, the
    workspace of one pass (less memory, more launches).
    keep_tape: when a gradient is needed, the forward keeps its gate scan and fp32 state
    checkpoints (mlstm::chunkwise_tape_size bytes: 1,060 MiB at B 8, S 8192, NH 16, DQK 128,
    DV 256, chunk 128) until the backward, which then does not recompute them (the same
    gradients, bit for bit, and one fewer pass over the states); off: they are recomputed.
    Returns h [B, NH, S, DV], and (C, n, m) after the last step when return_last_states.
    """
    c0, n0, m0 = initial_states if initial_states is not None else (None, None, None)
    out = MLSTMChunkwise.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), igate.contiguous(), fgate.contiguous(), _contiguous(c0),
        _contiguous(n0), _contiguous(m0), _contiguous(segment_offsets), float(qk_scale), float(eps),
        int(chunk_size), bool(return_last_states), int(batch_per_pass), bool(keep_tape))
    if return_last_states:
        h, c, n, m = out
        return h, (c, n, m)
    return out


# ---- sLSTM ---------------------------------------------------------------------------------


class SLSTMSequence(torch.autograd.Function):
    """moxe::slstm::sequence_forward / sequence_backward (the exact gradient).

    Every state carries its gradient, the stabiliser m included (dm_last in, dm_init out):
    a sequence run as chained calls, each starting from the last states of the one before,
    gets the gradients of the sequence run whole.
    """

    @staticmethod
    def forward(ctx, wx, r, bias, y_init, c_init, n_init, m_init, return_last_states, units_per_block):
        y, y_last, c_last, n_last, m_last = _C.slstm_sequence_forward(
            wx, r, bias, y_init, c_init, n_init, m_init, return_last_states, units_per_block)
        ctx.save_for_backward(wx, r, bias, y_init, c_init, n_init, m_init)
        ctx.units_per_block = units_per_block
        ctx.set_materialize_grads(False)
        if return_last_states:
            ctx.state_shape = y_last.shape
            return y, y_last, c_last, n_last, m_last
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dlast):
        wx, r, bias, y_init, c_init, n_init, m_init = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros((wx.shape[0], wx.shape[1], wx.shape[3], wx.shape[4]), dtype=wx.dtype, device=wx.device)
        if dlast:
            dy_last, dc_last, dn_last, dm_last = _zeros_for_missing(dlast, (ctx.state_shape,) * 4, wx)
        else:
            dy_last = dc_last = dn_last = dm_last = None
        init_grads = y_init is not None and any(ctx.needs_input_grad[3:7])
        dwx, dr, dbias, dy0, dc0, dn0, dm0 = _C.slstm_sequence_backward(
            wx, r, bias, y_init, c_init, n_init, m_init, dy.contiguous(), dy_last, dc_last, dn_last, dm_last,
            init_grads, ctx.units_per_block)
        return dwx, dr, dbias, dy0, dc0, dn0, dm0, None, None


def slstm_sequence(wx: Tensor, r: Tensor, bias: Tensor,
                   initial_states: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, *,
                   return_last_states: bool = False, units_per_block: int = 0):
    """The sLSTM over a sequence (docs/slstm.md), NX-AI xlstm layout.

    wx [S, B, 4, NH, DH] (input projections, gate order i, f, z, o); r [NH, 4, DH, DH];
    bias [4, NH, DH]; initial_states (y, c, n, m), each float32 [B, NH, DH] (zeros if None).
    Returns y [S, B, NH, DH], and (y, c, n, m) after the last step when return_last_states.
    All of them are differentiable (m too: chained calls give the whole sequence's gradients).
    """
    y0, c0, n0, m0 = initial_states if initial_states is not None else (None,) * 4
    out = SLSTMSequence.apply(wx.contiguous(), r.contiguous(), bias.contiguous(), _contiguous(y0), _contiguous(c0),
                              _contiguous(n0), _contiguous(m0), bool(return_last_states), int(units_per_block))
    if return_last_states:
        y, *last = out
        return y, tuple(last)
    return out


# ---- the entropy-aware gate ----------------------------------------------------------------


class GateOutput(NamedTuple):
    topk_weight: Tensor    # [T, K] float32, renormalised routing weights (differentiable)
    losses: Tensor         # [4] float32: L_z, L_lb, L_d, L_g (differentiable)
    topk_idx: Tensor       # [T, K] int32, descending probability, ties to the lower index
    probs: Tensor          # [T, E] float32, softmax of the modulated logits (no gradient)
    lse: Tensor            # [T] float32 (no gradient)
    entropy: Tensor        # [T] float32, normalised entropy of softmax(logits) (no gradient)
    difficulty: Tensor     # [T] float32, sigmoid(difficulty_logit), zeros without it (no gradient)
    topk_prob: Tensor      # [T, K] float32, probabilities before renormalisation (no gradient)
    expert_counts: Tensor  # [E] int32, routed (t, k) slots per expert


class MoxEGate(torch.autograd.Function):
    """moxe::router::gate_forward / gate_backward: gradients reach the logits and the
    difficulty logit through topk_weight and the four losses.

    The upstream gradient of the four losses stays on the device: the backward kernel reads
    it as the loss coefficients (GateBackwardParams::loss_grad), so no host sync.
    """

    @staticmethod
    def forward(ctx, logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau):
        (probs, lse, entropy, difficulty, topk_idx, topk_prob, topk_weight, expert_counts,
         losses) = _C.gate_forward(logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau)
        ctx.save_for_backward(logits, difficulty_logit, topk_idx, topk_prob)
        ctx.config = (mlstm_experts, modulation, gamma, tau)
        ctx.mark_non_differentiable(topk_idx, probs, lse, entropy, difficulty, topk_prob, expert_counts)
        ctx.set_materialize_grads(False)
        return topk_weight, losses, topk_idx, probs, lse, entropy, difficulty, topk_prob, expert_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, dweight, dlosses, *unused):
        logits, difficulty_logit, topk_idx, topk_prob = ctx.saved_tensors
        mlstm_experts, modulation, gamma, tau = ctx.config
        dlosses = None if dlosses is None else dlosses.detach().float().contiguous()
        dlogits, ddifficulty = _C.gate_backward(
            logits, difficulty_logit, topk_idx, topk_prob, _contiguous(dweight), 0.0, 0.0, 0.0, 0.0, dlosses,
            mlstm_experts, modulation, gamma, tau)
        return dlogits, ddifficulty, None, None, None, None, None


def moxe_gate(logits: Tensor, difficulty_logit: Optional[Tensor] = None, *, top_k: int,
              mlstm_experts: Optional[int] = None, modulation: str = "standard", gamma: float = 1.0,
              tau: float = 0.5) -> GateOutput:
    """The fused entropy-aware MoxE gate (docs/router.md).

    logits [T, E] (unbiased router logits; a column slice of a wider GEMM output is fine),
    difficulty_logit [T] or None (no difficulty head: d = 0, no modulation, L_d = 0).
    Experts [0, mlstm_experts) are the mLSTM group (default E // 2). modulation: "none",
    "standard", "proportional" or "masked".
    """
    if logits.dim() == 2 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if modulation not in MODULATIONS:
        raise ValueError(f"modulation must be one of {sorted(MODULATIONS)}, got {modulation!r}")
    experts = logits.shape[-1]
    em = experts // 2 if mlstm_experts is None else int(mlstm_experts)
    out = MoxEGate.apply(logits, difficulty_logit, em, int(top_k), MODULATIONS[modulation], float(gamma),
                         float(tau))
    return GateOutput(*out)


# ---- dispatch --------------------------------------------------------------------------------


class RoutingMap(NamedTuple):
    row_map: Tensor         # [T, K] int64: row of the permuted buffer, or -1
    expert_offsets: Tensor  # [E + 1] int64: padded segment starts; [E] = rows used
    expert_counts: Tensor   # [E] int32: rows kept per expert


def routing_map(topk_idx: Tensor, num_experts: int, *, capacity: int = -1, align: int = 1) -> RoutingMap:
    """Expert-major, token-stable row map (docs/dispatch.md). topk_idx [T, K] (expert or -1);
    capacity -1: no limit (later tokens past it are dropped); align pads every segment."""
    idx = topk_idx.to(torch.int32).contiguous()
    return RoutingMap(*_C.routing_map(idx, int(num_experts), int(capacity), int(align)))


class Permute(torch.autograd.Function):
    """xp[row_map[t, k]] = x[t]; backward dx[t] = sum_k dxp[row_map[t, k]]."""

    @staticmethod
    def forward(ctx, x, row_map, expert_offsets, num_experts, align):
        ctx.save_for_backward(row_map)
        ctx.config = (num_experts, align)
        return _C.permute(x, row_map, expert_offsets, num_experts, align)

    @staticmethod
    @once_differentiable
    def backward(ctx, dxp):
        (row_map,) = ctx.saved_tensors
        num_experts, align = ctx.config
        return _C.permute_backward(dxp.contiguous(), row_map, num_experts, align), None, None, None, None


def permute(x: Tensor, row_map: Tensor, num_experts: int, *, align: int = 1,
            expert_offsets: Optional[Tensor] = None) -> Tensor:
    """Rows of x [T, H] into the expert-major buffer [T*K + E*(align-1), H].

    Every row no (t, k) maps to is zero. With expert_offsets (from routing_map) only the
    rows below expert_offsets[E] are written and the tail is left uninitialised (less work;
    only for consumers that read the expert segments alone)."""
    return Permute.apply(x.contiguous(), row_map.contiguous(), _contiguous(expert_offsets), int(num_experts),
                         int(align))


class Unpermute(torch.autograd.Function):
    """y[t] = sum_k weight[t, k] yp[row_map[t, k]]; backward gives dyp (zero on unused rows)
    and dweight[t, k] = <dy[t], yp[row_map[t, k]]>."""

    @staticmethod
    def forward(ctx, yp, row_map, weight, num_experts, align):
        ctx.save_for_backward(yp, row_map, weight)
        ctx.config = (num_experts, align)
        return _C.unpermute(yp, row_map, weight, num_experts, align)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        yp, row_map, weight = ctx.saved_tensors
        num_experts, align = ctx.config
        dyp, dweight = _C.unpermute_backward(yp, row_map, weight, dy.contiguous(), None, num_experts, align)
        return dyp, None, dweight, None, None


def unpermute(yp: Tensor, row_map: Tensor, weight: Tensor, num_experts: int, *, align: int = 1) -> Tensor:
    """The weighted combine: y [T, H] from the expert-major rows yp [T*K + E*(align-1), H]
    and the routing weights weight [T, K] (float32; other dtypes are cast)."""
    return Unpermute.apply(yp.contiguous(), row_map.contiguous(), weight.float().contiguous(), int(num_experts),
                           int(align))
