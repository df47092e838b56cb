"""PyTorch eager compositions of moxe's math: the baselines of benchmarks/compare_torch.py.

Each function computes, with plain PyTorch operators and autograd, the same function as a
moxe primitive (docs/mlstm.md, slstm.md, router.md, dispatch.md) or as the whole MoxE layer
of examples/moxe_layer (layer_reference.hpp, read top to bottom). They are what a user
would write without moxe: vectorised where the math allows, a Python loop where it is a
recurrence. `compare_torch.py --check-layer` checks `moxe_layer_forward` against the C++
host reference in float64.

Precision: the gate, normaliser and state arithmetic run in float32 (float64 for float64
inputs); `mm_dtype` chooses the operand type of the large matrix products (None: the
compute type; torch.bfloat16: what autocast would do, fp32 accumulation).
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MODULATIONS = ("none", "standard", "proportional", "masked")

MLSTM_CHUNK = 64  # the chunk size of the layer's mLSTM cells (compare_torch --check-layer varies it)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mm(a: Tensor, b: Tensor, mm_dtype: Optional[torch.dtype]) -> Tensor:
    if mm_dtype is None or mm_dtype == a.dtype == b.dtype:
        return a @ b
    return (a.to(mm_dtype) @ b.to(mm_dtype)).to(a.dtype)


# ---- mLSTM --------------------------------------------------------------------------------


def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, chunk_size: int = 64,
                    eps: float = 1e-6, qk_scale: Optional[float] = None,
                    mm_dtype: Optional[torch.dtype] = None) -> Tensor:
    """h of the mLSTM recurrence from the zero state (docs/mlstm.md), chunkwise.

    q, k [B, NH, S, DQK]; v [B, NH, S, DV]; igate, fgate [B, NH, S]. Within a chunk of L
    positions, with g_j the chunk-local cumulative logsigmoid(f) and m_prev the stabiliser
    before the chunk, the recurrence's stabiliser is m_j = g_j + max(m_prev, max_{s<=j}
    (i_s - g_s)), and
        h_j = (w_j C_prev^T qs_j + sum_{s<=j} (qs_j . k_s) D_js v_s) / (max(|nq_j|, exp(-m_j)) + eps)
    with D_js = exp(i_s + g_j - g_s - m_j), w_j = exp(m_prev + g_j - m_j); the chunk states
    follow C_next = exp(m_prev + g_L - m_L) C_prev + sum_s exp(i_s + g_L - g_s - m_L) k_s v_s^T
    (a Python loop over the chunks). Returns h in q's dtype.
    """
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    acc = _compute_dtype(q)
    scale = qk_scale if qk_scale else DQK ** -0.5
    L = min(chunk_size, S)
    NC = -(-S // L)
    pad = NC * L - S  # trailing padding: causal, so it never reaches a real position

    def chunks(t: Tensor, width: Optional[int]) -> Tensor:
        t = t.to(acc)
        if width is None:
            return F.pad(t, (0, pad)).reshape(B, NH, NC, L)
        return F.pad(t, (0, 0, 0, pad)).reshape(B, NH, NC, L, width)

    qs = chunks(q, DQK) * scale
    kc = chunks(k, DQK)
    vc = chunks(v, DV)
    i = chunks(igate, None)
    g = F.logsigmoid(chunks(fgate, None)).cumsum(-1)  # [B, NH, NC, L]
    a_max = (i - g).cummax(-1).values
    g_last = g[..., -1]

    # the stabiliser before each chunk: a scalar recurrence over the chunks
    m = torch.zeros(B, NH, dtype=acc, device=q.device)
    m_prevs = []
    for c in range(NC):
        m_prevs.append(m)
        m = g_last[..., c] + torch.maximum(m, a_max[..., c, -1])
    m_prev = torch.stack(m_prevs, -1)  # [B, NH, NC]
    m_j = g + torch.maximum(m_prev.unsqueeze(-1), a_max)  # [B, NH, NC, L]
    m_last = m_j[..., -1]

    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_d = i.unsqueeze(-2) + g.unsqueeze(-1) - g.unsqueeze(-2) - m_j.unsqueeze(-1)
    d = torch.exp(log_d.masked_fill(~causal, float("-inf")))  # [B, NH, NC, L(j), L(s)]
    w_inter = torch.exp(m_prev.unsqueeze(-1) + g - m_j)
    e_state = torch.exp(i + g_last.unsqueeze(-1) - g - m_last.unsqueeze(-1))  # [B, NH, NC, L]
    decay = torch.exp(m_prev + g_last - m_last)  # [B, NH, NC]

    ke = kc * e_state.unsqueeze(-1)
    local_c = _mm(ke.transpose(-1, -2), vc, mm_dtype)  # [B, NH, NC, DQK, DV]
    local_n = ke.sum(-2)  # [B, NH, NC, DQK]
    c_state = torch.zeros(B, NH, DQK, DV, dtype=acc, device=q.device)
    n_state = torch.zeros(B, NH, DQK, dtype=acc, device=q.device)
    c_prevs, n_prevs = [], []
    for c in range(NC):
        c_prevs.append(c_state)
        n_prevs.append(n_state)
        c_state = decay[..., c, None, None] * c_state + local_c[:, :, c]
        n_state = decay[..., c, None] * n_state + local_n[:, :, c]
    c_prev = torch.stack(c_prevs, 2)  # [B, NH, NC, DQK, DV]
    n_prev = torch.stack(n_prevs, 2)  # [B, NH, NC, DQK]

    p = _mm(qs, kc.transpose(-1, -2), mm_dtype) * d  # [B, NH, NC, L, L]
    num = w_inter.unsqueeze(-1) * _mm(qs, c_prev, mm_dtype) + _mm(p, vc, mm_dtype)
    nq = w_inter * (qs * n_prev.unsqueeze(-2)).sum(-1) + p.sum(-1)
    den = torch.maximum(nq.abs(), torch.exp(-m_j)) + eps
    h = (num / den.unsqueeze(-1)).reshape(B, NH, NC * L, DV)[:, :, :S]
    return h.to(q.dtype)


# ---- sLSTM --------------------------------------------------------------------------------


def slstm_sequence(wx: Tensor, r: Tensor, bias: Tensor, mm_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y [S, B, NH, DH] of the sLSTM recurrence from the zero state (docs/slstm.md).

    wx [S, B, 4, NH, DH] (gates i, f, z, o), r [NH, 4, DH, DH] (r[h][g][j][d] maps y[h][d]
    to gate g, unit j), bias [4, NH, DH]. One step per loop iteration: the recurrent
    product (one batched GEMM over the heads), then the pointwise cell.
    """
    S, B, _, NH, DH = wx.shape
    acc = _compute_dtype(wx)
    r_cols = r.to(acc).permute(0, 3, 1, 2).reshape(NH, DH, 4 * DH)  # [h, d, (g, j)]
    bias = bias.to(acc)
    y = torch.zeros(B, NH, DH, dtype=acc, device=wx.device)
    c = torch.zeros_like(y)
    n = torch.zeros_like(y)
    m = torch.zeros_like(y)
    outs = []
    for t in range(S):
        rec = _mm(y.transpose(0, 1), r_cols, mm_dtype).view(NH, B, 4, DH).permute(1, 2, 0, 3)
        raw = wx[t].to(acc) + rec + bias
        i_raw, f_raw, z_raw, o_raw = raw.unbind(1)
        lf = F.logsigmoid(f_raw)
        # m_t = i_raw where n_{t-1} == 0 (the zero state: the first step), else the max
        m_new = i_raw if t == 0 else torch.maximum(i_raw, lf + m)
        i_g = torch.exp(i_raw - m_new)
        f_g = torch.exp(lf + m - m_new)
        c = f_g * c + i_g * torch.tanh(z_raw)
        n = f_g * n + i_g
        m = m_new
        y = torch.sigmoid(o_raw) * c / n
        outs.append(y)
    return torch.stack(outs).to(wx.dtype)


