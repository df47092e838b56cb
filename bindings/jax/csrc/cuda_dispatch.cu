// moxe_jax: the platform "CUDA" handlers of the routing map, permute, unpermute and their backwards (cuda_backend.cuh).
#include "cuda_backend.cuh"

MOXE_JAX_DISPATCH_HANDLERS(MOXE_JAX_CUDA_HANDLER)
