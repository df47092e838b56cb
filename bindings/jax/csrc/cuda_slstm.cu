// moxe_jax: the platform "CUDA" handlers of the sLSTM sequence forward and backward (cuda_backend.cuh).
#include "cuda_backend.cuh"

MOXE_JAX_SLSTM_HANDLERS(MOXE_JAX_CUDA_HANDLER)
