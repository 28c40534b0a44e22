"""Test set-up: Triton runs in its interpreter on machines without a GPU (this must be decided
before triton is first imported), GPU tests skip without a GPU, CUDA-extension tests skip when
the extension was not built."""

import os
import warnings


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


os.environ.setdefault("TRITON_INTERPRET", "0" if _has_nvidia_gpu() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels with the installed numpy, or None.

    Feature test: a loop over a runtime bound (every kernel of ours has one). Triton 3.6's
    interpreter turns the bound into an int with ``int(array_of_shape_1)``, which numpy >= 2.4
    refuses; Triton 3.8 squeezes first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _count(out_ptr, n):
        total = 0
        for i in range(0, n, 1):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # numpy 2.3 only warns about what 2.4 refuses
            warnings.simplefilter("ignore", DeprecationWarning)
            _count[(1,)](out, 4)
    except Exception as exc:  # noqa: BLE001 - any failure means the interpreter is unusable
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
            f"({type(exc).__name__}: {exc}); Triton 3.6 needs numpy<2.4 to run the CPU suite"
        )
    return None if int(out.item()) == 6 else "Triton's interpreter computed a wrong loop sum"


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=4)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    from lora_kernels.cuda import extension

    ext_reason = extension.unavailable_reason()
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
