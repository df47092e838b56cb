"""Every moxe_jax op and its gradient against the pure-JAX float64 definitions of
reference_jax.py (written from docs/, not calling moxe), on the CPU handlers (the moxe host
references): float64 to 1e-10, float32 to 1e-5; jit, vmap and jax.test_util.check_grads on
small cases; bad shapes and dtypes give a Python error, and errors from the handlers and the
library come back as exceptions, not crashes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import moxe_jax as mx
import reference_jax as ref

F64_TOL = 1e-10
F32_TOL = 1e-5


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def normal(rng, *shape, scale=1.0, dtype=jnp.float64):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def assert_close(name, got, want, tol):
    """Each leaf's error relative to the larger of its own norm and a thousandth of the
    group's largest. A leaf far smaller than the others is a difference of nearly equal terms
    (e.g. the mLSTM gradients that only the eps of the normaliser reaches, at S = 1): its
    rounding is relative to those terms, so it is held to the group's scale; a wrong value
    of its own size still fails by orders of magnitude."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    scale = max(float(np.linalg.norm(np.asarray(w, np.float64))) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        e = float(np.linalg.norm(g - w)) / max(float(np.linalg.norm(w)), 1e-3 * scale, 1e-300)
        assert e < tol, f"{name}[{i}]: relative error {e:.2e} >= {tol:.0e}"


# ---- mLSTM ---------------------------------------------------------------------------------------


def mlstm_inputs(rng, B, NH, S, DQK, DV, dtype=jnp.float64):
    q, k = normal(rng, B, NH, S, DQK, dtype=dtype), normal(rng, B, NH, S, DQK, dtype=dtype)
    v = normal(rng, B, NH, S, DV, dtype=dtype)
    ig, fg = normal(rng, B, NH, S, dtype=dtype), normal(rng, B, NH, S, scale=2.0, dtype=dtype) + 2.0
    return q, k, v, ig, fg


def mlstm_states(rng, N, NH, DQK, DV, dtype=jnp.float64):
    return (normal(rng, N, NH, DQK, DV, scale=0.5, dtype=dtype), normal(rng, N, NH, DQK, scale=0.5, dtype=dtype),
            normal(rng, N, NH, scale=0.5, dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 7, 4, 5), (1, 2, 33, 8, 16)])
def test_mlstm_forward_backward(rng, shape):
    B, NH, S, DQK, DV = shape
    args = mlstm_inputs(rng, *shape)
    out1, pull1 = jax.vjp(lambda *a: mx.mlstm_chunkwise(*a), *args)
    out2, pull2 = jax.vjp(lambda *a: ref.mlstm(*a)[0], *args)
    assert_close("h", out1, out2, F64_TOL)
    ct = jnp.asarray(rng.normal(size=out2.shape))
    assert_close("dq, dk, dv, digate, dfgate", pull1(ct), pull2(ct), F64_TOL)


def test_mlstm_states_and_their_gradients(rng):
    B, NH, S, DQK, DV = 2, 2, 6, 4, 3
    args = mlstm_inputs(rng, B, NH, S, DQK, DV) + mlstm_states(rng, B, NH, DQK, DV)

    def moxe(q, k, v, i, f, c0, n0, m0):
        return mx.mlstm_chunkwise(q, k, v, i, f, (c0, n0, m0), return_last_states=True, qk_scale=0.7)

    def plain(q, k, v, i, f, c0, n0, m0):
        return ref.mlstm(q, k, v, i, f, c0, n0, m0, qk_scale=0.7)

    out1, pull1 = jax.vjp(moxe, *args)
    out2, pull2 = jax.vjp(plain, *args)
    assert_close("h, (C, n, m)", out1, out2, F64_TOL)
    cts = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), out2)
    assert_close("grads incl. dC0, dn0, dm0", pull1(cts), pull2(cts), F64_TOL)


