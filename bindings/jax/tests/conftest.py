"""pytest setup: float64 on (the CPU references run in double), the tests directory on the
path (reference_jax), and a seed printed for every random case."""

import os
import sys

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rng(request):
    """A fresh generator per test; the seed is printed (pytest shows it on failure) and can be
    fixed with MOXE_JAX_SEED."""
    seed = int(os.environ.get("MOXE_JAX_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"seed {seed} ({request.node.name})")
    return np.random.default_rng(seed)
