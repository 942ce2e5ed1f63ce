"""Builds uan_kernels._C: the C++ (and, where possible, CUDA) UAN operators.

A CppExtension against a CPU build of torch; a CUDAExtension when torch has
CUDA and nvcc is found. Environment overrides:

* ``UAN_CPU_CAPABILITY``: ``avx512``, ``avx2`` or ``default`` (no x86 SIMD
  flags). The default picks the widest one this build machine supports, like
  ``-march=native``: set it explicitly when building for other machines.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures (default ``8.0;9.0+PTX``: machine
  code for A100 and H100, and PTX that newer GPUs compile at load time).
* ``UAN_FORCE_CPU=1``: skip the CUDA kernels even when CUDA is available.
"""
import glob
import os
import platform

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    # A plain `pip install .` builds in an isolated environment without torch;
    # the extension must build against the torch the user already has.
    raise SystemExit(
        "uan-kernels builds against the torch already installed: install torch first, "
        "then run `pip install --no-build-isolation .`"
    ) from None

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# Device-code options of the CUDA build; benchmarks/census.py compiles the
# kernels with these too (it reads both literals from this file).
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
CUDA_DEFINE_MACROS = [("UAN_WITH_CUDA", None)]

CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def detect_cpu_capability() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def parallel_backend_is_openmp() -> bool:
    """Whether torch runs intra-op parallelism on OpenMP (and this compiler is gcc-like on Linux)."""
    return platform.system() == "Linux" and "OpenMP" in torch.__config__.parallel_info()


def build_cuda() -> bool:
    return (
        os.environ.get("UAN_FORCE_CPU", "0") in ("", "0")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )


def extension():
    capability = os.environ.get("UAN_CPU_CAPABILITY") or detect_cpu_capability()
    if capability not in CPU_CAPABILITY_FLAGS:
        raise SystemExit(f"UAN_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)}, got {capability!r}")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas",
                 *CPU_CAPABILITY_FLAGS[capability]]
    common = {"include_dirs": [os.path.join(HERE, CSRC)], "py_limited_api": False}
    if parallel_backend_is_openmp():
        # at::parallel_for is inline: without -fopenmp it compiles to a serial
        # loop, and the CPU kernels would ignore torch.set_num_threads. The
        # OpenMP runtime is torch's own (the same libgomp.so.1, already loaded).
        cxx_flags.append("-fopenmp")
        common["extra_link_args"] = ["-fopenmp"]
    if build_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        return cpp_extension.CUDAExtension(
            "uan_kernels._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            define_macros=CUDA_DEFINE_MACROS, **common
        )
    return cpp_extension.CppExtension("uan_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)