def test_mlstm_segments(rng):
    NH, DQK, DV = 2, 4, 4
    offsets = [0, 3, 3, 8, 9]  # an empty segment and a length-1 one
    S, N = offsets[-1], len(offsets) - 1
    args = mlstm_inputs(rng, 1, NH, S, DQK, DV) + mlstm_states(rng, N, NH, DQK, DV)
    for index in (jnp.int64, jnp.int32):
        seg = jnp.asarray(offsets, index)

        def moxe(q, k, v, i, f, c0, n0, m0):
            return mx.mlstm_chunkwise(q, k, v, i, f, (c0, n0, m0), segment_offsets=seg, return_last_states=True)

        def plain(q, k, v, i, f, c0, n0, m0):
            return ref.mlstm_segments(q, k, v, i, f, offsets, c0, n0, m0)

        out1, pull1 = jax.vjp(jax.jit(moxe), *args)
        out2, pull2 = jax.vjp(plain, *args)
        assert_close("segments: h, states", out1, out2, F64_TOL)
        cts = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), out2)
        assert_close("segments: grads", pull1(cts), pull2(cts), F64_TOL)


def test_mlstm_float32(rng):
    args64 = mlstm_inputs(rng, 2, 2, 9, 8, 8)
    args32 = [a.astype(jnp.float32) for a in args64]
    h = mx.mlstm_chunkwise(*args32)
    assert h.dtype == jnp.float32
    assert rel(h, ref.mlstm(*args64)[0]) < F32_TOL
    g32 = jax.grad(lambda *a: (mx.mlstm_chunkwise(*a) ** 2).sum(), argnums=tuple(range(5)))(*args32)
    g64 = jax.grad(lambda *a: (ref.mlstm(*a)[0] ** 2).sum(), argnums=tuple(range(5)))(*args64)
    assert_close("float32 grads", g32, g64, 1e-4)


def test_mlstm_jit_and_vmap(rng):
    args = mlstm_inputs(rng, 2, 2, 5, 4, 4)
    h = mx.mlstm_chunkwise(*args)
    assert rel(jax.jit(mx.mlstm_chunkwise)(*args), h) == 0.0
    # a mapped q folds into the batch; k, v, gates unmapped
    qs = jnp.stack([args[0], 2 * args[0], -args[0]])
    hv = jax.jit(jax.vmap(lambda q: mx.mlstm_chunkwise(q, *args[1:])))(qs)
    for j in range(3):
        assert rel(hv[j], ref.mlstm(qs[j], *args[1:])[0]) < F64_TOL
    # and its gradient, per mapped entry
    gv = jax.vmap(jax.grad(lambda q: (mx.mlstm_chunkwise(q, *args[1:]) ** 2).sum()))(qs)
    for j in range(3):
        want = jax.grad(lambda q: (ref.mlstm(q, *args[1:])[0] ** 2).sum())(qs[j])
        assert rel(gv[j], want) < F64_TOL


def test_mlstm_check_grads(rng):
    args = mlstm_inputs(rng, 1, 2, 4, 3, 2)
    states = mlstm_states(rng, 1, 2, 3, 2)
    check_grads(lambda *a: mx.mlstm_chunkwise(*a), args, order=1, modes=("rev",))
    check_grads(lambda *a: mx.mlstm_chunkwise(*a[:5], tuple(a[5:]), return_last_states=True), args + states,
                order=1, modes=("rev",))


# ---- sLSTM ---------------------------------------------------------------------------------------


def slstm_inputs(rng, S, B, NH, DH, dtype=jnp.float64):
    return (normal(rng, S, B, 4, NH, DH, dtype=dtype), normal(rng, NH, 4, DH, DH, scale=1 / math.sqrt(DH), dtype=dtype),
            normal(rng, 4, NH, DH, scale=0.5, dtype=dtype))


def slstm_states(rng, B, NH, DH):
    y0 = normal(rng, B, NH, DH, scale=0.5)
    c0 = normal(rng, B, NH, DH, scale=0.5)
    n0 = jnp.asarray(rng.uniform(0.5, 2.0, size=(B, NH, DH)))
    m0 = normal(rng, B, NH, DH, scale=0.5)
    return y0, c0, n0, m0


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 2, 4), (16, 2, 1, 8)])
def test_slstm_forward_backward(rng, shape):
    args = slstm_inputs(rng, *shape)
    out1, pull1 = jax.vjp(mx.slstm_sequence, *args)
    out2, pull2 = jax.vjp(lambda *a: ref.slstm(*a)[0], *args)
    assert_close("y", out1, out2, F64_TOL)
    ct = jnp.asarray(rng.normal(size=out2.shape))
    assert_close("dwx, dr, dbias", pull1(ct), pull2(ct), F64_TOL)


