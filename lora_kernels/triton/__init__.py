"""Raw Triton kernels with their launchers (one file per op). A launcher checks, allocates and
launches; no autograd here. Import only when triton is installed."""
