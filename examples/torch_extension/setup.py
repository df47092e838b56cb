"""Build moxe_torch: a thin PyTorch extension over the header-only moxe library.

    pip install --no-build-isolation ./examples/torch_extension     # from the repository root
    python setup.py build_ext --inplace                              # from this directory

Built against the installed torch (hence --no-build-isolation) with the nvcc that
torch.utils.cpp_extension finds (CUDA_HOME). Environment:
    TORCH_CUDA_ARCH_LIST  architectures to build for (default "9.0", i.e. sm_90)
    MOXE_INCLUDE_DIR      the moxe include directory (default ../../include)
    MAX_JOBS              parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402  (reads the arch list)

here = os.path.dirname(os.path.abspath(__file__))
include_dir = os.path.abspath(os.environ.get("MOXE_INCLUDE_DIR", os.path.join(here, "..", "..", "include")))
if not os.path.isfile(os.path.join(include_dir, "moxe", "moxe.cuh")):
    raise RuntimeError(f"moxe headers not found under {include_dir}; set MOXE_INCLUDE_DIR")

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))

setup(
    name="moxe_torch",
    version="0.1.0",
    description="PyTorch bindings of moxe (MoxE-layer CUDA kernels)",
    packages=["moxe_torch"],
    ext_modules=[
        CUDAExtension(
            name="moxe_torch._C",
            sources=sources,
            include_dirs=[include_dir, os.path.join(here, "csrc")],
            extra_compile_args={
                # no -std: torch's BuildExtension passes the standard its headers need
                # (C++17 in older releases; C++20 in newer ones, whose headers stop at an
                # explicit -std=c++17), and moxe's headers build as either
                "cxx": ["-O3"],
                # torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends; the library's half and
                # bf16 code uses the standard cuda_fp16/cuda_bf16 operators and conversions
                "nvcc": [
                    "-O3",
                    "-lineinfo",
                    "-U__CUDA_NO_HALF_OPERATORS__",
                    "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_HALF2_OPERATORS__",
                    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                ],
            },
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    zip_safe=False,
)
