"""Build script: pure-Python package plus an optional CUDA extension built from csrc/.

The extension (``lora_kernels._C``) is built when a CUDA toolkit and a CUDA build of torch are
present, and skipped otherwise; the package then runs on its Triton and torch backends. A failed
optional build prints why and still installs the package.

    LORA_KERNELS_SKIP_CUDA_BUILD=1   never build the extension
    LORA_KERNELS_FORCE_CUDA_BUILD=1  fail loudly if it cannot be built
    TORCH_CUDA_ARCH_LIST             architectures; defaults to "8.0;9.0" when no GPU is visible
    MAX_JOBS                         parallel compile jobs; defaults to the number of cores
    LORA_KERNELS_PTXAS_VERBOSE=1     print registers/spills/shared memory of every kernel

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str, env: dict | None = None) -> bool:
    value = (os.environ if env is None else env).get(name, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _log(message: str) -> None:
    print(f"lora_kernels setup: {message}", file=sys.stderr, flush=True)


def locate_cuda_home(env: dict) -> str | None:
    """Set ``CUDA_HOME`` to a toolkit folder that holds the CUDA headers, when neither
    ``CUDA_HOME`` nor ``CUDA_PATH`` is set. torch derives the toolkit from ``nvcc`` on PATH,
    which is wrong when that ``nvcc`` is a wrapper script outside the toolkit (seen here:
    ``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc``)."""
    if env.get("CUDA_HOME") or env.get("CUDA_PATH"):
        return env.get("CUDA_HOME") or env.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            env["CUDA_HOME"] = home
            return home
    return None


def cuda_build_blocker() -> str | None:
    """Why the CUDA extension cannot be built here, or None when it can."""
    locate_cuda_home(os.environ)  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means no build
        return f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if not home:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.exists(nvcc) or shutil.which("nvcc")):
        return f"nvcc not found under CUDA_HOME={home}"
    return None


def build_env_defaults(env: dict, gpu_visible: bool, cpu_count: int | None) -> dict:
    """The environment settings the build adds when they are not set already."""
    added = {}
    if not env.get("TORCH_CUDA_ARCH_LIST") and not gpu_visible:
        added["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    if not env.get("MAX_JOBS"):
        added["MAX_JOBS"] = str(max(1, cpu_count or 1))
    return added


def ninja_dir(env: dict) -> str | None:
    """A directory holding a ninja executable that is not on PATH yet (pip's ninja package in
    this interpreter's environment), or None when ninja is on PATH or nowhere to be found."""
    if shutil.which("ninja", path=env.get("PATH")):
        return None
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except Exception:  # noqa: BLE001 - the package is optional
        pass
    for directory in candidates:
        if shutil.which("ninja", path=directory):
            return directory
    return None


def cuda_sources() -> list[str]:
    """The extension's sources, relative to the project root (setuptools wants them so)."""
    found = glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(
        os.path.join(ROOT, "csrc", "*", "*.cu")
    )
    return sorted(os.path.relpath(path, ROOT) for path in found)


def cuda_extension_kwargs(env: dict | None = None) -> dict:
    """ext_modules/cmdclass for the CUDA extension, or {} when it is not to be built."""
    env = os.environ if env is None else env
    force = _flag("LORA_KERNELS_FORCE_CUDA_BUILD", env)
    if _flag("LORA_KERNELS_SKIP_CUDA_BUILD", env):
        if force:
            raise RuntimeError("LORA_KERNELS_SKIP_CUDA_BUILD and LORA_KERNELS_FORCE_CUDA_BUILD both set")
        _log("LORA_KERNELS_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return {}
    blocker = cuda_build_blocker()
    if blocker:
        if force:
            raise RuntimeError(f"LORA_KERNELS_FORCE_CUDA_BUILD=1 but {blocker}")
        _log(f"not building the CUDA extension: {blocker}")
        return {}

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    for key, value in build_env_defaults(env, torch.cuda.is_available(), os.cpu_count()).items():
        env[key] = value
    extra_path = ninja_dir(env)  # e.g. `make` runs .venv/bin/python without .venv/bin on PATH
    if extra_path:
        env["PATH"] = extra_path + os.pathsep + env.get("PATH", "")
    _log(
        f"building lora_kernels._C for TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')} "
        f"with MAX_JOBS={env.get('MAX_JOBS')}"
    )

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension; a failure is reported and skipped unless the build is forced."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - an optional build must not fail the install
                if force:
                    raise
                _log(f"the CUDA extension failed to build and is skipped: {exc}")
                self.extensions = []  # nothing to copy or to list as an output

    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    if _flag("LORA_KERNELS_PTXAS_VERBOSE", env):  # registers, spills, shared memory per kernel
        nvcc_flags.append("-Xptxas=-v")
    extension = CUDAExtension(
        name="lora_kernels._C",
        sources=cuda_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": nvcc_flags,
        },
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    }


if __name__ == "__main__":
    setup(**cuda_extension_kwargs())
