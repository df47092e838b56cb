"""moxe_torch against plain PyTorch implementations of the same math (docs/*.md).

Each reference below is written straight from the definitions in DESIGN.md, in float64 on
the GPU, and validated with torch.autograd.gradcheck. The extension runs in float32 (and
float16 / bfloat16 with looser tolerances) on the same input values; its outputs and its
gradients are compared with the reference's outputs and torch.autograd gradients.

Run:  pytest examples/torch_extension/tests   (after building the extension in place)
"""

from __future__ import annotations

import math
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

F64 = torch.float64


# ---- plain PyTorch references ------------------------------------------------------------


def max_first(a, b):
    """max(a, b) whose gradient goes to the first argument at a tie (as the library's)."""
    return torch.where(a >= b, a, b)


def mlstm_reference(q, k, v, igate, fgate, c0=None, n0=None, m0=None, qk_scale=0.0, eps=1e-6):
    """The mLSTM recurrence (DESIGN.md): q, k [B, NH, S, DQK], v [B, NH, S, DV], gates [B, NH, S]."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    scale = qk_scale if qk_scale != 0 else 1.0 / math.sqrt(DQK)
    C = c0 if c0 is not None else q.new_zeros(B, NH, DQK, DV)
    n = n0 if n0 is not None else q.new_zeros(B, NH, DQK)
    m = m0 if m0 is not None else q.new_zeros(B, NH)
    hs = []
    for t in range(S):
        lf = F.logsigmoid(fgate[:, :, t])
        i = igate[:, :, t]
        m_new = max_first(lf + m, i)
        decay = torch.exp(lf + m - m_new)
        weight = torch.exp(i - m_new)
        kt, vt = k[:, :, t], v[:, :, t]
        C = decay[..., None, None] * C + weight[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = decay[..., None] * n + weight[..., None] * kt
        qs = q[:, :, t] * scale
        num = torch.einsum("bhkv,bhk->bhv", C, qs)
        den = max_first((n * qs).sum(-1).abs(), torch.exp(-m_new)) + eps
        hs.append(num / den[..., None])
        m = m_new
    return torch.stack(hs, dim=2), (C, n, m)


def mlstm_varlen_reference(q, k, v, igate, fgate, offsets, c0=None, n0=None, m0=None, **kw):
    """Batch 1, the sequence axis split at `offsets` (a list): the recurrence restarts per segment."""
    hs, states = [], []
    for j in range(len(offsets) - 1):
        s = slice(offsets[j], offsets[j + 1])
        init = (None, None, None) if c0 is None else (c0[j : j + 1], n0[j : j + 1], m0[j : j + 1])
        h, st = mlstm_reference(q[:, :, s], k[:, :, s], v[:, :, s], igate[:, :, s], fgate[:, :, s], *init, **kw)
        hs.append(h)
        states.append(st)
    return torch.cat(hs, dim=2), tuple(torch.cat(x, dim=0) for x in zip(*states))


def slstm_reference(wx, r, bias, y0=None, c0=None, n0=None, m0=None):
    """The sLSTM (DESIGN.md): wx [S, B, 4, NH, DH], r [NH, 4, DH, DH], bias [4, NH, DH]."""
    S, B, _, NH, DH = wx.shape
    if y0 is None:
        y0 = c0 = n0 = m0 = wx.new_zeros(B, NH, DH)
    y, c, n, m = y0, c0, n0, m0
    ys = []
    for t in range(S):
        raw = wx[t] + torch.einsum("hgjd,bhd->bghj", r, y) + bias  # [B, 4, NH, DH]
        i_raw, f_raw, z_raw, o_raw = raw.unbind(1)
        lf = F.logsigmoid(f_raw)
        m_new = torch.where(n == 0, i_raw, max_first(i_raw, lf + m))
        i = torch.exp(i_raw - m_new)
        f = torch.exp(lf + m - m_new)
        c = f * c + i * torch.tanh(z_raw)
        n = f * n + i
        y = torch.sigmoid(o_raw) * c / n
        m = m_new
        ys.append(y)
    return torch.stack(ys), (y, c, n, m)


def gate_reference(z, a, mlstm_experts, top_k, modulation="standard", gamma=1.0, tau=0.5):
    """The entropy-aware gate and its four losses (DESIGN.md), z [T, E], a [T] or None."""
    T, E = z.shape
    K, Em = top_k, mlstm_experts
    zero = z.new_zeros(T)
    if a is None:
        d, s = zero, zero
    else:
        d = torch.sigmoid(a)
        s = {
            "standard": lambda: gamma * d,
            "proportional": lambda: gamma * torch.relu(d - tau),
            "masked": lambda: torch.where(d > tau, gamma * d, zero),
            "none": lambda: zero,
        }[modulation]()
    sign = torch.ones(E, dtype=z.dtype, device=z.device)
    sign[Em:] = -1
    zc = z + s[:, None] * sign
    lse = torch.logsumexp(zc, dim=-1)
    p = torch.softmax(zc, dim=-1)
    q = torch.softmax(z, dim=-1)
    entropy = -(q * torch.log(torch.clamp(q, min=1e-6))).sum(-1) / math.log(E) if E > 1 else zero
    # top-k, ties to the lower index: a stable descending sort keeps equal values in index order
    idx = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
    topk_prob = p.gather(1, idx)
    topk_weight = topk_prob / topk_prob.sum(-1, keepdim=True)
    l_z = (lse**2).mean()
    u = z.new_zeros(E).index_add(0, idx.reshape(-1), topk_prob.reshape(-1)) / (T * K)
    l_lb = E * ((u - 1.0 / E) ** 2).mean()
    l_d = ((d - entropy) ** 2).mean() if a is not None else z.new_zeros(())
    p_m = p[:, :Em].sum(-1).mean()
    p_s = p[:, Em:].sum(-1).mean()
    l_g = p_m * torch.log(2 * p_m + 1e-8) + p_s * torch.log(2 * p_s + 1e-8)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    return dict(probs=p, lse=lse, entropy=entropy, difficulty=d, topk_idx=idx, topk_prob=topk_prob,
                topk_weight=topk_weight, expert_counts=counts, losses=torch.stack([l_z, l_lb, l_d, l_g]))


def routing_map_reference(topk_idx, experts, capacity=-1, align=1):
    """Expert-major, token-stable row map with capacity (later tokens dropped) and padding."""
    T, K = topk_idx.shape
    entries = topk_idx.reshape(-1).tolist()
    per_expert = [[] for _ in range(experts)]
    for i, e in enumerate(entries):
        if e >= 0:
            per_expert[e].append(i)
    row_map = [-1] * (T * K)
    offsets, counts = [0], []
    for e in range(experts):
        kept = per_expert[e] if capacity < 0 else per_expert[e][:capacity]
        for r, i in enumerate(kept):
            row_map[i] = offsets[-1] + r
        counts.append(len(kept))
        offsets.append(offsets[-1] + (len(kept) + align - 1) // align * align)
    return (torch.tensor(row_map, dtype=torch.int64).reshape(T, K), torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(counts, dtype=torch.int32))


def permute_reference(x, row_map, rows):
    """xp[row_map[t, k]] = x[t], other rows zero."""
    T, K = row_map.shape
    used = row_map >= 0
    tokens = torch.arange(T, device=x.device)[:, None].expand(T, K)[used]
    return x.new_zeros(rows, x.shape[1]).index_put((row_map[used],), x[tokens])


def unpermute_reference(yp, row_map, weight):
    """y[t] = sum_k weight[t, k] yp[row_map[t, k]] (rows -1 contribute nothing)."""
    used = (row_map >= 0).to(yp.dtype)
    return (yp[row_map.clamp(min=0)] * (weight * used)[..., None]).sum(1)


# ---- the extension -------------------------------------------------------------------------

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

try:  # installed (pip), else built in place next to tests/
    import moxe_torch as mt
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import moxe_torch as mt
    except ImportError as error:
        pytest.skip(f"moxe_torch is not built ({error})", allow_module_level=True)

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rel_err(actual, expected):
    """Norm-wise relative error of `actual` (any dtype) against the float64 `expected`."""
    expected = expected.detach().to(F64)
    diff = (actual.detach().to(F64) - expected).norm()
    return (diff / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach().to(F64)).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def leaves(tensors, dtype):
    """The extension's inputs (dtype) and the reference's (float64, the same values)."""
    ext = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    ref = [None if t is None else t.detach().to(F64).requires_grad_() for t in ext]
    return ext, ref


def grads(outputs, cotangents, inputs):
    """Gradients of sum(<output, cotangent>) with respect to the non-None inputs."""
    loss = sum((o.to(F64) * c).sum() for o, c in zip(outputs, cotangents))
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, present)


# ---- the references themselves -------------------------------------------------------------


def test_references_gradcheck():
    torch.manual_seed(0)
    def g(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=F64, device=DEV) * scale).requires_grad_()

    q, k, v, i, f = g(1, 2, 5, 4), g(1, 2, 5, 4), g(1, 2, 5, 3), g(1, 2, 5), g(1, 2, 5)
    c0, m0 = g(1, 2, 4, 3), g(1, 2)
    n0 = (torch.rand(1, 2, 4, dtype=F64, device=DEV) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: mlstm_reference(*x)[0], (q, k, v, i, f))
    assert torch.autograd.gradcheck(
        lambda *x: torch.cat([t.reshape(-1) for t in (mlstm_reference(*x)[0], *mlstm_reference(*x)[1])]),
        (q, k, v, i, f, c0, n0, m0))

    wx, r, b = g(4, 2, 4, 2, 3), g(2, 4, 3, 3, scale=0.3), g(4, 2, 3)
    y0, c0s, m0s = g(2, 2, 3, scale=0.5), g(2, 2, 3), g(2, 2, 3)
    n0s = (torch.rand(2, 2, 3, dtype=F64, device=DEV) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: slstm_reference(*x)[0], (wx, r, b))
    assert torch.autograd.gradcheck(
        lambda *x: torch.cat([t.reshape(-1) for t in (slstm_reference(*x)[0], *slstm_reference(*x)[1])]),
        (wx, r, b, y0, c0s, n0s, m0s))

    z, a = g(6, 4), g(6)
    for modulation in ("standard", "proportional", "masked", "none"):
        def fn(z, a):
            out = gate_reference(z, a, 2, 2, modulation, gamma=0.7, tau=0.4)
            return torch.cat([out["topk_weight"].reshape(-1), out["losses"]])
        assert torch.autograd.gradcheck(fn, (z, a))

    row_map = torch.tensor([[0, 3], [2, -1], [1, 4]], device=DEV)
    x, yp, w = g(3, 5), g(6, 5), g(3, 2)
    assert torch.autograd.gradcheck(lambda x: permute_reference(x, row_map, 6), (x,))
    assert torch.autograd.gradcheck(lambda yp, w: unpermute_reference(yp, row_map, w), (yp, w))


# ---- mLSTM ---------------------------------------------------------------------------------


def mlstm_inputs(B, NH, S, DQK, DV, slots, with_states, seed):
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DV)
    igate, fgate = torch.randn(B, NH, S), torch.randn(B, NH, S) + 3.0
    states = [None] * 3
    if with_states:
        states = [torch.randn(slots, NH, DQK, DV), torch.rand(slots, NH, DQK) + 0.5, torch.randn(slots, NH)]
    return [t.to(DEV) for t in (q, k, v, igate, fgate)], [None if s is None else s.to(DEV) for s in states]


@pytest.mark.parametrize("S,chunk_size", [(1, 64), (37, 16), (64, 64), (100, 32)])
@pytest.mark.parametrize("with_states", [False, True])
def test_mlstm_float32(S, chunk_size, with_states):
    B, NH, DQK, DV = 2, 3, 32, 16
    inputs, states = mlstm_inputs(B, NH, S, DQK, DV, B, with_states, seed=S)
    (q, k, v, i, f), ref = leaves(inputs, torch.float32)
    (c0, n0, m0), ref_states = leaves(states, torch.float32)
    init = (c0, n0, m0) if with_states else None
    h, (c, n, m) = mt.mlstm_chunkwise(q, k, v, i, f, init, chunk_size=chunk_size, return_last_states=True)
    h_ref, (c_ref, n_ref, m_ref) = mlstm_reference(*ref, *ref_states)
    for name, a, e in (("h", h, h_ref), ("c_last", c, c_ref), ("n_last", n, n_ref), ("m_last", m, m_ref)):
        assert_close(a, e, TOL[torch.float32], name)

    cot = [torch.randn_like(t, dtype=F64) for t in (h_ref, c_ref, n_ref, m_ref)]
    got = grads((h, c, n, m), cot, (q, k, v, i, f, c0, n0, m0))
    want = grads((h_ref, c_ref, n_ref, m_ref), cot, (*ref, *ref_states))
    names = ["dq", "dk", "dv", "digate", "dfgate", "dc_init", "dn_init", "dm_init"]
    for name, a, e in zip(names, got, want):
        assert_close(a, e, TOL[torch.float32], name)


def test_mlstm_h_only_gradient():
    """Only h used: no upstream state gradients reach the launcher (null pointers)."""
    inputs, _ = mlstm_inputs(1, 2, 20, 16, 32, 1, False, seed=3)
    (q, k, v, i, f), ref = leaves(inputs, torch.float32)
    h = mt.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, qk_scale=0.3, eps=1e-5)
    h_ref, _ = mlstm_reference(*ref, qk_scale=0.3, eps=1e-5)
    assert_close(h, h_ref, TOL[torch.float32], "h")
    cot = [torch.randn_like(h_ref)]
    for name, a, e in zip("qkvif", grads((h,), cot, (q, k, v, i, f)), grads((h_ref,), cot, ref)):
        assert_close(a, e, TOL[torch.float32], "d" + name)


def test_mlstm_varlen():
    offsets = [0, 5, 22, 23, 50]
    segments = len(offsets) - 1
    inputs, states = mlstm_inputs(1, 2, offsets[-1], 16, 16, segments, True, seed=7)
    (q, k, v, i, f), ref = leaves(inputs, torch.float32)
    (c0, n0, m0), ref_states = leaves(states, torch.float32)
    seg = torch.tensor(offsets, dtype=torch.int64, device=DEV)
    h, (c, n, m) = mt.mlstm_chunkwise(q, k, v, i, f, (c0, n0, m0), chunk_size=16, segment_offsets=seg,
                                      return_last_states=True)
    h_ref, (c_ref, n_ref, m_ref) = mlstm_varlen_reference(*ref, offsets, *ref_states)
    for name, a, e in (("h", h, h_ref), ("c_last", c, c_ref), ("n_last", n, n_ref), ("m_last", m, m_ref)):
        assert_close(a, e, TOL[torch.float32], name)
    cot = [torch.randn_like(t) for t in (h_ref, c_ref, n_ref, m_ref)]
    got = grads((h, c, n, m), cot, (q, k, v, i, f, c0, n0, m0))
    want = grads((h_ref, c_ref, n_ref, m_ref), cot, (*ref, *ref_states))
    for name, a, e in zip(["dq", "dk", "dv", "digate", "dfgate", "dc_init", "dn_init", "dm_init"], got, want):
        assert_close(a, e, TOL[torch.float32], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlstm_keep_tape(dtype):
    """keep_tape: the backward reads the forward's checkpoints: the same h and gradients, bit for bit."""
    inputs, states = mlstm_inputs(3, 2, 45, 32, 16, 3, True, seed=13)
    runs = []
    for keep_tape in (False, True):
        (q, k, v, i, f), _ = leaves(inputs, dtype)
        (c0, n0, m0), _ = leaves(states, torch.float32)
        h, (c, n, m) = mt.mlstm_chunkwise(q, k, v, i, f, (c0, n0, m0), chunk_size=16, batch_per_pass=2,
                                          return_last_states=True, keep_tape=keep_tape)
        torch.manual_seed(17)
        cot = [torch.randn_like(t, dtype=F64) for t in (h, c, n, m)]
        runs.append((h, *grads((h, c, n, m), cot, (q, k, v, i, f, c0, n0, m0))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # no gradient needed: no tape kept, the forward alone
    with torch.no_grad():
        (q, k, v, i, f), _ = leaves(inputs, dtype)
        assert torch.equal(mt.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, keep_tape=True),
                           mt.mlstm_chunkwise(q, k, v, i, f, chunk_size=16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlstm_reduced_precision(dtype):
    inputs, _ = mlstm_inputs(2, 2, 40, 32, 32, 2, False, seed=11)
    inputs[0], inputs[1], inputs[2] = inputs[0] * 0.5, inputs[1] * 0.5, inputs[2] * 0.5
    (q, k, v, i, f), ref = leaves(inputs, dtype)
    h = mt.mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    assert h.dtype == dtype
    h_ref, _ = mlstm_reference(*ref)
    assert_close(h, h_ref, TOL[dtype], "h")
    cot = [torch.randn_like(h_ref)]
    for name, a, e in zip("qkvif", grads((h,), cot, (q, k, v, i, f)), grads((h_ref,), cot, ref)):
        assert a.dtype == dtype
        assert_close(a, e, TOL[dtype], "d" + name)


# ---- sLSTM ---------------------------------------------------------------------------------


def slstm_inputs(S, B, NH, DH, with_states, seed):
    torch.manual_seed(seed)
    wx = torch.randn(S, B, 4, NH, DH)
    r = torch.randn(NH, 4, DH, DH) / math.sqrt(DH)
    bias = torch.randn(4, NH, DH) * 0.5
    states = [None] * 4
    if with_states:
        states = [torch.randn(B, NH, DH) * 0.5, torch.randn(B, NH, DH), torch.rand(B, NH, DH) + 0.5,
                  torch.randn(B, NH, DH)]
    return [t.to(DEV) for t in (wx, r, bias)], [None if s is None else s.to(DEV) for s in states]


@pytest.mark.parametrize("S,B,NH,DH,units", [(1, 1, 1, 16, 0), (9, 3, 2, 32, 0), (9, 2, 2, 32, 16), (20, 2, 4, 64, 0)])
@pytest.mark.parametrize("with_states", [False, True])
def test_slstm_float32(S, B, NH, DH, units, with_states):
    inputs, states = slstm_inputs(S, B, NH, DH, with_states, seed=S * 10 + DH)
    (wx, r, bias), ref = leaves(inputs, torch.float32)
    (y0, c0, n0, m0), ref_states = leaves(states, torch.float32)
    init = (y0, c0, n0, m0) if with_states else None
    y, last = mt.slstm_sequence(wx, r, bias, init, return_last_states=True, units_per_block=units)
    y_ref, last_ref = slstm_reference(*ref, *ref_states)
    assert_close(y, y_ref, TOL[torch.float32], "y")
    for name, a, e in zip(["y_last", "c_last", "n_last", "m_last"], last, last_ref):
        assert_close(a, e, TOL[torch.float32], name)

    cot = [torch.randn_like(t) for t in (y_ref, *last_ref)]
    got = grads((y, *last), cot, (wx, r, bias, y0, c0, n0, m0))
    want = grads((y_ref, *last_ref), cot, (*ref, *ref_states))
    for name, a, e in zip(["dwx", "dr", "dbias", "dy_init", "dc_init", "dn_init", "dm_init"], got, want):
        assert_close(a, e, TOL[torch.float32], name)


def test_slstm_y_only_gradient():
    inputs, _ = slstm_inputs(12, 2, 2, 16, False, seed=5)
    (wx, r, bias), ref = leaves(inputs, torch.float32)
    y = mt.slstm_sequence(wx, r, bias)
    y_ref, _ = slstm_reference(*ref)
    assert_close(y, y_ref, TOL[torch.float32], "y")
    cot = [torch.randn_like(y_ref)]
    for name, a, e in zip(["dwx", "dr", "dbias"], grads((y,), cot, (wx, r, bias)), grads((y_ref,), cot, ref)):
        assert_close(a, e, TOL[torch.float32], name)


def test_slstm_chained_calls_equal_the_whole_sequence():
    """Truncated BPTT: the second call starts from the first one's last states (m included),
    autograd carries every state's gradient back: the same gradients as one call."""
    inputs, states = slstm_inputs(8, 3, 2, 32, True, seed=7)
    (wx, r, bias), _ = leaves(inputs, torch.float32)
    (y0, c0, n0, m0), _ = leaves(states, torch.float32)
    y, last = mt.slstm_sequence(wx, r, bias, (y0, c0, n0, m0), return_last_states=True)
    y1, mid = mt.slstm_sequence(wx[:3], r, bias, (y0, c0, n0, m0), return_last_states=True)
    y2, last2 = mt.slstm_sequence(wx[3:], r, bias, mid, return_last_states=True)
    assert torch.equal(torch.cat([y1, y2]), y)
    for a, e in zip(last2, last):
        assert torch.equal(a, e)
    cot = [torch.randn_like(t, dtype=F64) for t in (y, *last)]
    whole = grads((y, *last), cot, (wx, r, bias, y0, c0, n0, m0))
    chained = grads((torch.cat([y1, y2]), *last2), cot, (wx, r, bias, y0, c0, n0, m0))
    for name, a, e in zip(["dwx", "dr", "dbias", "dy_init", "dc_init", "dn_init", "dm_init"], chained, whole):
        assert_close(a, e, TOL[torch.float32], name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slstm_reduced_precision(dtype):
    inputs, _ = slstm_inputs(10, 2, 2, 32, False, seed=2)
    (wx, r, bias), ref = leaves(inputs, dtype)
    y = mt.slstm_sequence(wx, r, bias)
    assert y.dtype == dtype
    y_ref, _ = slstm_reference(*ref)
    assert_close(y, y_ref, TOL[dtype], "y")
    cot = [torch.randn_like(y_ref)]
    for name, a, e in zip(["dwx", "dr", "dbias"], grads((y,), cot, (wx, r, bias)), grads((y_ref,), cot, ref)):
        assert_close(a, e, TOL[dtype], name)


# ---- the gate ------------------------------------------------------------------------------


def check_gate(z, a, mlstm_experts, top_k, modulation, dtype, tol, gamma=0.8, tau=0.45, seed=0):
    (z_ext, a_ext), (z_ref, a_ref) = leaves([z, a], dtype)
    out = mt.moxe_gate(z_ext, a_ext, top_k=top_k, mlstm_experts=mlstm_experts, modulation=modulation, gamma=gamma,
                       tau=tau)
    ref = gate_reference(z_ref, a_ref, mlstm_experts, top_k, modulation, gamma, tau)
    assert out.topk_idx.dtype == torch.int32
    assert torch.equal(out.topk_idx.long(), ref["topk_idx"]), "topk_idx"
    assert torch.equal(out.expert_counts.long(), ref["expert_counts"]), "expert_counts"
    for name in ("probs", "lse", "entropy", "difficulty", "topk_prob", "topk_weight", "losses"):
        if name == "losses":
            # each loss on its own scale (L_d is 0 without the head)
            for j, loss_name in enumerate(("L_z", "L_lb", "L_d", "L_g")):
                e = ref["losses"][j].detach()
                assert abs(out.losses[j].item() - e.item()) <= tol * max(1.0, abs(e.item())), loss_name
        else:
            assert_close(getattr(out, name), ref[name], tol, name)

    torch.manual_seed(seed)
    dw = torch.randn(out.topk_weight.shape, dtype=F64, device=DEV)
    coef = torch.tensor([0.3, 1.7, 0.9, -0.6], dtype=F64, device=DEV)
    inputs_ext = [t for t in (z_ext, a_ext) if t is not None]
    inputs_ref = [t for t in (z_ref, a_ref) if t is not None]
    got = grads((out.topk_weight, out.losses), (dw, coef), inputs_ext)
    want = grads((ref["topk_weight"], ref["losses"]), (dw, coef), inputs_ref)
    for name, g, e in zip(["dlogits", "ddifficulty_logit"], got, want):
        assert_close(g, e, tol, name)


@pytest.mark.parametrize("modulation", ["standard", "proportional", "masked", "none"])
@pytest.mark.parametrize("with_head", [True, False])
def test_gate_float32(modulation, with_head):
    torch.manual_seed(1)
    z = torch.randn(64, 8, device=DEV) * 2.0
    a = torch.randn(64, device=DEV) * 2.0 if with_head else None
    check_gate(z, a, 4, 2, modulation, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("T,E,K,Em", [(1, 2, 1, 1), (300, 64, 8, 32), (130, 10, 3, 3), (33, 256, 32, 128)])
def test_gate_shapes(T, E, K, Em):
    torch.manual_seed(T + E)
    check_gate(torch.randn(T, E, device=DEV) * 1.5, torch.randn(T, device=DEV), Em, K, "standard", torch.float32,
               TOL[torch.float32])


def test_gate_strided_logits():
    """Router logits and the difficulty logit as columns of one [T, E + 1] GEMM output."""
    torch.manual_seed(4)
    T, E = 50, 8
    gemm = torch.randn(T, E + 1, device=DEV, dtype=torch.float64).requires_grad_()
    gemm32 = gemm.detach().float().requires_grad_()
    out = mt.moxe_gate(gemm32[:, :E], gemm32[:, E], top_k=2)
    ref = gate_reference(gemm[:, :E], gemm[:, E], E // 2, 2)
    assert torch.equal(out.topk_idx.long(), ref["topk_idx"])
    dw = torch.randn(T, 2, dtype=F64, device=DEV)
    coef = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=F64, device=DEV)
    (got,) = grads((out.topk_weight, out.losses), (dw, coef), [gemm32])
    (want,) = grads((ref["topk_weight"], ref["losses"]), (dw, coef), [gemm])
    assert_close(got, want, TOL[torch.float32], "dgemm")


def test_gate_ties_to_lower_index():
    torch.manual_seed(5)
    z = torch.randint(0, 3, (40, 8), device=DEV).float()  # many exact ties
    out = mt.moxe_gate(z, None, top_k=3, modulation="none")
    ref = gate_reference(z.double(), None, 4, 3, "none")
    assert torch.equal(out.topk_idx.long(), ref["topk_idx"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_reduced_precision(dtype):
    torch.manual_seed(6)
    z = (torch.randn(128, 16, device=DEV) * 2.0).to(dtype).float()  # values exact in dtype
    a = torch.randn(128, device=DEV).to(dtype).float()
    check_gate(z, a, 8, 2, "standard", dtype, TOL[dtype])


# ---- dispatch --------------------------------------------------------------------------------


def random_topk(T, K, E, seed, unrouted=0.1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[torch.rand(T, K, generator=g) < unrouted] = -1
    return idx.to(torch.int32)


@pytest.mark.parametrize("capacity,align", [(-1, 1), (-1, 8), (5, 1), (7, 4), (0, 2)])
def test_routing_map(capacity, align):
    T, K, E = 97, 3, 12
    idx = random_topk(T, K, E, seed=capacity + 10 * align)
    rmap = mt.routing_map(idx.to(DEV), E, capacity=capacity, align=align)
    row_map, offsets, counts = routing_map_reference(idx, E, capacity, align)
    assert torch.equal(rmap.row_map.cpu(), row_map)
    assert torch.equal(rmap.expert_offsets.cpu(), offsets)
    assert torch.equal(rmap.expert_counts.cpu(), counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,align,capacity", [(64, 1, -1), (37, 4, -1), (128, 2, 6)])
def test_permute_unpermute(dtype, H, align, capacity):
    T, K, E = 61, 2, 8
    idx = random_topk(T, K, E, seed=H)
    rmap = mt.routing_map(idx.to(DEV), E, capacity=capacity, align=align)
    rows = T * K + E * (align - 1)
    torch.manual_seed(H)
    (x, yp, w), (x_ref, yp_ref, w_ref) = leaves(
        [torch.randn(T, H, device=DEV), torch.randn(rows, H, device=DEV), torch.rand(T, K, device=DEV)], dtype)
    w = w.detach().float().requires_grad_()  # routing weights are float32
    w_ref = w.detach().double().requires_grad_()

    xp = mt.permute(x, rmap.row_map, E, align=align)
    xp_ref = permute_reference(x_ref, rmap.row_map, rows)
    assert torch.equal(xp.to(F64), xp_ref.detach()), "permute is a copy: exact"
    xp_offsets = mt.permute(x, rmap.row_map, E, align=align, expert_offsets=rmap.expert_offsets)
    used = int(rmap.expert_offsets[-1])
    assert torch.equal(xp_offsets[:used], xp[:used])

    y = mt.unpermute(yp, rmap.row_map, w, E, align=align)
    y_ref = unpermute_reference(yp_ref, rmap.row_map, w_ref)
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
    assert_close(y, y_ref, tol, "y")

    cot_xp, cot_y = torch.randn(rows, H, dtype=F64, device=DEV), torch.randn(T, H, dtype=F64, device=DEV)
    got = grads((xp, y), (cot_xp, cot_y), (x, yp, w))
    want = grads((xp_ref, y_ref), (cot_xp, cot_y), (x_ref, yp_ref, w_ref))
    for name, g, e in zip(["dx", "dyp", "dweight"], got, want):
        assert_close(g, e, 1e-6 if dtype == torch.float32 else TOL[dtype], name)


def test_moe_pipeline():
    """gate -> routing map -> permute -> per-expert scaling -> unpermute, gradients end to end."""
    torch.manual_seed(8)
    T, E, K, H = 48, 6, 2, 32
    z, a, x = torch.randn(T, E, device=DEV), torch.randn(T, device=DEV), torch.randn(T, H, device=DEV)
    scale = torch.randn(E, device=DEV)
    (z_e, a_e, x_e), (z_r, a_r, x_r) = leaves([z, a, x], torch.float32)

    gate = mt.moxe_gate(z_e, a_e, top_k=K)
    rmap = mt.routing_map(gate.topk_idx, E)
    xp = mt.permute(x_e, rmap.row_map, E)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=DEV), rmap.expert_counts.long(), output_size=T * K)
    y = mt.unpermute(xp * scale[expert_of_row][:, None], rmap.row_map, gate.topk_weight, E)
    loss = y.double().pow(2).sum() + gate.losses.double().sum()

    ref = gate_reference(z_r, a_r, E // 2, K)
    y_ref = (ref["topk_weight"][..., None] * scale.double()[ref["topk_idx"]][..., None] * x_r[:, None, :]).sum(1)
    loss_ref = y_ref.pow(2).sum() + ref["losses"].sum()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    got = torch.autograd.grad(loss, [z_e, a_e, x_e])
    want = torch.autograd.grad(loss_ref, [z_r, a_r, x_r])
    for name, g, e in zip(["dz", "da", "dx"], got, want):
        assert_close(g, e, TOL[torch.float32], name)


# ---- errors ----------------------------------------------------------------------------------


def test_errors_become_runtime_errors():
    inputs, _ = mlstm_inputs(1, 1, 8, 16, 16, 1, False, seed=0)
    q, k, v, i, f = [t.float() for t in inputs]
    with pytest.raises(RuntimeError, match="shape"):  # TORCH_CHECK on shapes
        mt.mlstm_chunkwise(q, k[..., :8], v, i, f)
    with pytest.raises(RuntimeError, match="dtype"):  # no float64 path on the device
        mt.mlstm_chunkwise(q.double(), k.double(), v.double(), i.double(), f.double())
    with pytest.raises(RuntimeError, match="unsupported"):  # Status::unsupported from the launcher
        odd = torch.randn(1, 1, 8, 24, device=DEV)
        mt.mlstm_chunkwise(odd, odd, v, i, f)
    with pytest.raises(RuntimeError, match="moxe"):
        mt.moxe_gate(torch.randn(4, 2000, device=DEV), None, top_k=2)  # more experts than the device takes