# ---- the entropy-aware gate ---------------------------------------------------------------


class GateOut(NamedTuple):
    probs: Tensor  # [T, E] softmax of the modulated logits
    topk_idx: Tensor  # [T, K] int64
    topk_weight: Tensor  # [T, K] renormalised
    losses: Tensor  # [4]: L_z, L_lb, L_d, L_g


def moxe_gate(logits: Tensor, difficulty_logit: Optional[Tensor], mlstm_experts: int, top_k: int,
              modulation: str = "standard", gamma: float = 1.0, tau: float = 0.5) -> GateOut:
    """The entropy-aware gate and its four losses (docs/router.md), differentiable."""
    T, E = logits.shape
    z = logits.float() if logits.dtype != torch.float64 else logits
    if difficulty_logit is None:
        d = torch.zeros(T, dtype=z.dtype, device=z.device)
        shift = d
    else:
        d = torch.sigmoid(difficulty_logit.to(z.dtype))
        shift = {
            "none": torch.zeros_like(d),
            "standard": gamma * d,
            "proportional": gamma * torch.relu(d - tau),
            "masked": gamma * d * (d > tau),
        }[modulation]
    sign = torch.ones(E, dtype=z.dtype, device=z.device)
    sign[mlstm_experts:] = -1.0
    zc = z + shift.unsqueeze(-1) * sign
    lse = torch.logsumexp(zc, -1)
    p = torch.softmax(zc, -1)
    q = torch.softmax(z, -1)
    entropy = -(q * torch.log(q.clamp_min(1e-6))).sum(-1) / math.log(E)
    top_p, top_i = torch.topk(p, top_k, dim=-1)
    weight = top_p / top_p.sum(-1, keepdim=True)

    l_z = (lse * lse).mean()
    routed = torch.zeros(E, dtype=z.dtype, device=z.device).index_add(0, top_i.flatten(), top_p.flatten())
    u = routed / (T * top_k)
    l_lb = E * ((u - 1.0 / E) ** 2).mean()
    l_d = ((d - entropy) ** 2).mean() if difficulty_logit is not None else z.new_zeros(())
    p_m = p[:, :mlstm_experts].sum(-1).mean()
    p_s = p[:, mlstm_experts:].sum(-1).mean()
    l_g = p_m * torch.log(2 * p_m + 1e-8) + p_s * torch.log(2 * p_s + 1e-8)
    return GateOut(p, top_i, weight, torch.stack([l_z, l_lb, l_d, l_g]))


