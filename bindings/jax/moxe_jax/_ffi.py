"""Loading the handler libraries and registering their FFI targets with XLA.

Two shared libraries, built by CMake (bindings/jax/CMakeLists.txt):

  libmoxe_jax_cpu.so   platform "cpu": the moxe host references, float32 and float64
  libmoxe_jax_cuda.so  platform "CUDA": the device launchers, float32, bfloat16, float16
                       (built where nvcc is found; loaded where it exists and loads)

Each exports one plain C symbol per op and direction, MoxeJax<Op><Platform>, an XLA FFI
handler; they are registered under the same target name, "moxe_<op>", for both platforms, so
one jax.ffi.ffi_call runs on whichever device the computation is placed. The libraries are
looked for in $MOXE_JAX_LIBRARY_DIR, then next to this file (where the CMake build puts
them, beside a copy of the package).
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, List, Optional

import jax

HANDLERS = {
    "mlstm_forward": "MlstmForward",
    "mlstm_backward": "MlstmBackward",
    "slstm_forward": "SlstmForward",
    "slstm_backward": "SlstmBackward",
    "gate_forward": "GateForward",
    "gate_backward": "GateBackward",
    "routing_map": "RoutingMap",
    "permute": "Permute",
    "permute_backward": "PermuteBackward",
    "unpermute": "Unpermute",
    "unpermute_backward": "UnpermuteBackward",
}

_PLATFORMS = {"cpu": ("libmoxe_jax_cpu.so", "Cpu"), "CUDA": ("libmoxe_jax_cuda.so", "Cuda")}

_loaded: Dict[str, ctypes.CDLL] = {}
_errors: Dict[str, str] = {}


def _search_dirs() -> List[str]:
    dirs = []
    if os.environ.get("MOXE_JAX_LIBRARY_DIR"):
        dirs.append(os.environ["MOXE_JAX_LIBRARY_DIR"])
    dirs.append(os.path.dirname(os.path.abspath(__file__)))
    return dirs


def _find(name: str) -> Optional[str]:
    for d in _search_dirs():
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


def target(op: str) -> str:
    """The FFI target name of an op ("moxe_mlstm_forward", ...)."""
    return "moxe_" + op


def _register(platform: str) -> None:
    library, suffix = _PLATFORMS[platform]
    path = _find(library)
    if path is None:
        _errors[platform] = f"{library} not found in {_search_dirs()} (build it: see bindings/jax/README.md)"
        return
    try:
        lib = ctypes.CDLL(path)
    except OSError as error:  # e.g. the CUDA library on a machine without the CUDA runtime
        _errors[platform] = f"{path} does not load: {error}"
        return
    for op, name in HANDLERS.items():
        symbol = getattr(lib, f"MoxeJax{name}{suffix}")
        jax.ffi.register_ffi_target(target(op), jax.ffi.pycapsule(symbol), platform=platform)
    _loaded[platform] = lib


def register() -> None:
    """Registers every target for every platform whose library is present (idempotent)."""
    if _loaded or _errors:
        return
    for platform in _PLATFORMS:
        _register(platform)
    if "cpu" not in _loaded:
        raise ImportError(f"moxe_jax: {_errors['cpu']}")


def platforms() -> List[str]:
    """The platforms with registered handlers ("cpu", and "CUDA" where built and loadable)."""
    return sorted(_loaded)


def load_error(platform: str) -> Optional[str]:
    """Why a platform's handlers are not registered (None when they are)."""
    return _errors.get(platform)