def test_slstm_states_and_their_gradients(rng):
    S, B, NH, DH = 5, 2, 2, 3
    args = slstm_inputs(rng, S, B, NH, DH) + slstm_states(rng, B, NH, DH)

    def moxe(wx, r, bias, *states):
        return mx.slstm_sequence(wx, r, bias, states, return_last_states=True)

    out1, pull1 = jax.vjp(moxe, *args)
    out2, pull2 = jax.vjp(lambda wx, r, b, *s: ref.slstm(wx, r, b, *s), *args)
    assert_close("y, (y, c, n, m)", out1, out2, F64_TOL)
    cts = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), out2)
    assert_close("dwx, dr, dbias, dy0, dc0, dn0, dm0", pull1(cts), pull2(cts), F64_TOL)


def test_slstm_float32_jit_vmap(rng):
    args = slstm_inputs(rng, 6, 2, 2, 4)
    y = jax.jit(mx.slstm_sequence)(*[a.astype(jnp.float32) for a in args])
    assert y.dtype == jnp.float32 and rel(y, ref.slstm(*args)[0]) < F32_TOL
    wxs = jnp.stack([args[0], 0.5 * args[0]])
    yv = jax.vmap(lambda wx: mx.slstm_sequence(wx, *args[1:]))(wxs)  # folds into B
    gv = jax.vmap(jax.grad(lambda r, wx: (mx.slstm_sequence(wx, r, args[2]) ** 2).sum()), in_axes=(None, 0))(
        args[1], wxs)  # per-entry dr: runs once per entry
    for j in range(2):
        assert rel(yv[j], ref.slstm(wxs[j], *args[1:])[0]) < F64_TOL
        want = jax.grad(lambda r: (ref.slstm(wxs[j], r, args[2])[0] ** 2).sum())(args[1])
        assert rel(gv[j], want) < F64_TOL


def test_slstm_check_grads(rng):
    args = slstm_inputs(rng, 3, 2, 1, 2)
    check_grads(mx.slstm_sequence, args, order=1, modes=("rev",))


# ---- the gate -------------------------------------------------------------------------------------


# every modulation with and without a difficulty head, over shapes with E_m even, uneven,
# 0 and E, k from 1 to E
GATE_CASES = [("none", True, 4, 2, 2), ("standard", True, 8, 3, 3), ("proportional", True, 2, 1, 1),
              ("masked", True, 6, 6, 0), ("standard", False, 5, 2, 5), ("masked", False, 4, 2, 2),
              ("proportional", True, 7, 4, 7), ("standard", True, 1, 1, 1)]


@pytest.mark.parametrize("modulation,head,E,K,Em", GATE_CASES)
def test_gate(rng, modulation, head, E, K, Em):
    T = 11
    logits = normal(rng, T, E, scale=2.0)
    a = normal(rng, T, scale=2.0) if head else None
    kw = dict(mlstm_experts=Em, top_k=K, modulation=modulation, gamma=0.8, tau=0.45)
    got = mx.moxe_gate(logits, a, **kw)
    want = ref.gate(logits, a, Em, K, modulation, 0.8, 0.45)
    np.testing.assert_array_equal(np.asarray(got.topk_idx), np.asarray(want[2]))
    assert_close("topk_weight, losses", got[:2], want[:2], F64_TOL)
    assert_close("probs, lse, entropy, difficulty, topk_prob", got[3:8], want[3:8], F64_TOL)
    counts = np.bincount(np.asarray(want[2]).ravel(), minlength=E)
    np.testing.assert_array_equal(np.asarray(got.expert_counts), counts)

    dw = jnp.asarray(rng.normal(size=(T, K)))
    coef = jnp.asarray(rng.normal(size=4))

    def objective(fn):
        def f(l, d):
            out = fn(l, d)
            return (out[0] * dw).sum() + (out[1] * coef).sum()
        return f

    argnums = (0, 1) if head else (0,)
    g1 = jax.grad(objective(lambda l, d: mx.moxe_gate(l, d, **kw)), argnums)(logits, a)
    g2 = jax.grad(objective(lambda l, d: ref.gate(l, d, Em, K, modulation, 0.8, 0.45)), argnums)(logits, a)
    assert_close("dlogits, ddifficulty_logit", g1, g2, F64_TOL)


