"""The Triton LoRA kernels compiled and run on a GPU, against the float64 formula: every kernel
(shrink, forward GEMM, dS/dB, dX GEMM, dA) at realistic sizes, the TMA and pointer paths, every
config class (split-precision activations, 64-rank chunks, prologue-only GEMM for fp32 bases),
the dropout mask against its definition, bitwise repeatability (no atomics) and the seed's
non-specialisation. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import backend_module, check_against_reference, make_inputs, mask_of, philox_keep

from lora_kernels.triton import lora_dropout as drop

pytestmark = pytest.mark.gpu

tr = backend_module("triton")
ALL = (True,) * 5
FROZEN_W = (True, False, False, True, True)


def _cuda(inputs):
    return [t.cuda() if t is not None else None for t in inputs]


def _run(inputs, scaling, p, seed, needs=ALL):
    """Forward + backward through the backend; checks every output against float64 with the
    mask the forward stored."""
    x, w, b, a, bb = inputs
    y, s = tr.forward(x, w, b, a, bb, scaling, p, seed)
    assert torch.isfinite(s).all()
    dy = torch.randn_like(y)
    needs = tuple(n and t is not None for n, t in zip(needs, inputs))
    grads = tr.backward(dy, x, w, a, bb, s, scaling, p, seed, needs)
    keep = drop.unpack_keep(s, a.shape[0], x.shape[1]) if p > 0 else None
    check_against_reference([y, *grads], inputs, scaling, dy, keep, p, needs)
    return y, s, grads


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_realistic_bf16_base_fp32_adapters(p):
    """The benchmark shape of the design (T = 4096, in = out = 4096, r = 16, bf16 base, fp32
    adapters as PEFT keeps them): TMA GEMMs, split-precision LoRA dots."""
    torch.manual_seed(0)
    inputs = _cuda(make_inputs(4096, 4096, 4096, 16, torch.bfloat16, adapter_dtype=torch.float32))
    _run(inputs, 2.0, p, 1234, FROZEN_W)


@pytest.mark.parametrize("dtype,adapter_dtype,r", [
    (torch.bfloat16, torch.bfloat16, 16), (torch.float16, torch.float16, 64),
    (torch.float16, torch.float32, 7), (torch.float32, torch.float32, 16),
    (torch.bfloat16, torch.float32, 64)], ids=str)
def test_config_classes(dtype, adapter_dtype, r):
    """Each launch class: same-dtype adapters, split fp16 / fp32 activations, 64-rank chunks,
    the prologue-only GEMM + cuBLAS of fp32 bases; in = 1031 takes the pointer path."""
    torch.manual_seed(1)
    for in_f in (1031, 2048):
        inputs = _cuda(make_inputs(1000, in_f, 2048, r, dtype, adapter_dtype=adapter_dtype))
        _run(inputs, 0.5, 0.1, 7)


def test_fan_in_fan_out_strided_x_rank_256():
    torch.manual_seed(2)
    inputs = _cuda(make_inputs(4099, 1024, 768, 256, torch.bfloat16, adapter_dtype=torch.float32,
                               transposed_w=True, strided_x=True))
    _run(inputs, 1 / 16, 0.3, 99)


def test_mask_on_gpu_is_its_definition():
    """The GPU's Philox equals the numpy definition, and the applied mask the stored bits."""
    assert torch.equal(mask_of("triton", 300, 1000, 0.1, 2**40 + 5, device="cuda").cpu(),
                       philox_keep(300, 1000, 0.1, 2**40 + 5))
    x, w, b, a, bb = _cuda(make_inputs(8192, 4096, 16, 16, torch.bfloat16))
    _, s = tr.forward(x, w, b, a, bb, 1.0, 0.1, 3)
    keep = drop.unpack_keep(s, 16, 4096)
    assert abs((1 - keep.float().mean().item()) - 0.1) < 0.001  # 2**25 draws


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pairs_path_equals_the_elementwise_path(dtype):
    """x read as 32-bit pairs (contiguous 16-bit x) and x read element by element (odd row
    stride): the same stored mask bits and S (to rounding: each path tunes its own config)."""
    torch.manual_seed(3)
    x = torch.randn(1000, 1030, dtype=dtype, device="cuda")
    odd = torch.zeros(1000, 1033, dtype=dtype, device="cuda")[:, 1:1031]
    odd.copy_(x)
    _, w, _, a, bb = _cuda(make_inputs(1000, 1030, 64, 16, dtype, adapter_dtype=torch.float32))
    s1 = tr.forward(x, w, None, a, bb, 1.0, 0.1, 11)[1]
    s2 = tr.forward(odd, w, None, a, bb, 1.0, 0.1, 11)[1]
    assert torch.equal(s1[:, 16:], s2[:, 16:])
    torch.testing.assert_close(s1[:, :16], s2[:, :16], rtol=1e-5, atol=1e-5)
    assert torch.equal(drop.unpack_keep(s1, 16, 1030).cpu(), philox_keep(1000, 1030, 0.1, 11))


def test_bitwise_repeatable():
    """No atomics: the same inputs give the same bits, forward and backward."""
    inputs = _cuda(make_inputs(2048, 1024, 1024, 16, torch.bfloat16, adapter_dtype=torch.float32))
    x, w, b, a, bb = inputs
    y1, s1 = tr.forward(x, w, b, a, bb, 2.0, 0.1, 5)
    y2, s2 = tr.forward(x, w, b, a, bb, 2.0, 0.1, 5)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    dy = torch.randn_like(y1)
    g1 = tr.backward(dy, x, w, a, bb, s1, 2.0, 0.1, 5, ALL)
    g2 = tr.backward(dy, x, w, a, bb, s1, 2.0, 0.1, 5, ALL)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)


def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.fn.device_caches.values())


def test_seed_does_not_recompile():
    """Seeds 16 (divisible by 16), 17 and one above 2**32: one compiled shrink."""
    x, w, b, a, bb = _cuda(make_inputs(256, 512, 256, 16, torch.bfloat16))
    tr.forward(x, w, b, a, bb, 1.0, 0.1, 17)
    before = _compiled_variants(tr.KERNELS["shrink"])
    for seed in (16, 2**40 + 16, 1, 2**64 - 1):
        tr.forward(x, w, b, a, bb, 1.0, 0.1, seed)
    assert _compiled_variants(tr.KERNELS["shrink"]) == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_inputs_gpu():
    torch.cuda.set_device(0)
    inputs = [t.to("cuda:1") if t is not None else None
              for t in make_inputs(300, 256, 128, 8, torch.bfloat16)]
    _run(inputs, 1.0, 0.1, 3)
