"""moxe_jax: the moxe primitives for JAX (XLA FFI custom calls) and a Flax MoxE layer.

    import moxe_jax as mx
    h = mx.mlstm_chunkwise(q, k, v, igate, fgate)            # q, k [B, NH, S, DQK], v [B, NH, S, DV]
    y = mx.slstm_sequence(wx, r, bias)                       # wx [S, B, 4, NH, DH]
    gate = mx.moxe_gate(logits, difficulty_logit, top_k=2)   # topk_weight, losses, topk_idx, ...
    rmap = mx.routing_map(gate.topk_idx, num_experts)
    xp = mx.permute(x, rmap.row_map, num_experts)
    y = mx.unpermute(yp, rmap.row_map, gate.topk_weight, num_experts)

Each op is one custom call (CPU: the host references, float32/float64; CUDA: the device
launchers, float32/bfloat16/float16) with the library's exact backward as its VJP; all of
them run under jax.jit. The Flax (nnx) modules are in moxe_jax.flax_layer (imported on
demand: flax is needed only there). See bindings/jax/README.md.
"""

from ._ffi import load_error, platforms
from .ops import (
    MODULATIONS,
    GateOutput,
    RoutingMap,
    acc_dtype,
    index_dtype,
    mlstm_chunkwise,
    moxe_gate,
    permute,
    permuted_rows,
    routing_map,
    slstm_sequence,
    unpermute,
)

__version__ = "0.1.0"

__all__ = [
    "MODULATIONS",
    "GateOutput",
    "RoutingMap",
    "acc_dtype",
    "index_dtype",
    "mlstm_chunkwise",
    "moxe_gate",
    "permute",
    "permuted_rows",
    "routing_map",
    "slstm_sequence",
    "unpermute",
    "platforms",
    "load_error",
]