def test_gate_jit_float32_and_check_grads(rng):
    logits, a = normal(rng, 9, 6), normal(rng, 9)
    f = jax.jit(lambda l, d: mx.moxe_gate(l, d, top_k=2, modulation="proportional", tau=0.3))
    got = f(logits.astype(jnp.float32), a.astype(jnp.float32))
    want = ref.gate(logits, a, 3, 2, "proportional", 1.0, 0.3)
    assert got.topk_weight.dtype == jnp.float32
    assert rel(got.topk_weight, want[0]) < F32_TOL and rel(got.losses, want[1]) < F32_TOL
    check_grads(lambda l, d: (lambda o: (o.topk_weight, o.losses))(mx.moxe_gate(l, d, top_k=2)), (logits, a),
                order=1, modes=("rev",))


def test_gate_vmap(rng):
    logits = normal(rng, 3, 5, 4)
    got = jax.vmap(lambda l: mx.moxe_gate(l, top_k=2).losses)(logits)
    for j in range(3):
        assert rel(got[j], ref.gate(logits[j], None, 2, 2)[1]) < F64_TOL


# ---- dispatch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity,align", [(-1, 1), (2, 1), (-1, 4), (3, 2), (0, 1)])
def test_dispatch(rng, capacity, align):
    T, K, E, H = 9, 2, 4, 5
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    idx[3, 1] = -1  # not routed
    rm = mx.routing_map(jnp.asarray(idx), E, capacity=capacity, align=align)
    want_map, want_offsets, want_counts = ref.routing_map(idx, E, capacity, align)
    np.testing.assert_array_equal(np.asarray(rm.row_map), want_map)
    np.testing.assert_array_equal(np.asarray(rm.expert_offsets), want_offsets)
    np.testing.assert_array_equal(np.asarray(rm.expert_counts), want_counts)

    rows = mx.permuted_rows(T, K, E, align)
    x = normal(rng, T, H)
    w = normal(rng, T, K)
    xp, pull = jax.vjp(lambda x: mx.permute(x, rm.row_map, E, align=align), x)
    xp_ref, pull_ref = jax.vjp(lambda x: ref.permute(x, want_map, rows), x)
    assert rel(xp, xp_ref) == 0.0
    dxp = normal(rng, rows, H)
    assert rel(pull(dxp)[0], pull_ref(dxp)[0]) < F64_TOL

    yp = normal(rng, rows, H)
    y, pull = jax.vjp(lambda yp, w: mx.unpermute(yp, rm.row_map, w, E, align=align), yp, w)
    y_ref, pull_ref = jax.vjp(lambda yp, w: ref.unpermute(yp, want_map, w), yp, w)
    assert rel(y, y_ref) < F64_TOL
    dy = normal(rng, T, H)
    assert_close("dyp, dweight", pull(dy), pull_ref(dy), F64_TOL)


def test_dispatch_int32_float32_jit(rng):
    T, K, E, H = 6, 2, 3, 4
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32))
    with jax.enable_x64(False):
        rm = jax.jit(lambda i: mx.routing_map(i, E))(idx)
        assert rm.row_map.dtype == jnp.int32 and rm.expert_offsets.dtype == jnp.int32
        x = jnp.asarray(rng.normal(size=(T, H)), jnp.float32)
        w = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)
        y = jax.jit(lambda x, w: mx.unpermute(mx.permute(x, rm.row_map, E), rm.row_map, w, E))(x, w)
        assert y.dtype == jnp.float32
        assert rel(y, np.asarray(x) * np.asarray(w).sum(1, keepdims=True)) < F32_TOL
        check = jax.grad(lambda x: mx.permute(x, rm.row_map, E).sum())(x)
        assert rel(check, np.full((T, H), K)) == 0.0


def test_dispatch_vmap(rng):
    T, K, E, H = 5, 2, 3, 2
    idx = jnp.asarray(np.stack([[rng.permutation(E)[:K] for _ in range(T)] for _ in range(2)]).astype(np.int32))
    x = normal(rng, 2, T, H)
    got = jax.vmap(lambda i, x: mx.permute(x, mx.routing_map(i, E).row_map, E))(idx, x)
    for j in range(2):
        want_map = ref.routing_map(np.asarray(idx[j]), E)[0]
        assert rel(got[j], ref.permute(x[j], want_map, T * K)) == 0.0


def test_dispatch_check_grads(rng):
    T, K, E, H = 5, 2, 3, 3
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32))
    rm = mx.routing_map(idx, E)
    x, w = normal(rng, T, H), normal(rng, T, K)
    check_grads(lambda x, w: mx.unpermute(2 * mx.permute(x, rm.row_map, E) ** 2, rm.row_map, w, E), (x, w),
                order=1, modes=("rev",))


