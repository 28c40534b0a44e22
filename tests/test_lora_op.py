"""The public lora_linear op: custom-op registration (opcheck, torch.compile), leading dims and
fan_in_fan_out, dropout semantics, argument errors and backend selection."""

import importlib

import pytest
import torch
from lora_helpers import backend_module, check_against_reference, make_inputs, mask_of

import lora_kernels
from lora_kernels import lora_linear

op_module = importlib.import_module("lora_kernels.ops.lora_linear")
BACKENDS = ["torch", "triton"]


def _leaves(inputs, needs=(True,) * 5):
    return [None if t is None else t.detach().clone().requires_grad_(n)
            for t, n in zip(inputs, needs)]


def _grads(leaves):
    return [None if t is None or not t.requires_grad else t.grad for t in leaves]


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,bias,adapter_dtype", [(0.0, True, torch.float32), (0.25, False, torch.float32),
                                                  (0.25, True, torch.float64)])
def test_opcheck_forward(backend, p, bias, adapter_dtype):
    dtype = torch.float32 if backend == "triton" or adapter_dtype != torch.float64 else torch.float64
    if backend == "triton" and adapter_dtype == torch.float64:
        pytest.skip("Triton serves no float64")
    x, w, b, a, bb = _leaves(make_inputs(5, 8, 6, 3, dtype, adapter_dtype=adapter_dtype, bias=bias))
    torch.library.opcheck(op_module._lora_linear_op, (x, w, b, a, bb, 0.5, p, 7, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_and_transposed_weight(backend):
    x, w, b, a, bb = make_inputs(5, 8, 6, 3, torch.float32, transposed_w=True)
    x.requires_grad_()
    torch.library.opcheck(op_module._lora_linear_op, (x, w, b, a.requires_grad_(), bb, 2.0, 0.0, 0, backend))
    _, s = op_module._lora_linear_op(x, w, b, a, bb, 2.0, 0.0, 0, backend)
    dy = torch.randn(5, 6)
    torch.library.opcheck(op_module._lora_linear_backward_op,
                          (dy, x.detach(), w, a.detach(), bb, s, 2.0, 0.0, 0,
                           [True, False, True, True, False], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    inputs = make_inputs(2 * 5, 8, 6, 3, torch.float32)
    x, w, b, a, bb = _leaves(inputs, (True, False, False, True, True))
    x3 = x.view(2, 5, 8)

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 0.5, 0.2, seed=3, backend=backend).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x3, w, b, a, bb).backward()
    got = [x.grad.clone(), a.grad.clone(), bb.grad.clone()]
    for t in (x, a, bb):
        t.grad = None
    f(x3, w, b, a, bb).backward()
    for g, want in zip(got, [x.grad, a.grad, bb.grad]):
        torch.testing.assert_close(g, want)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_three_d_input_against_formula(backend, fan_in_fan_out, weight_trainable):
    lead, in_f, out_f, r, p = (3, 7), 48, 5, 8, 0.3
    inputs = make_inputs(21, in_f, out_f, r, torch.float32, lead=lead, transposed_w=fan_in_fan_out)
    needs = (True, weight_trainable, weight_trainable, True, True)
    x, w, b, a, bb = _leaves(inputs, needs)
    w_arg = w.t() if fan_in_fan_out else w  # stored (in, out) when fan_in_fan_out
    w_leaf = w_arg.detach().clone().requires_grad_(weight_trainable)
    y = lora_linear(x, w_leaf, b, a, bb, 1.5, p, fan_in_fan_out=fan_in_fan_out, seed=77,
                    backend=backend)
    assert y.shape == (*lead, out_f)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = mask_of(backend, 21, in_f, p, 77)
    dw = None if w_leaf.grad is None else (w_leaf.grad.t() if fan_in_fan_out else w_leaf.grad)
    flat = [inp.reshape(21, in_f) if i == 0 else inp for i, inp in enumerate(inputs)]
    got = [y.detach().reshape(21, out_f), x.grad.reshape(21, in_f), dw, b.grad, a.grad, bb.grad]
    check_against_reference(got, flat, 1.5, dy.reshape(21, out_f), keep, p, needs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_adapters_over_half_base(backend, dtype):
    inputs = make_inputs(13, 24, 10, 4, dtype, adapter_dtype=torch.float32)
    x, w, b, a, bb = _leaves(inputs, (True, False, False, True, True))
    y = lora_linear(x, w, b, a, bb, 2.0, backend=backend)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    assert a.grad.dtype == torch.float32 and x.grad.dtype == dtype
    check_against_reference([y.detach(), x.grad, None, None, a.grad, bb.grad], inputs, 2.0, dy,
                            None, 0.0, (True, False, False, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_base_in_autocast_dtype(backend):
    """Under autocast the base matmul runs in the autocast dtype, as F.linear's would (inputs
    cast, adapters kept), and the backward, even inside the autocast region, still works."""
    inputs = make_inputs(13, 24, 10, 4, torch.float32)
    x, w, b, a, bb = _leaves(inputs, (True, False, False, True, True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 2.0, 0.2, seed=5, backend=backend)
        assert y.dtype == torch.bfloat16
        dy = torch.randn_like(y)
        y.backward(dy)
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    cast = [t.detach().to(torch.bfloat16) for t in inputs[:3]] + list(inputs[3:])
    keep = mask_of(backend, 13, 24, 0.2, 5)
    check_against_reference([y.detach(), x.grad.to(torch.bfloat16), None, None, a.grad, bb.grad],
                            cast, 2.0, dy, keep, 0.2, (True, False, False, True, True))


def test_frozen_everything_but_adapters_gives_no_base_grads():
    x, w, b, a, bb = _leaves(make_inputs(4, 6, 5, 2, torch.float32), (False, False, False, True, True))
    lora_linear(x, w, b, a, bb, 1.0, 0.1, seed=1).sum().backward()
    assert x.grad is None and w.grad is None and b.grad is None
    assert a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, a, bb = _leaves(make_inputs(1, 6, 5, 2, torch.float32))
    y = lora_linear(x[:0], w, b, a, bb, 1.0, 0.5, seed=1, backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    for t in (w, b, a, bb):
        assert t.grad is not None and not t.grad.any()


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_fraction_near_p(backend):
    for p in (0.1, 0.5):
        frac = 1 - mask_of(backend, 50, 200, p, 31).float().mean().item()
        assert abs(frac - p) < 0.025, (backend, p, frac)  # 10000 draws: sigma <= 0.005


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_semantics(backend):
    inputs = make_inputs(9, 32, 7, 4, torch.float32)

    def run(**kw):
        return lora_linear(*inputs, 1.0, 0.4, backend=backend, **kw)

    assert torch.equal(run(seed=5), run(seed=5))
    assert not torch.equal(run(seed=5), run(seed=6))
    no_mask = lora_linear(*inputs, 1.0, 0.0, backend=backend)
    assert torch.equal(run(seed=5, training=False), no_mask)
    assert torch.equal(lora_linear(*inputs, 1.0, 0.0, seed=1, backend=backend),
                       lora_linear(*inputs, 1.0, 0.0, seed=2, backend=backend))
    torch.manual_seed(3)
    first = run()
    torch.manual_seed(3)
    assert torch.equal(first, run())  # seed=None draws from torch's default generator
    assert not torch.equal(run(), run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_use_one_mask(backend):
    """Gradients match the formula under the mask read from the forward's own output."""
    inputs = make_inputs(11, 16, 9, 16, torch.float32, bias=False)
    x, w, b, a, bb = inputs
    eye_a = torch.eye(16).requires_grad_()
    # the same seed with A = I exposes the mask in y (B = I-like selection, scaling 1, W = 0)
    y_mask = lora_linear(torch.ones(11, 16), torch.zeros(16, 16), None, eye_a.detach(),
                         torch.eye(16), 1.0, 0.5, seed=9, backend=backend)
    keep = y_mask != 0
    leaves = _leaves(inputs)
    y = lora_linear(*leaves, 1.0, 0.5, seed=9, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    check_against_reference([y.detach(), *_grads(leaves)], inputs, 1.0, dy, keep, 0.5)


# ----------------------------------------------------------------------------- errors


def _ok():
    return list(make_inputs(4, 6, 5, 2, torch.float32))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.__setitem__(0, [1.0] * 6), TypeError, "x: expected a torch.Tensor"),
    (lambda a: a.__setitem__(0, torch.ones(4, 6, dtype=torch.int64)), TypeError, "x: expected dtype"),
    (lambda a: a.__setitem__(0, torch.ones(4, 7)), ValueError, "x: expected last dim"),
    (lambda a: a.__setitem__(1, torch.ones(5, 6, 1)), ValueError, "weight: expected a 2-D"),
    (lambda a: a.__setitem__(1, torch.ones(5, 6, dtype=torch.float64)), TypeError, "weight: expected x's dtype"),
    (lambda a: a.__setitem__(2, torch.ones(4)), ValueError, "bias: expected length = out_features = 5"),
    (lambda a: a.__setitem__(2, torch.ones(5, 1)), ValueError, "bias: expected a 1-D"),
    (lambda a: a.__setitem__(2, torch.ones(5, dtype=torch.float16)), TypeError, "bias: expected x's dtype"),
    (lambda a: a.__setitem__(3, torch.ones(2, 7)), ValueError, r"lora_A: expected shape\[1\]"),
    (lambda a: a.__setitem__(3, torch.ones(0, 6)), ValueError, "lora_A: expected rank r >= 1"),
    (lambda a: a.__setitem__(3, torch.ones(2, 6, 1)), ValueError, "lora_A: expected a 2-D"),
    (lambda a: a.__setitem__(4, torch.ones(5, 3)), ValueError, r"lora_B: expected shape \(out, r\) = \(5, 2\)"),
    (lambda a: a.__setitem__(4, torch.ones(5, 2, dtype=torch.float64)), TypeError, "lora_B: expected lora_A's dtype"),
    (lambda a: a.__setitem__(4, torch.ones(5, 2, dtype=torch.int32)), TypeError, "lora_B: expected dtype"),
    (lambda a: a.__setitem__(1, torch.ones(5, 6, device="meta")), ValueError, "one device"),
])
def test_bad_tensors_raise(mutate, exc, match):
    args = _ok()
    mutate(args)
    with pytest.raises(exc, match=match):
        lora_linear(*args, 1.0)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"dropout_p": 1.0}, ValueError, r"dropout_p: expected a value in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p"),
    ({"scaling": "2"}, TypeError, "scaling: expected a real number"),
    ({"scaling": float("nan")}, ValueError, "scaling: expected a finite"),
    ({"training": 1}, TypeError, "training: expected a bool"),
    ({"seed": 1.5}, TypeError, "seed: expected an int"),
    ({"backend": "fast"}, ValueError, "unknown backend 'fast'"),
])
def test_bad_scalars_raise(kwargs, exc, match):
    x, w, b, a, bb = _ok()
    kw = {"scaling": 1.0, **kwargs}
    with pytest.raises(exc, match=match):
        lora_linear(x, w, b, a, bb, **kw)


def test_fan_in_fan_out_layout_error_names_the_layout():
    x, w, b, a, bb = _ok()  # w is (out=5, in=6): wrong for fan_in_fan_out
    with pytest.raises(ValueError, match=r"weight \(in, out\) \[fan_in_fan_out=True\]"):
        lora_linear(x, w, b, a, bb, 1.0, fan_in_fan_out=True)


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x, w, b, a, bb = make_inputs(4, 6, 5, 2, torch.float64)
    with pytest.raises(ValueError) as info:
        lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    text = str(info.value)
    assert "triton: " in text and "float64" in text and "torch: supported" in text and "cuda: " in text
    with pytest.raises(ValueError, match="cuda: "):
        lora_linear(*_ok(), 1.0, backend="cuda")


def test_set_backend_and_env_choose_triton(monkeypatch):
    calls = []
    tr = importlib.import_module("lora_kernels.triton.lora_linear")
    real = tr.forward
    monkeypatch.setattr(tr, "forward", lambda *a: calls.append(1) or real(*a))
    lora_kernels.set_backend("triton")
    lora_linear(*_ok(), 1.0)
    assert calls == [1]
    lora_kernels.set_backend(None)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    lora_linear(*_ok(), 1.0)
    assert calls == [1, 1]
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    lora_linear(*_ok(), 1.0)  # auto on CPU: torch
    assert calls == [1, 1]


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_x_and_s_only(backend):
    """No dropped copy of x is kept for the backward: besides x and the parameters, the only
    saved tensor is s (T, r); the triton backend's s also carries the dropout mask packed to
    bits (in / 8 bytes per row, see lora_kernels/triton/lora_dropout.py)."""
    T, in_f, out_f, r = 33, 40, 24, 4
    x, w, b, a, bb = _leaves(make_inputs(T, in_f, out_f, r, torch.float32), (True, False, False, True, True))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 1.0, 0.3, seed=4, backend=backend)
    big = [t for t in saved if t.numel() >= T * min(in_f, out_f)]
    assert all(t.data_ptr() == x.data_ptr() or t is w for t in big), [tuple(t.shape) for t in big]
    cols = r if backend != "triton" else backend_module("triton").saved_s_columns(in_f, r, 0.3)
    assert sum(t.shape == (T, cols) for t in saved) == 1
    y.sum().backward()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_compile_fullgraph_inductor(backend):
    """torch.compile (inductor) through the op on CUDA tensors, bf16 base with fp32 adapters:
    equal to eager with the same seed."""
    torch._dynamo.reset()
    inputs = [t.cuda() for t in make_inputs(512, 256, 384, 16, torch.bfloat16, adapter_dtype=torch.float32)]
    x, w, b, a, bb = _leaves(inputs, (True, False, False, True, True))

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=11, backend=backend).float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    compiled(x, w, b, a, bb).backward()
    got = [x.grad.clone(), a.grad.clone(), bb.grad.clone()]
    for t in (x, a, bb):
        t.grad = None
    f(x, w, b, a, bb).backward()
    for g, want in zip(got, [x.grad, a.grad, bb.grad]):
        torch.testing.assert_close(g, want, rtol=2e-2, atol=1e-4)
