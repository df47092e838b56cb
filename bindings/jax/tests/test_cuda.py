"""The CUDA handlers (the device launchers) against the float64 CPU handlers: every op and
its gradient in float32 and bfloat16 on the GPU, held to the CPU's float64 results by the
norm-wise relative error (float32 1e-4, bfloat16 5e-2; router outputs are float32 for both).

Skipped unless jax has a GPU and moxe_jax registered its CUDA handlers (a CUDA build of
jaxlib and libmoxe_jax_cuda.so built for that GPU). Sizes respect the device limits:
mLSTM head dims multiples of 16, sLSTM head_dim a multiple of 16 and at most 16 heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moxe_jax as mx


def _gpu():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0] if gpus and "CUDA" in mx.platforms() else None


GPU = _gpu()
pytestmark = pytest.mark.skipif(GPU is None, reason="no GPU with the moxe_jax CUDA handlers")
CPU = jax.devices("cpu")[0]
TOLS = {jnp.float32: 1e-4, jnp.bfloat16: 5e-2}


def rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def on(device, dtype, *xs):
    return [jax.device_put(jnp.asarray(x, dtype), device) for x in xs]


def compare(fn, args64, dtype, argnums, cotangent_rng):
    """fn's outputs and gradients on the GPU in dtype against the CPU in float64."""
    want, pull64 = jax.vjp(lambda *a: fn(*a), *on(CPU, jnp.float64, *args64))
    got, pull = jax.vjp(lambda *a: fn(*a), *on(GPU, dtype, *args64))
    tol = TOLS[dtype]
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel(g, w) < tol
    cts = [cotangent_rng.normal(size=w.shape) for w in jax.tree_util.tree_leaves(want)]
    tree = jax.tree_util.tree_structure(want)
    g64 = pull64(jax.tree_util.tree_unflatten(tree, [jnp.asarray(c, w.dtype) for c, w in
                                                     zip(cts, jax.tree_util.tree_leaves(want))]))
    g = pull(jax.tree_util.tree_unflatten(tree, [jax.device_put(jnp.asarray(c, w.dtype), GPU) for c, w in
                                                 zip(cts, jax.tree_util.tree_leaves(got))]))
    for i in argnums:
        assert rel(g[i], g64[i]) < tol, f"gradient {i}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlstm(dtype):
    rng = np.random.default_rng(1)
    B, NH, S, D = 2, 2, 70, 32
    args = [rng.normal(size=(B, NH, S, D)) for _ in range(3)] + [rng.normal(size=(B, NH, S)),
                                                                 rng.normal(size=(B, NH, S)) + 2]
    compare(lambda *a: mx.mlstm_chunkwise(*a), args, dtype, range(5), rng)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_slstm(dtype):
    rng = np.random.default_rng(2)
    S, B, NH, DH = 9, 3, 2, 16
    args = [rng.normal(size=(S, B, 4, NH, DH)), rng.normal(size=(NH, 4, DH, DH)) / math.sqrt(DH),
            rng.normal(size=(4, NH, DH)) * 0.5]
    compare(mx.slstm_sequence, args, dtype, range(3), rng)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gate(dtype):
    rng = np.random.default_rng(3)
    logits, a = rng.normal(size=(100, 8)), rng.normal(size=(100,))
    compare(lambda l, d: mx.moxe_gate(l, d, top_k=2)[:2], [logits, a], dtype, (0, 1), rng)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dispatch(dtype):
    rng = np.random.default_rng(4)
    T, K, E, H = 50, 2, 8, 64
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32))
    rm_cpu = mx.routing_map(jax.device_put(idx, CPU), E, align=4)
    rm_gpu = mx.routing_map(jax.device_put(idx, GPU), E, align=4)
    for g, w in zip(rm_gpu, rm_cpu):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    x, w = rng.normal(size=(T, H)), rng.uniform(size=(T, K))

    def fn(x, w):
        rows = mx.permute(x, rm.row_map, E, align=4)
        return mx.unpermute(rows * 2, rm.row_map, w, E, align=4)

    rm = rm_cpu
    want, pull64 = jax.vjp(fn, *on(CPU, jnp.float64, x, w))
    rm = jax.device_put(rm_gpu, GPU)
    got, pull = jax.vjp(fn, *on(GPU, dtype, x), *on(GPU, jnp.float32, w))
    assert rel(got, want) < TOLS[dtype]
    dy = rng.normal(size=want.shape)
    for g, w64 in zip(pull(jax.device_put(jnp.asarray(dy, dtype), GPU)), pull64(jnp.asarray(dy))):
        assert rel(g, w64) < TOLS[dtype]
