"""Test set-up: Triton runs in its interpreter on machines without a GPU (this must be decided
before triton is first imported), GPU tests skip without a GPU, CUDA-extension tests skip when
the extension was not built."""

import os


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


os.environ.setdefault("TRITON_INTERPRET", "0" if _has_nvidia_gpu() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    from lora_kernels import _cuda

    ext_reason = _cuda.unavailable_reason()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords and ext_reason and ext_reason != "no CUDA GPU visible":
            item.add_marker(pytest.mark.skip(reason=f"CUDA extension: {ext_reason}"))


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend choice."""
    import lora_kernels

    torch.manual_seed(0)
    lora_kernels.set_backend(None)
    yield
    lora_kernels.set_backend(None)
