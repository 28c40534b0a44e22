"""The Triton kernels of lora_linear against the float64 formula (CPU: Triton's interpreter;
the `gpu` tests run them on CUDA tensors at realistic sizes)."""

import pytest
import torch
from helpers import DTYPES
from lora_helpers import backend_module, check_against_reference, make_inputs, mask_of

tr = backend_module("triton")

ALL = (True,) * 5
FROZEN_W = (True, False, False, True, True)
# (T, in, out, r, bias, transposed weight, strided x, dropout p, needs): every value of every
# axis of the issue appears, in odd combinations, rather than the full cross product.
CASES = [
    (1, 5, 48, 1, True, False, False, 0.0, FROZEN_W),
    (7, 123, 5, 8, False, True, False, 0.3, ALL),
    (97, 48, 123, 64, True, False, True, 0.3, FROZEN_W),
    (7, 48, 123, 1, True, True, True, 0.0, ALL),
    (97, 123, 48, 8, False, False, False, 0.0, FROZEN_W),
    (1, 123, 123, 64, True, False, True, 0.3, ALL),
    (97, 5, 5, 8, True, True, False, 0.3, FROZEN_W),
]


def _run_and_check(inputs, scaling, p, seed, needs, dtype, T, out_f, in_f):
    x, w, b, a, bb = inputs
    y, s = tr.forward(x, w, b, a, bb, scaling, p, seed)
    assert s.dtype == torch.float32 and s.shape == (T, tr.saved_s_columns(in_f, a.shape[0], p))
    dy = torch.randn(T, out_f, dtype=dtype)
    needs = tuple(n and t is not None for n, t in zip(needs, inputs))
    grads = tr.backward(dy, x, w, a, bb, s, scaling, p, seed, needs)
    keep = mask_of("triton", T, in_f, p, seed)
    check_against_reference([y, *grads], inputs, scaling, dy, keep, p, needs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,in_f,out_f,r,bias,tw,sx,p,needs", CASES)
def test_triton_matches_float64_formula(dtype, T, in_f, out_f, r, bias, tw, sx, p, needs):
    inputs = make_inputs(T, in_f, out_f, r, dtype, bias=bias, transposed_w=tw, strided_x=sx)
    _run_and_check(inputs, 0.5, p, 2024, needs, dtype, T, out_f, in_f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_over_half_base(dtype, p):
    inputs = make_inputs(29, 40, 37, 8, dtype, adapter_dtype=torch.float32, bias=True)
    _run_and_check(inputs, 2.0, p, 11, ALL, dtype, 29, 37, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_256(dtype):
    inputs = make_inputs(5, 40, 24, 256, dtype, bias=False)
    _run_and_check(inputs, 1 / 16, 0.1, 3, ALL, dtype, 5, 24, 40)


def test_broadcast_gradient_with_zero_strides():
    """dY from y.sum().backward() is an expanded tensor (strides 0)."""
    x, w, b, a, bb = make_inputs(9, 20, 7, 4, torch.float32)
    y, s = tr.forward(x, w, b, a, bb, 1.0, 0.0, 0)
    dy = torch.ones(()).expand(9, 7)
    dx, dw, db, da, dB = tr.backward(dy, x, w, a, bb, s, 1.0, 0.0, 0, ALL)
    torch.testing.assert_close(dx, torch.ones(9, 7) @ (w + bb @ a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dB, torch.ones(7, 9) @ s, rtol=1e-4, atol=1e-4)


def test_strided_and_expanded_bias():
    """A bias that is a strided view or an expanded scalar (stride 0) is read by its strides."""
    x, w, _, a, bb = make_inputs(9, 20, 7, 4, torch.float32)
    for b in (torch.randn(14)[::2], torch.randn(1).expand(7)):
        _run_and_check((x, w, b, a, bb), 0.5, 0.0, 0, ALL, torch.float32, 9, 7, 20)


def test_dropout_fraction_and_scale():
    keep = mask_of("triton", 64, 256, 0.3, 123)
    frac = 1 - keep.float().mean().item()
    assert abs(frac - 0.3) < 0.015  # 16384 draws: sigma 0.0036
    # every row and column sees dropping (the mask is not constant along an axis)
    assert (~keep).any(0).float().mean() > 0.9 and (~keep).any(1).all()


def test_mask_depends_on_seed_only():
    m1 = mask_of("triton", 16, 40, 0.5, 7)
    assert torch.equal(m1, mask_of("triton", 16, 40, 0.5, 7))
    assert not torch.equal(m1, mask_of("triton", 16, 40, 0.5, 8))
    # same element index -> same decision: the first 8 rows of a taller x draw the same mask
    assert torch.equal(m1[:8], mask_of("triton", 8, 40, 0.5, 7))


def test_large_seed():
    inputs = make_inputs(6, 9, 5, 2, torch.float32)
    _run_and_check(inputs, 1.0, 0.2, 2**62 + 12345, ALL, torch.float32, 6, 5, 9)


def test_not_supported_reasons():
    x, w, b, a, bb = make_inputs(3, 4, 5, 2, torch.float64)
    assert any("float64" in r for r in tr.not_supported_reasons(x, w, b, a, bb, 0.0, True))
    x, w, b, a, bb = make_inputs(3, 4, 5, 257, torch.float32)
    assert any("rank 257" in r for r in tr.not_supported_reasons(x, w, b, a, bb, 0.0, True))
    x, w, b, a, bb = make_inputs(3, 4, 5, 2, torch.float16)
    assert tr.not_supported_reasons(x, w, b, a, bb, 0.1, True) == []


# ----------------------------------------------------------------------------- GPU (real kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,in_f,out_f,r,p", [(4099, 1024, 2048, 16, 0.1), (1000, 4096, 1031, 64, 0.0),
                                              (77, 777, 333, 256, 0.3), (8192, 512, 512, 1, 0.0)])
def test_gpu_realistic_sizes(dtype, T, in_f, out_f, r, p):
    torch.manual_seed(0)
    inputs = [t.cuda() if t is not None else None
              for t in make_inputs(T, in_f, out_f, r, dtype, bias=True, strided_x=T == 77)]
    x, w, b, a, bb = inputs
    y, s = tr.forward(x, w, b, a, bb, 2.0, p, 42)
    dy = torch.randn(T, out_f, dtype=dtype, device="cuda")
    grads = tr.backward(dy, x, w, a, bb, s, 2.0, p, 42, ALL)
    keep = mask_of("triton", T, in_f, p, 42, device="cuda")
    check_against_reference([y, *grads], inputs, 2.0, dy, keep, p)


@pytest.mark.gpu
def test_gpu_bf16_mixed_and_repeatable():
    inputs = [t.cuda() for t in make_inputs(2048, 1024, 1024, 16, torch.bfloat16,
                                            adapter_dtype=torch.float32)]
    x, w, b, a, bb = inputs
    y1, s1 = tr.forward(x, w, b, a, bb, 2.0, 0.1, 5)
    y2, s2 = tr.forward(x, w, b, a, bb, 2.0, 0.1, 5)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    dy = torch.randn_like(y1)
    g1 = tr.backward(dy, x, w, a, bb, s1, 2.0, 0.1, 5, ALL)
    g2 = tr.backward(dy, x, w, a, bb, s1, 2.0, 0.1, 5, ALL)
    for u, v in zip(g1, g2):  # dB is summed with atomics: equal up to fp32 reordering
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    keep = mask_of("triton", 2048, 1024, 0.1, 5, device="cuda")
    check_against_reference([y1, *g1], inputs, 2.0, dy, keep, 0.1)


# ----------------------------------------------------------------------------- GPU compile, no GPU


def _ptxas_reason():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA backend is not importable ({exc})"
    return None


@pytest.mark.parametrize("dt,adt", [("bf16", "fp32")])  # both dot paths: bf16 base, fp32 LoRA
def test_kernels_compile_for_sm90(dt, adt):
    """Front end, MLIR passes and ptxas on every kernel, for a GPU this machine does not have
    (about 30 s on 2 cores, the price of checking the compiled path here at all)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    reason = _ptxas_reason()
    if reason:
        pytest.skip(reason)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("lora_compile_check.py")),
                           dt, adt], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 5, proc.stdout
