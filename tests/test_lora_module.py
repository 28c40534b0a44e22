"""LoRALinear against PEFT's LoRA layer given the same weights (nn.Linear and GPT-2's Conv1D),
merge/unmerge/to_linear round trips, fp32 adapters over a bf16 base, extra_repr."""

import copy

import pytest
import torch
from helpers import assert_close_to_reference
from torch import nn

from lora_kernels.nn import LoRALinear

peft_lora = pytest.importorskip("peft.tuners.lora")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _peft_layer(base, r, alpha, dropout=0.0, fan_in_fan_out=False, use_rslora=False):
    cfg = peft_lora.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False,
                               fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
    return peft_lora.Linear(base, "default", config=cfg, r=r, lora_alpha=alpha,
                            is_target_conv_1d_layer=fan_in_fan_out, use_rslora=use_rslora)


def _pair(kind, in_f, out_f, r, alpha, dtype=torch.float32, use_rslora=False, backend="auto"):
    """(ours, peft's) wrapping equal copies of one base layer, with PEFT's adapter weights
    copied into ours; adapters in fp32 over a half base, as PEFT's get_peft_model keeps them."""
    base = nn.Linear(in_f, out_f) if kind == "linear" else Conv1D(out_f, in_f)
    base = base.to(dtype)
    theirs = _peft_layer(copy.deepcopy(base), r, alpha, fan_in_fan_out=kind == "conv1d",
                         use_rslora=use_rslora)
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()
    ours = LoRALinear.from_linear(base, r=r, lora_alpha=alpha, use_rslora=use_rslora,
                                  init_lora_weights=False, backend=backend)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    return ours, theirs


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_peft_output_and_gradients(kind, use_rslora, backend):
    ours, theirs = _pair(kind, 24, 17, 4, 8, use_rslora=use_rslora, backend=backend)
    assert ours.scaling == theirs.scaling["default"]
    x = torch.randn(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.weight.grad is None and not ours.weight.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_adapters_over_bf16_base_match_peft(backend):
    ours, theirs = _pair("linear", 32, 20, 8, 16, dtype=torch.bfloat16, backend=backend)
    assert ours.lora_A.dtype == torch.float32 and ours.weight.dtype == torch.bfloat16
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    # float64 reference of PEFT's formula; PEFT's own bf16 result is the baseline
    w, b = ours.weight.detach().double(), ours.bias.detach().double()
    a, bb = ours.lora_A.detach().double(), ours.lora_B.detach().double()
    x64 = x.double().requires_grad_()
    a64, b64 = a.clone().requires_grad_(), bb.clone().requires_grad_()
    y64 = x64 @ w.t() + b + ours.scaling * (x64 @ a64.t()) @ b64.t()
    dy = torch.randn_like(y1)
    for y in (y1, y2, y64):
        y.backward(dy.to(y.dtype))
    assert_close_to_reference(y1, y64, y2, "y")
    assert_close_to_reference(x1.grad, x64.grad, x2.grad, "dx")
    assert_close_to_reference(ours.lora_A.grad, a64.grad, theirs.lora_A["default"].weight.grad, "dA")
    assert_close_to_reference(ours.lora_B.grad, b64.grad, theirs.lora_B["default"].weight.grad, "dB")


def test_dropout_in_training_only():
    base = nn.Linear(16, 8)
    layer = LoRALinear.from_linear(base, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(6, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh seed per call
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    plain = base(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(y_eval, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge_to_linear_round_trip(kind, dtype):
    base = (nn.Linear(20, 12) if kind == "linear" else Conv1D(12, 20)).to(dtype)
    w0 = base.weight.detach().clone()
    keys = set(base.state_dict())
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False).eval()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert {"weight", "bias"} <= set(layer.state_dict())
    x = torch.randn(5, 20, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(layer(x), y, **tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, **tol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    plain = layer.to_linear()
    assert plain is base and set(plain.state_dict()) == keys and layer.merged
    torch.testing.assert_close(plain(x), y, **tol)


def test_to_linear_without_original_builds_a_linear():
    w = nn.Parameter(torch.randn(6, 10), requires_grad=False)
    layer = LoRALinear(w, None, r=2, init_lora_weights=False)
    x = torch.randn(3, 10)
    y = layer(x)
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight is w and lin.bias is None
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)


def test_init_modes():
    base = nn.Linear(10, 6)
    layer = LoRALinear.from_linear(base, r=2)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    layer.reset_lora_parameters("gaussian")
    assert torch.all(layer.lora_B == 0) and 0.2 < layer.lora_A.std().item() < 0.8
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.reset_lora_parameters("pissa")


def test_bad_construction_raises():
    with pytest.raises(TypeError, match="expected nn.Linear or Conv1D"):
        LoRALinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="r: expected a positive int"):
        LoRALinear.from_linear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(nn.Linear(4, 4), lora_dropout=1.0)
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear.from_linear(LoRALinear.from_linear(nn.Linear(4, 4)))


def test_extra_repr():
    layer = LoRALinear.from_linear(nn.Linear(10, 6).to(torch.bfloat16), r=2, lora_alpha=4,
                                   lora_dropout=0.1, use_rslora=True)
    text = repr(layer)
    for part in ("in_features=10", "out_features=6", "r=2", "lora_alpha=4", "rslora",
                 "lora_dropout=0.1", "bias=True", "fan_in_fan_out=False", "adapter_dtype=float32",
                 "merged=False", f"scaling={4 / 2**0.5:.4g}"):
        assert part in text, (part, text)