# ---- dispatch -----------------------------------------------------------------------------


class Routing(NamedTuple):
    order: Tensor  # [T*K]: the (t, k) slot behind each expert-major row
    row_map: Tensor  # [T, K]: the row of each slot
    offsets: List[int]  # [E + 1] on the host (the eager experts loop over them)


def routing_map(topk_idx: Tensor, experts: int) -> Routing:
    """Expert-major, token-stable rows (a stable sort of the flattened slots)."""
    flat = topk_idx.flatten()
    order = torch.sort(flat, stable=True).indices
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=experts)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    return Routing(order, row_map.view_as(topk_idx), offsets)


def permute(x: Tensor, routing: Routing, top_k: int) -> Tensor:
    """xp[row] = x[token of row]."""
    return x.index_select(0, routing.order // top_k)


def unpermute(yp: Tensor, routing: Routing, weight: Tensor) -> Tensor:
    """y[t] = sum_k weight[t, k] yp[row_map[t, k]] (fp32 accumulation)."""
    T, K = routing.row_map.shape
    rows = yp.index_select(0, routing.row_map.flatten()).view(T, K, -1)
    acc = torch.float64 if yp.dtype == torch.float64 else torch.float32
    return (rows.to(acc) * weight.to(acc).unsqueeze(-1)).sum(1).to(yp.dtype)


# ---- the MoxE layer -----------------------------------------------------------------------


class LayerConfig(NamedTuple):
    batch: int
    seq_len: int
    d_model: int
    heads: int
    mlstm_proj_factor: int
    ffn_hidden: int
    conv_width: int
    experts: int
    top_k: int
    expert_mode: str  # "per_token" or "stateful"
    shared_experts: int
    shared_expert_kind: str  # "mlstm" or "slstm"
    modulation: str
    gamma: float
    tau: float
    c_z: float
    c_lb: float
    c_d: float
    c_g: float
    norm_eps: float

    @staticmethod
    def from_dict(d: Dict) -> "LayerConfig":
        return LayerConfig(**{f: d[f] for f in LayerConfig._fields})

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def mlstm_experts(self) -> int:
        return self.experts // 2


def benchmark_config(expert_mode: str = "per_token") -> LayerConfig:
    """examples/moxe_layer's benchmark layer (layer_config.hpp, benchmark_config())."""
    return LayerConfig(batch=4, seq_len=4096, d_model=1024, heads=8, mlstm_proj_factor=2, ffn_hidden=1344,
                       conv_width=4, experts=8, top_k=2, expert_mode=expert_mode, shared_experts=0,
                       shared_expert_kind="mlstm", modulation="standard", gamma=1.0, tau=0.5, c_z=0.001,
                       c_lb=0.01, c_d=0.01, c_g=0.01, norm_eps=1e-5)


def weight_shapes(c: LayerConfig) -> Dict[str, Tuple[int, ...]]:
    """Every weight by name and shape, in the order of LayerWeights::visit()."""
    D, NH, W = c.d_model, c.heads, c.conv_width
    DH, Di, Fh = D // NH, c.mlstm_proj_factor * D, c.ffn_hidden
    s: Dict[str, Tuple[int, ...]] = {}

    def slstm_block(p):
        s.update({p + "norm_w": (D,), p + "norm_b": (D,), p + "conv_w": (D, W), p + "conv_b": (D,),
                  p + "w_if": (2 * D, D), p + "w_zo": (2 * D, D), p + "r": (NH, 4, DH, DH), p + "bias": (4, NH, DH),
                  p + "out_norm_w": (D,), p + "ffn_norm_w": (D,), p + "ffn_norm_b": (D,),
                  p + "ffn_up_w": (2 * Fh, D), p + "ffn_up_b": (2 * Fh,), p + "ffn_down_w": (D, Fh),
                  p + "ffn_down_b": (D,)})

    def mlstm_block(p):
        s.update({p + "norm_w": (D,), p + "norm_b": (D,), p + "w_up": (2 * Di, D), p + "b_up": (2 * Di,),
                  p + "conv_w": (Di, W), p + "conv_b": (Di,), p + "w_q": (Di, Di), p + "w_k": (Di, Di),
                  p + "w_v": (Di, Di), p + "w_gates": (2 * NH, 3 * Di), p + "b_gates": (2 * NH,),
                  p + "out_norm_w": (Di,), p + "skip": (Di,), p + "w_down": (D, Di), p + "b_down": (D,)})

    def mlstm_expert(p):
        s.update({p + "norm_w": (D,), p + "norm_b": (D,), p + "w_qkv": (3 * D, D), p + "w_gates": (2 * NH, D),
                  p + "b_gates": (2 * NH,), p + "out_norm_w": (D,), p + "w_down": (D, D), p + "b_down": (D,)})

    def slstm_expert(p):
        s.update({p + "norm_w": (D,), p + "norm_b": (D,), p + "w_x": (4 * D, D), p + "r": (NH, 4, DH, DH),
                  p + "bias": (4, NH, DH), p + "out_norm_w": (D,), p + "w_down": (D, D), p + "b_down": (D,)})

    slstm_block("slstm_block.")
    mlstm_block("mlstm_block.")
    s.update({"post_norm_w": (D,), "post_norm_b": (D,), "w_router": (c.experts + 1, D),
              "b_router": (c.experts + 1,)})
    for e in range(c.mlstm_experts):
        mlstm_expert(f"mlstm_expert{e}.")
    for e in range(c.experts - c.mlstm_experts):
        slstm_expert(f"slstm_expert{e}.")
    for e in range(c.shared_experts):
        (mlstm_expert if c.shared_expert_kind == "mlstm" else slstm_expert)(f"shared_{c.shared_expert_kind}_expert{e}.")
    return s


_NORM_WEIGHTS = {"norm_w", "out_norm_w", "ffn_norm_w", "post_norm_w", "skip"}


def random_weights(c: LayerConfig, dtype: torch.dtype, device, seed: int = 0) -> Dict[str, Tensor]:
    """Random weights with LayerWeights::random's distributions (layer_reference.hpp, spec::):
    norm weights and the skip N(1, 0.1), linear weights N(0, 1/fan_in), the mLSTM gate biases
    N(0.5, 1), the sLSTM cell biases N(0, 0.5), the conv and recurrent weights N(0, 1/width),
    every other bias N(0, 0.1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, shape in weight_shapes(c).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _NORM_WEIGHTS:
            mean, std = 1.0, 0.1
        elif leaf == "b_gates":
            mean, std = 0.5, 1.0
        elif leaf == "bias":
            mean, std = 0.0, 0.5
        elif leaf in ("conv_w", "r") or len(shape) == 2:
            mean, std = 0.0, 1.0 / math.sqrt(shape[-1])
        else:
            mean, std = 0.0, 0.1
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
        out[name] = w.to(device=device, dtype=dtype)
    return out


def _layer_norm(x: Tensor, w: Tensor, b: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _group_norm(x: Tensor, groups: int, w: Tensor, eps: float) -> Tensor:
    return F.group_norm(x, groups, w, None, eps)  # x [N, C]: groups of C / groups channels


def _causal_conv(x: Tensor, batch: int, w: Tensor, b: Tensor) -> Tensor:
    """Causal depthwise conv along the sequence of x [B*S, C] (rows b*S + s)."""
    C, W = w.shape
    xs = x.reshape(batch, -1, C).transpose(1, 2)
    y = F.conv1d(xs, w.unsqueeze(1), b, padding=W - 1, groups=C)[..., : xs.shape[-1]]
    return y.transpose(1, 2).reshape(-1, C)


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    return F.linear(x, w, b)


def _mlstm_rows(qkv: Tensor, gates: Tensor, heads: int, batch: int, mm_dtype) -> Tensor:
    """h rows [n, NH*dh] of the mLSTM over rows [n] = [batch, seq] (q, k, v columns of qkv)."""
    n, width = qkv.shape
    dh = width // 3 // heads
    cells = qkv.reshape(batch, n // batch, 3, heads, dh).permute(2, 0, 3, 1, 4)  # [3, B, NH, S, dh]
    gi, gf = gates.reshape(batch, n // batch, 2, heads).permute(2, 0, 3, 1)  # [B, NH, S] each
    h = mlstm_chunkwise(cells[0], cells[1], cells[2], gi, gf, chunk_size=MLSTM_CHUNK, mm_dtype=mm_dtype)
    return h.permute(0, 2, 1, 3).reshape(n, heads * dh)


def _slstm_rows(wx: Tensor, r: Tensor, bias: Tensor, heads: int, batch: int, mm_dtype) -> Tensor:
    """y rows [n, NH*dh] of the sLSTM over rows [n] = [batch, seq] (wx rows [n, 4*NH*dh])."""
    n, width = wx.shape
    dh = width // 4 // heads
    cells = wx.reshape(batch, n // batch, 4, heads, dh).transpose(0, 1)  # [S, B, 4, NH, dh]
    y = slstm_sequence(cells, r, bias, mm_dtype=mm_dtype)
    return y.transpose(0, 1).reshape(n, heads * dh)


def _padded(rows: Tensor, seq: Tensor, pos: Tensor, batch: int, longest: int) -> Tensor:
    """rows [n, w] -> [batch * longest, w], row r at (seq[r], pos[r]); zero elsewhere."""
    out = rows.new_zeros(batch, longest, rows.shape[-1])
    out = out.index_put((seq, pos), rows)
    return out.view(batch * longest, -1)


def _expert(c: LayerConfig, w: Dict[str, Tensor], p: str, kind: str, x: Tensor, grid, mm_dtype) -> Tensor:
    """A residual expert block on rows x [n, D]. grid: None (each row a length-1 sequence),
    or (seq, pos, batch, longest): row r is position pos[r] of sequence seq[r]."""
    NH = c.heads
    xn = _layer_norm(x, w[p + "norm_w"], w[p + "norm_b"], c.norm_eps)
    if kind == "mlstm":
        cell_in = torch.cat([_linear(xn, w[p + "w_qkv"]), _linear(xn, w[p + "w_gates"], w[p + "b_gates"])], -1)
    else:
        cell_in = _linear(xn, w[p + "w_x"])
    batch = x.shape[0]
    if grid is not None:
        seq, pos, batch, longest = grid
        cell_in = _padded(cell_in, seq, pos, batch, longest)
    if kind == "mlstm":
        D = c.d_model
        h = _mlstm_rows(cell_in[:, : 3 * D], cell_in[:, 3 * D:], NH, batch, mm_dtype)
    else:
        h = _slstm_rows(cell_in, w[p + "r"], w[p + "bias"], NH, batch, mm_dtype)
    if grid is not None:
        h = h.view(batch, longest, -1)[seq, pos]
    hn = _group_norm(h, NH, w[p + "out_norm_w"], c.norm_eps)
    return x + _linear(hn, w[p + "w_down"], w[p + "b_down"])


def _stateful_grid(token: Tensor, seq_len: int, batch: int):
    """Rows in token order -> (seq, pos, batch, longest): one sequence per batch entry."""
    seq = token // seq_len
    counts = torch.bincount(seq, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(token.numel(), device=token.device) - starts[seq]
    return seq, pos, batch, int(counts.max().item())


class LayerOut(NamedTuple):
    y: Tensor
    losses: Tensor
    topk_idx: Tensor


def moxe_layer_forward(c: LayerConfig, w: Dict[str, Tensor], x: Tensor,
                       mm_dtype: Optional[torch.dtype] = None) -> LayerOut:
    """The MoxE layer of examples/moxe_layer (layer_reference.hpp), x [T, D] -> y [T, D]."""
    B, S, D, NH = c.batch, c.seq_len, c.d_model, c.heads
    T, E, K = c.tokens, c.experts, c.top_k
    # 1. the sLSTM block: LN, conv4 + SiLU -> i, f; z, o from the normed input; sLSTM,
    #    multi-head norm, residual; gated GELU FFN with its residual
    p = "slstm_block."
    xn = _layer_norm(x, w[p + "norm_w"], w[p + "norm_b"], c.norm_eps)
    conv = F.silu(_causal_conv(xn, B, w[p + "conv_w"], w[p + "conv_b"]))
    wx = torch.cat([_linear(conv, w[p + "w_if"]), _linear(xn, w[p + "w_zo"])], -1)
    h = _slstm_rows(wx, w[p + "r"], w[p + "bias"], NH, B, mm_dtype)
    x1 = x + _group_norm(h, NH, w[p + "out_norm_w"], c.norm_eps)
    fn = _layer_norm(x1, w[p + "ffn_norm_w"], w[p + "ffn_norm_b"], c.norm_eps)
    up = _linear(fn, w[p + "ffn_up_w"], w[p + "ffn_up_b"])
    gate, branch = up.chunk(2, -1)
    x2 = x1 + _linear(F.gelu(gate) * branch, w[p + "ffn_down_w"], w[p + "ffn_down_b"])
    #    the mLSTM block: LN, up-projection (branch, output gate), conv4 + SiLU, q, k, v,
    #    gates from concat(q, k, v), mLSTM, multi-head norm + skip, * SiLU(z), down, residual
    p = "mlstm_block."
    xn = _layer_norm(x2, w[p + "norm_w"], w[p + "norm_b"], c.norm_eps)
    xm, zg = _linear(xn, w[p + "w_up"], w[p + "b_up"]).chunk(2, -1)
    xc = F.silu(_causal_conv(xm, B, w[p + "conv_w"], w[p + "conv_b"]))
    qkv = torch.cat([_linear(xc, w[p + "w_q"]), _linear(xc, w[p + "w_k"]), _linear(xm, w[p + "w_v"])], -1)
    gates = _linear(qkv, w[p + "w_gates"], w[p + "b_gates"])
    h = _mlstm_rows(qkv, gates, NH, B, mm_dtype)
    hs = _group_norm(h, NH, w[p + "out_norm_w"], c.norm_eps) + w[p + "skip"] * xc
    x3 = x2 + _linear(hs * F.silu(zg), w[p + "w_down"], w[p + "b_down"])
    u = _layer_norm(x3, w["post_norm_w"], w["post_norm_b"], c.norm_eps)
    # 2. the gate: one linear for the E logits and the difficulty
    router = _linear(u, w["w_router"], w["b_router"])
    g = moxe_gate(router[:, :E], router[:, E], c.mlstm_experts, K, c.modulation, c.gamma, c.tau)
    # 3. experts on their rows, then the weighted combine
    routing = routing_map(g.topk_idx, E)
    xp = permute(u, routing, K)
    token = routing.order // K
    parts = []
    for e in range(E):
        r0, r1 = routing.offsets[e], routing.offsets[e + 1]
        if r1 == r0:
            continue
        kind, index = ("mlstm", e) if e < c.mlstm_experts else ("slstm", e - c.mlstm_experts)
        grid = None if c.expert_mode == "per_token" else _stateful_grid(token[r0:r1], S, B)
        parts.append(_expert(c, w, f"{kind}_expert{index}.", kind, xp[r0:r1], grid, mm_dtype))
    yp = torch.cat(parts, 0)
    y = x3 + unpermute(yp, routing, g.topk_weight.to(yp.dtype))
    # 5. shared experts on every token: y += f_s(u) - u
    for s in range(c.shared_experts):
        kind = c.shared_expert_kind
        grid = None
        if c.expert_mode == "stateful":
            grid = (torch.arange(T, device=x.device) // S, torch.arange(T, device=x.device) % S, B, S)
        y = y + _expert(c, w, f"shared_{kind}_expert{s}.", kind, u, grid, mm_dtype) - u
    return LayerOut(y, g.losses, g.topk_idx)


def moxe_layer_objective(c: LayerConfig, out: LayerOut, dy: Tensor) -> Tensor:
    """sum(y * dy) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g (what backward() differentiates)."""
    coef = torch.tensor([c.c_z, c.c_lb, c.c_d, c.c_g], dtype=out.losses.dtype, device=out.losses.device)
    return (out.y.to(dy.dtype) * dy).sum() + (coef * out.losses).sum().to(dy.dtype)
