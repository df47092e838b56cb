"""Pure-JAX implementations of the moxe primitives, written from docs/ (mlstm.md, slstm.md,
router.md, dispatch.md) and not calling moxe: what the tests hold the custom calls to, in
float64, values and gradients (jax.grad through these plain definitions).

Ties follow the library's rule where the docs fix one: both max of the mLSTM take their
first argument on a tie, the sLSTM's takes raw_i; the top-k breaks ties to the lower index.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODULATIONS = ("none", "standard", "proportional", "masked")


def _max_first(a, b):
    """max(a, b) taking a on a tie (and its gradient with it)."""
    return jnp.where(a >= b, a, b)


# ---- mLSTM (docs/mlstm.md, "The cell") --------------------------------------------------------


def mlstm(q, k, v, igate, fgate, c0=None, n0=None, m0=None, qk_scale=0.0, eps=1e-6):
    """The recurrence per (batch, head): returns h [B, NH, S, DV] and (C_S, n_S, m_S)."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    scale = qk_scale if qk_scale else 1.0 / math.sqrt(DQK)
    if c0 is None:
        c0 = jnp.zeros((B, NH, DQK, DV), q.dtype)
        n0 = jnp.zeros((B, NH, DQK), q.dtype)
        m0 = jnp.zeros((B, NH), q.dtype)

    def step(state, xs):
        c, n, m = state
        qt, kt, vt, it, ft = xs
        lf = jax.nn.log_sigmoid(ft)
        m_new = _max_first(lf + m, it)
        f_scale = jnp.exp(lf + m - m_new)
        i_scale = jnp.exp(it - m_new)
        c = f_scale[..., None, None] * c + i_scale[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = f_scale[..., None] * n + i_scale[..., None] * kt
        qs = qt * scale
        num = jnp.einsum("bhkv,bhk->bhv", c, qs)
        dot = jnp.einsum("bhk,bhk->bh", n, qs)
        den = _max_first(jnp.abs(dot), jnp.exp(-m_new)) + eps
        return (c, n, m_new), num / den[..., None]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, igate, fgate))
    (c, n, m), h = jax.lax.scan(step, (c0, n0, m0), xs)
    return jnp.moveaxis(h, 0, 2), (c, n, m)


def mlstm_segments(q, k, v, igate, fgate, offsets: Sequence[int], c0=None, n0=None, m0=None, **kw):
    """Batch 1, several sequences back to back (offsets concrete): the recurrence restarts at
    each segment with that segment's initial states; states per segment."""
    NH, DQK, DV = q.shape[1], q.shape[3], v.shape[3]
    hs, cs, ns, ms = [], [], [], []
    for s in range(len(offsets) - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        init = (None, None, None) if c0 is None else (c0[s:s + 1], n0[s:s + 1], m0[s:s + 1])
        if b == a:  # an empty segment passes its initial states through
            z = (jnp.zeros((1, NH, DQK, DV), q.dtype), jnp.zeros((1, NH, DQK), q.dtype), jnp.zeros((1, NH), q.dtype))
            c, n, m = init if c0 is not None else z
        else:
            h, (c, n, m) = mlstm(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], igate[:, :, a:b], fgate[:, :, a:b],
                                 *init, **kw)
            hs.append(h)
        cs.append(c)
        ns.append(n)
        ms.append(m)
    return jnp.concatenate(hs, 2), (jnp.concatenate(cs), jnp.concatenate(ns), jnp.concatenate(ms))


# ---- sLSTM (docs/slstm.md, "Math") ------------------------------------------------------------


def slstm(wx, r, bias, y0=None, c0=None, n0=None, m0=None):
    """y [S, B, NH, DH] and the final (y, c, n, m)."""
    S, B, _, NH, DH = wx.shape
    if y0 is None:
        y0 = c0 = n0 = m0 = jnp.zeros((B, NH, DH), wx.dtype)

    def step(state, wxt):
        y, c, n, m = state
        rec = jnp.einsum("hgjd,bhd->bghj", r, y)
        raw = wxt + rec + bias[None]
        i_raw, f_raw, z_raw, o_raw = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        lf_m = jax.nn.log_sigmoid(f_raw) + m
        m_new = jnp.where(n == 0, i_raw, _max_first(i_raw, lf_m))
        ig = jnp.exp(i_raw - m_new)
        fg = jnp.exp(lf_m - m_new)
        c = fg * c + ig * jnp.tanh(z_raw)
        n = fg * n + ig
        y = jax.nn.sigmoid(o_raw) * c / n
        return (y, c, n, m_new), y

    last, ys = jax.lax.scan(step, (y0, c0, n0, m0), wx)
    return ys, last


