"""The Flax MoxE layer against the C++ host layer (examples/moxe_layer, layer_reference.hpp)
on the same weights, in float64 on the CPU: output, losses, top-k, dx and every weight
gradient to 1e-10 (relative), for the four layers `moxe_layer --dump DIR` writes (per-token
and stateful experts, with and without shared experts of both kinds).

The dump comes from $MOXE_LAYER_DUMP (a directory written by `moxe_layer --dump`), or is
written by running $MOXE_LAYER_BIN --dump into a temporary directory; without either the
module is skipped (scripts/jax-check.sh builds the host moxe_layer and sets it).
"""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import moxe_jax as mx  # noqa: E402
from moxe_jax.flax_layer import MoxEGate, MoxELayer  # noqa: E402

TOL = 1e-10


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    if os.environ.get("MOXE_LAYER_DUMP"):
        return os.environ["MOXE_LAYER_DUMP"]
    binary = os.environ.get("MOXE_LAYER_BIN")
    if not binary:
        pytest.skip("set MOXE_LAYER_DUMP (moxe_layer --dump DIR) or MOXE_LAYER_BIN (the moxe_layer executable)")
    out = tmp_path_factory.mktemp("dump")
    subprocess.run([binary, "--dump", str(out)], check=True, capture_output=True)
    return str(out)


CASES = ["per_token", "stateful", "stateful_shared_mlstm", "per_token_shared_slstm"]


def load_case(directory: str, case: str):
    base = os.path.join(directory, case)
    manifest = json.load(open(os.path.join(base, "manifest.json")))
    data = np.fromfile(os.path.join(base, "data.bin"), dtype=np.float64)
    tensors = {e["name"]: data[e["offset"]: e["offset"] + e["size"]] for e in manifest["tensors"]}
    return manifest["config"], tensors


def make_layer(c) -> MoxELayer:
    return MoxELayer(c["d_model"], c["heads"], num_experts=c["experts"], top_k_experts=c["top_k"], gamma=c["gamma"],
                     difficulty_threshold=c["tau"], modulation_bias=c["modulation"], z_loss_coef=c["c_z"],
                     load_balancing_loss_coef=c["c_lb"], d_loss_coef=c["c_d"], group_loss_coef=c["c_g"],
                     mlstm_proj_factor=c["mlstm_proj_factor"], ffn_hidden=c["ffn_hidden"],
                     conv_width=c["conv_width"], expert_mode=c["expert_mode"], shared_experts=c["shared_experts"],
                     shared_expert_kind=c["shared_expert_kind"], norm_eps=c["norm_eps"], rngs=nnx.Rngs(0),
                     dtype=jnp.float64)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


@pytest.mark.parametrize("case", CASES)
def test_layer_equals_the_host_layer(dump_dir, case):
    c, t = load_case(dump_dir, case)
    layer = make_layer(c)
    names = sorted(layer.named_params())
    assert names == sorted(n[2:] for n in t if n.startswith("w.")), "the weight names differ from the dump"
    layer.load_weights({n: t["w." + n] for n in names})
    B, S, D = c["batch"], c["seq_len"], c["d_model"]
    x = jnp.asarray(t["x"].reshape(B, S, D))
    dy = jnp.asarray(t["dy"].reshape(B, S, D))
    graphdef, state = nnx.split(layer)

    def objective(state, x):
        out = nnx.merge(graphdef, state)(x)
        # J = sum(y * dy) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g, what the C++ backward differentiates
        return (out.y * dy).sum() + out.aux_loss, out

    (_, out), (gstate, dx) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(state, x)
    grads = nnx.merge(graphdef, gstate).named_params()

    assert sorted(map(sorted, np.asarray(out.topk_idx).tolist())) == \
        sorted(map(sorted, t["topk_idx"].astype(int).reshape(B * S, c["top_k"]).tolist()))
    errors = {"y": rel(out.y, t["y"]), "losses": rel(out.losses, t["losses"]), "dx": rel(dx, t["dx"])}
    for n in names:
        errors["d" + n] = rel(grads[n][...], t["grad." + n])
    worst = max(errors, key=errors.get)
    print(f"{case}: y {errors['y']:.1e}, losses {errors['losses']:.1e}, dx {errors['dx']:.1e}, "
          f"worst weight grad {worst} {errors[worst]:.1e}")
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{case}: relative errors above {TOL:.0e}: {bad}"


def test_gate_takes_the_authors_names():
    class AuthorsConfig:  # the attribute names of the MoxE authors' MoxEConfig
        num_experts = 6
        top_k_experts = 3
        gamma = 0.3
        difficulty_threshold = 0.8
        modulation_bias = 2  # their ModulationBias.PROPORTIONAL
        z_loss_coef = 0.001
        load_balancing_loss_coef = 0.01
        d_loss_coef = 0.01
        group_loss_coef = 0.01
        gate_bias = False

    gate = MoxEGate.from_config(AuthorsConfig(), embedding_dim=5, rngs=nnx.Rngs(1), dtype=jnp.float64)
    assert gate.modulation == "proportional" and gate.b_router is None
    u = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)))
    out = jax.jit(lambda u: gate(u))(u)
    assert out.topk_idx.shape == (7, 3)
    logits = u @ gate.w_router[...].T
    want = mx.moxe_gate(logits[:, :6], logits[:, 6], top_k=3, modulation="proportional", gamma=0.3, tau=0.8)
    assert rel(out.losses, want.losses) == 0.0
    assert abs(float(out.aux_loss) - float(jnp.dot(jnp.asarray([0.001, 0.01, 0.01, 0.01]), want.losses))) < 1e-15
    with pytest.raises(ValueError, match="modulation_bias"):
        MoxEGate(5, 4, modulation_bias="bogus", rngs=nnx.Rngs(0))


def test_layer_float32_runs_under_jit():
    layer = MoxELayer(8, 2, num_experts=4, top_k_experts=2, expert_mode="stateful", ffn_hidden=8,
                      rngs=nnx.Rngs(3), dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), jnp.float32)
    graphdef, state = nnx.split(layer)
    loss = lambda s, x: (lambda o: (o.y ** 2).mean() + o.aux_loss)(nnx.merge(graphdef, s)(x))  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(state, x)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
