"""The torch backend of lora_linear (forward + hand-written backward) against float64 autograd of
the plain formula, with the dropout mask it regenerates from the seed."""

import pytest
import torch
from lora_helpers import check_against_reference, formula_grads, make_inputs, mask_of

from lora_kernels.reference import lora_linear as ref

DTYPE_PAIRS = [  # (x dtype, adapter dtype)
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
SHAPES = [(1, 5, 48, 1), (7, 123, 5, 8), (97, 48, 123, 64), (13, 33, 17, 4)]


def _run(inputs, scaling, p, seed, dy, needs=(True,) * 5):
    x, w, b, a, bb = inputs
    y, s = ref.forward(x, w, b, a, bb, scaling, p, seed)
    grads = ref.backward(dy, x, w, a, bb, s, scaling, p, seed, needs)
    return y, s, list(grads)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("T,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_backward_match_float64_formula(dtypes, T, in_f, out_f, r, p):
    dtype, adt = dtypes
    inputs = make_inputs(T, in_f, out_f, r, dtype, adapter_dtype=adt, bias=T % 2 == 1,
                         transposed_w=in_f == 123, strided_x=T == 97)
    dy = torch.randn(T, out_f, dtype=dtype)
    y, s, grads = _run(inputs, 0.75, p, 1234, dy)
    keep = mask_of("torch", T, in_f, p, 1234)
    if inputs[2] is None:
        grads[2] = None
    check_against_reference([y, *grads], inputs, 0.75, dy, keep, p)
    assert s.dtype == torch.float32


def test_float64_is_exact_to_rounding():
    inputs = make_inputs(11, 19, 23, 5, torch.float64)
    dy = torch.randn(11, 23, dtype=torch.float64)
    y, s, grads = _run(inputs, 2.0, 0.25, 7, dy)
    keep = mask_of("torch", 11, 19, 0.25, 7)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y64 = ref.lora_linear_formula(*leaves, 2.0, keep=keep, dropout_p=0.25)  # the module's own oracle
    y64.backward(dy)
    assert s.dtype == torch.float64
    for got, want in zip([y, *grads], [y64.detach(), *(t.grad for t in leaves)]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("needs", [(False, False, False, True, True), (True, False, False, True, True),
                                   (True, True, True, False, False), (False, True, False, False, True)])
def test_only_needed_gradients_are_computed(needs):
    inputs = make_inputs(9, 12, 10, 3, torch.float32)
    dy = torch.randn(9, 10)
    _, _, grads = _run(inputs, 0.5, 0.2, 3, dy, needs)
    keep = mask_of("torch", 9, 12, 0.2, 3)
    want = formula_grads(inputs, 0.5, dy, keep, 0.2, torch.float64, needs)[1:]
    for need, g, w in zip(needs, grads, want):
        assert (g is None) == (not need)
        if need:
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_mask_spans_several_chunks(monkeypatch):
    """With small chunks the mask is drawn chunk by chunk; forward and backward agree."""
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 40)  # 40 // 13 = 3 rows per chunk
    inputs = make_inputs(10, 13, 6, 2, torch.float32)
    dy = torch.randn(10, 6)
    y, s, grads = _run(inputs, 1.5, 0.4, 99, dy)
    keep = mask_of("torch", 10, 13, 0.4, 99)
    chunks = keep.split(3)
    assert not all(torch.equal(chunks[0], c) for c in chunks[1:3])  # not one chunk's mask repeated
    check_against_reference([y, *grads], inputs, 1.5, dy, keep, 0.4)


def test_s_is_dropped_input_times_A_transpose():
    x, w, b, a, bb = make_inputs(8, 16, 4, 3, torch.float32)
    _, s = ref.forward(x, w, b, a, bb, 1.0, 0.5, 5)
    keep = mask_of("torch", 8, 16, 0.5, 5)
    torch.testing.assert_close(s, (x * keep / 0.5) @ a.t())


def test_no_dropout_ignores_the_seed():
    inputs = make_inputs(6, 8, 5, 2, torch.float32)
    y1, _ = ref.forward(*inputs, 1.0, 0.0, 1)
    y2, _ = ref.forward(*inputs, 1.0, 0.0, 2)
    assert torch.equal(y1, y2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=["bf16-fp32", "fp32-fp32"])
def test_torch_backend_on_cuda(dtypes):
    """auto picks the torch backend on CUDA until a kernel backend passed the GPU check."""
    dtype, adt = dtypes
    T, in_f, out_f, r, p = 3000, 1536, 768, 16, 0.1
    inputs = [t.cuda() if t is not None else None
              for t in make_inputs(T, in_f, out_f, r, dtype, adapter_dtype=adt)]
    dy = torch.randn(T, out_f, dtype=dtype, device="cuda")
    y, s, grads = _run(inputs, 2.0, p, 17, dy)
    keep = mask_of("torch", T, in_f, p, 17, device="cuda")
    check_against_reference([y, *grads], inputs, 2.0, dy, keep, p)


# ----------------------------------------------------------------------------- the CUDA path
# The CUDA path (bernoulli_ masks, one-kernel mixed-dtype updates) run on CPU tensors.


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(ref, "DEVICE_PATH_ON_CPU", True)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 300)  # several chunks at test sizes


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_device_path_matches_float64_formula(device_path, dtypes, p):
    dtype, adt = dtypes
    T, in_f, out_f, r = 37, 48, 23, 8
    inputs = make_inputs(T, in_f, out_f, r, dtype, adapter_dtype=adt, transposed_w=True)
    dy = torch.randn(T, out_f, dtype=dtype)
    y, s, grads = _run(inputs, 0.75, p, 1234, dy)
    keep = mask_of("torch", T, in_f, p, 1234)
    check_against_reference([y, *grads], inputs, 0.75, dy, keep, p)
    if p:
        chunks = keep.split(300 // in_f)
        assert not torch.equal(chunks[0], chunks[1])  # not one chunk's mask repeated


def test_device_path_mask_is_bernoulli_and_differs_from_cpu_stream(device_path, monkeypatch):
    keep = mask_of("torch", 60, 200, 0.25, 31)
    assert abs((1 - keep.float().mean().item()) - 0.25) < 0.025  # 12000 draws: sigma 0.004
    monkeypatch.setattr(ref, "DEVICE_PATH_ON_CPU", False)
    assert not torch.equal(keep, mask_of("torch", 60, 200, 0.25, 31))


def _aten_calls(fn):
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_device_path_runs_gemms_and_few_elementwise_kernels(device_path):
    """Forward and backward: dense GEMMs, one bernoulli_ per chunk of x and a handful of
    elementwise passes per chunk; no matmul/linear/dropout ops, no CPU mask arithmetic."""
    T, in_f, out_f, r, p = 40, 30, 20, 4, 0.2
    x, w, b, a, bb = make_inputs(T, in_f, out_f, r, torch.bfloat16, adapter_dtype=torch.float32)
    dy = torch.randn(T, out_f, dtype=torch.bfloat16)
    chunks = -(-T // (300 // in_f))
    state = {}

    def fwd():
        state["y"], state["s"] = ref.forward(x, w, b, a, bb, 2.0, p, 5)

    def bwd():
        ref.backward(dy, x, w, a, bb, state["s"], 2.0, p, 5, (True, False, False, True, True))

    allowed = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bernoulli_", "aten::mul_",
               "aten::addcmul_", "aten::add_", "aten::zeros_like", "aten::zero_", "aten::fill_",
               "aten::copy_", "aten::to", "aten::_to_copy", "aten::empty", "aten::empty_like",
               "aten::empty_strided", "aten::slice", "aten::t", "aten::transpose",
               "aten::as_strided", "aten::expand", "aten::resolve_conj", "aten::resolve_neg",
               "aten::view", "aten::lift_fresh", "aten::detach", "aten::alias",
               "aten::promote_types", "aten::mul"}
    for fn in (fwd, bwd):
        calls = _aten_calls(fn)
        assert set(calls) <= allowed, sorted(set(calls) - allowed)
        assert calls.count("aten::bernoulli_") == chunks
        elementwise = sum(calls.count(n) for n in ("aten::mul_", "aten::addcmul_", "aten::add_"))
        assert elementwise <= 3 * chunks + 1
