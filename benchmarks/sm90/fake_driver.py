"""A stand-in for Triton's CUDA driver that reports an sm_90 GPU, so that Triton compiles kernels
for H100/H200 on a machine without a GPU, specialising arguments exactly as a launch would.

Nothing runs: ``activate()`` must be called before any kernel is compiled, and kernels are then
only compiled through ``JITFunction.warmup`` (``MockTensor`` arguments stand for tensors).
"""

from __future__ import annotations

import os

SM90 = (90, 32)  # compute capability, warp size


class FakeSm90Driver:
    """The driver methods Triton's JIT and compiler call on the way to a compiled kernel."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self._target = GPUTarget("cuda", *SM90)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("no GPU: the fake sm_90 driver only compiles")

    def get_benchmarker(self):
        raise RuntimeError("no GPU: the fake sm_90 driver only compiles")


def activate() -> None:
    """Make Triton compile for sm_90 in this process (interpreter off: it must be off before
    ``triton`` and the kernel modules are imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the sm_90 profile compiles kernels: run it with TRITON_INTERPRET=0")
    from triton.runtime.driver import driver
    driver.set_active(FakeSm90Driver())
