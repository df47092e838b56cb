// moxe_jax: the platform "CUDA" handlers of the mLSTM chunkwise forward and backward (cuda_backend.cuh).
#include "cuda_backend.cuh"

MOXE_JAX_MLSTM_HANDLERS(MOXE_JAX_CUDA_HANDLER)
