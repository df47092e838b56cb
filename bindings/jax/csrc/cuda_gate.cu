// moxe_jax: the platform "CUDA" handlers of the fused gate forward and backward (cuda_backend.cuh).
#include "cuda_backend.cuh"

MOXE_JAX_GATE_HANDLERS(MOXE_JAX_CUDA_HANDLER)