# ---- errors ------------------------------------------------------------------------------------------


def test_bad_shapes_and_dtypes_are_python_errors(rng):
    q, k, v, i, f = mlstm_inputs(rng, 1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"q must be \[B, NH, S, DQK\]"):
        mx.mlstm_chunkwise(q[0], k, v, i, f)
    with pytest.raises(ValueError, match=r"k must have shape \(1, 2, 3, 4\)"):
        mx.mlstm_chunkwise(q, k[:, :, :2], v, i, f)
    with pytest.raises(TypeError, match="igate must be float64, got float32"):
        mx.mlstm_chunkwise(q, k, v, i.astype(jnp.float32), f)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        mx.mlstm_chunkwise(q.astype(jnp.int32), k, v, i, f)
    with pytest.raises(ValueError, match="m_init must have shape"):
        mx.mlstm_chunkwise(q, k, v, i, f, (jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((2,))))
    with pytest.raises(ValueError, match="segment_offsets needs batch 1"):
        mx.mlstm_chunkwise(*mlstm_inputs(rng, 2, 1, 3, 4, 4), segment_offsets=jnp.asarray([0, 3]))
    wx, r, b = slstm_inputs(rng, 2, 1, 2, 3)
    with pytest.raises(ValueError, match=r"wx must be \[S, B, 4, NH, DH\]"):
        mx.slstm_sequence(wx[:, :, :3], r, b)
    with pytest.raises(ValueError, match=r"r must have shape \(2, 4, 3, 3\)"):
        mx.slstm_sequence(wx, r[:1], b)
    logits = normal(rng, 4, 3)
    with pytest.raises(ValueError, match="modulation must be one of"):
        mx.moxe_gate(logits, top_k=1, modulation="bogus")
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 3\]"):
        mx.moxe_gate(logits, top_k=4)
    with pytest.raises(ValueError, match=r"difficulty_logit must have shape \(4,\)"):
        mx.moxe_gate(logits, jnp.zeros(5), top_k=1)
    with pytest.raises(TypeError, match="topk_idx must be int32 or int64"):
        mx.routing_map(logits, 3)
    rm = mx.routing_map(jnp.zeros((4, 1), jnp.int32), 3)
    with pytest.raises(ValueError, match="x must have 4 rows"):
        mx.permute(normal(rng, 5, 2), rm.row_map, 3)
    with pytest.raises(ValueError, match="yp must have 4 rows"):
        mx.unpermute(normal(rng, 5, 2), rm.row_map, jnp.ones((4, 1)), 3)


def test_handler_and_library_errors_are_exceptions(rng):
    q, k, v, i, f = mlstm_inputs(rng, 1, 1, 4, 2, 2)
    # float16 has no CPU path: the handler says so
    with pytest.raises(Exception, match="on the CPU the dtype must be float32 or float64, got float16"):
        jax.block_until_ready(mx.mlstm_chunkwise(*(a.astype(jnp.float16) for a in (q, k, v, i, f))))
    # offsets that do not end at S: the reference's check, moxe::Status invalid_argument
    with pytest.raises(Exception, match="moxe mlstm_forward failed: invalid_argument"):
        jax.block_until_ready(mx.mlstm_chunkwise(q, k, v, i, f, segment_offsets=jnp.asarray([0, 2, 3])))
    # a raw call with inconsistent shapes: the handler's own check, with the names
    call = jax.ffi.ffi_call("moxe_mlstm_forward", [jax.ShapeDtypeStruct((1, 1, 4, 2), jnp.float64)] +
                            [jax.ShapeDtypeStruct((0,), jnp.float64)] * 3)
    none = jnp.zeros((0,))
    with pytest.raises(Exception, match=r"moxe mlstm_forward: k must have shape \(1, 1, 4, 2\), got \(1, 1, 3, 2\)"):
        jax.block_until_ready(call(q, k[:, :, :3], v, i, f, none, none, none, jnp.zeros((0,), jnp.int64),
                                   qk_scale=np.float64(0), eps=np.float64(1e-6), chunk_size=np.int64(64)))
    # routing indices outside [0, E) (and not -1): the reference rejects them
    with pytest.raises(Exception, match="moxe routing_map failed: invalid_argument"):
        jax.block_until_ready(mx.routing_map(jnp.asarray([[0], [7]], jnp.int32), 3))