# ---- the entropy-aware gate (docs/router.md) --------------------------------------------------


def gate(logits, difficulty_logit, mlstm_experts: int, top_k: int, modulation="standard", gamma=1.0, tau=0.5):
    """(topk_weight, losses [4], topk_idx, probs, lse, entropy, difficulty, topk_prob)."""
    T, E = logits.shape
    z = logits
    if difficulty_logit is None:
        d = jnp.zeros((T,), z.dtype)
        s = d
    else:
        d = jax.nn.sigmoid(difficulty_logit)
        s = {"none": jnp.zeros_like(d), "standard": gamma * d, "proportional": gamma * jax.nn.relu(d - tau),
             "masked": gamma * d * (d > tau)}[modulation]
    sign = jnp.where(jnp.arange(E) < mlstm_experts, 1.0, -1.0).astype(z.dtype)
    zc = z + s[:, None] * sign
    lse = jax.nn.logsumexp(zc, -1)
    p = jax.nn.softmax(zc, -1)
    qd = jax.nn.softmax(z, -1)
    entropy = -(qd * jnp.log(jnp.maximum(qd, 1e-6))).sum(-1) / math.log(E) if E > 1 else jnp.zeros((T,), z.dtype)
    top_p, top_i = jax.lax.top_k(p, top_k)
    weight = top_p / top_p.sum(-1, keepdims=True)
    l_z = (lse * lse).mean()
    u = (jax.nn.one_hot(top_i, E, dtype=z.dtype) * top_p[..., None]).sum((0, 1)) / (T * top_k)
    l_lb = E * ((u - 1.0 / E) ** 2).mean()
    l_d = ((d - entropy) ** 2).mean() if difficulty_logit is not None else jnp.zeros((), z.dtype)
    p_m = p[:, :mlstm_experts].sum(-1).mean()
    p_s = p[:, mlstm_experts:].sum(-1).mean()
    l_g = p_m * jnp.log(2 * p_m + 1e-8) + p_s * jnp.log(2 * p_s + 1e-8)
    return weight, jnp.stack([l_z, l_lb, l_d, l_g]), top_i, p, lse, entropy, d, top_p


# ---- dispatch (docs/dispatch.md) -------------------------------------------------------------


def routing_map(topk_idx: np.ndarray, experts: int, capacity: int = -1, align: int = 1):
    """row_map, expert_offsets, expert_counts (numpy, from the definition)."""
    idx = np.asarray(topk_idx)
    T, K = idx.shape
    flat = idx.reshape(-1)
    routed = np.array([(flat == e).sum() for e in range(experts)])
    kept = routed if capacity < 0 else np.minimum(routed, capacity)
    padded = -(-kept // align) * align
    offsets = np.concatenate([[0], np.cumsum(padded)])
    row_map = np.full(T * K, -1, np.int64)
    position = np.zeros(experts, np.int64)
    for i, e in enumerate(flat):
        if e < 0:
            continue
        p = position[e]
        position[e] += 1
        if capacity < 0 or p < capacity:
            row_map[i] = offsets[e] + p
    return row_map.reshape(T, K), offsets.astype(np.int64), kept.astype(np.int32)


def permute(x, row_map, rows: int):
    """xp[row_map[t, k]] = x[t]; other rows zero."""
    T, K = row_map.shape
    flat = jnp.asarray(row_map).reshape(-1)
    src = jnp.repeat(x, K, axis=0)
    target = jnp.where(flat >= 0, flat, rows)  # -1: dropped (out of range, mode="drop")
    return jnp.zeros((rows, x.shape[1]), x.dtype).at[target].set(src, mode="drop")


def unpermute(yp, row_map, weight):
    """y[t] = sum_k w[t, k] yp[row_map[t, k]] (rows -1 contribute nothing)."""
    rm = jnp.asarray(row_map)
    rows = yp[jnp.maximum(rm, 0)]
    w = jnp.where(rm >= 0, weight, 0.0)
    return (rows * w[..., None]).sum(1)
