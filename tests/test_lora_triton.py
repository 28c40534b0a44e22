"""The Triton kernels of lora_linear against the float64 formula in Triton's interpreter (CPU),
the dropout mask's definition, and the launch hygiene a GPU needs (device guard, grid layout,
autotune keys, seed specialisation). GPU runs at realistic sizes: test_lora_triton_gpu.py."""

import contextlib

import pytest
import torch
from helpers import DTYPES
from lora_helpers import backend_module, check_against_reference, make_inputs, mask_of, philox_keep

from lora_kernels.triton import _common
from lora_kernels.triton import lora_dropout as drop

tr = backend_module("triton")

ALL = (True,) * 5
FROZEN_W = (True, False, False, True, True)
ONLY_ADAPTERS = (False, False, False, True, True)
# (T, in, out, r, bias, transposed weight (fan_in_fan_out), strided x, dropout p, needs): every
# value of every axis appears, in odd combinations, rather than the full cross product.
CASES = [
    (1, 5, 48, 1, True, False, False, 0.0, FROZEN_W),
    (5, 123, 5, 7, False, True, False, 0.3, ALL),
    (97, 48, 37, 16, True, False, True, 0.3, FROZEN_W),
    (5, 48, 123, 1, True, True, True, 0.0, ALL),
    (97, 37, 48, 7, False, False, False, 0.1, ONLY_ADAPTERS),
    (1, 123, 37, 16, True, False, True, 0.3, ALL),
]


def _run_and_check(inputs, scaling, p, seed, needs, dtype, T, out_f, in_f):
    x, w, b, a, bb = inputs
    y, s = tr.forward(x, w, b, a, bb, scaling, p, seed)
    assert s.dtype == torch.float32 and s.shape == (T, tr.saved_s_columns(in_f, a.shape[0], p))
    assert torch.isfinite(s).all()  # the mask words too: torch.compile may compare s
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
@pytest.mark.parametrize("p,tw", [(0.0, False), (0.3, True)])
def test_fp32_adapters_over_half_base(dtype, p, tw):
    """PEFT's default: split-precision tensor-core dots must give fp32-accurate dA, dB."""
    inputs = make_inputs(29, 40, 37, 7, dtype, adapter_dtype=torch.float32, bias=True,
                         transposed_w=tw)
    _run_and_check(inputs, 2.0, p, 11, ALL, dtype, 29, 37, 40)


def test_rank_256_in_chunks():
    """Ranks above 64 run in chunks of 64 (grid and prologue loop)."""
    inputs = make_inputs(5, 40, 24, 256, torch.bfloat16, adapter_dtype=torch.float32, bias=False)
    _run_and_check(inputs, 1 / 16, 0.1, 3, ALL, torch.bfloat16, 5, 24, 40)


def test_split_partials_are_summed(monkeypatch):
    """Several dS/dB column groups and dA row chunks (its own pass, when x needs no gradient)
    or row blocks (fused into the dX GEMM): the fixed-order partial sums, no atomics."""
    inputs = make_inputs(40, 24, 150, 3, torch.float32, bias=False)
    for needs in (ONLY_ADAPTERS, ALL):
        with _recorded_launches(monkeypatch) as launches:
            _run_and_check(inputs, 0.5, 0.2, 9, needs, torch.float32, 40, 150, 24)
        args = {name: a for name, _, a, _ in launches}
        assert args["ds_db"]["N_GROUPS"] > 1
        if needs[0]:
            assert args["dx"]["FUSE_DA"] and "da" not in args and 40 > tr.DA_BLOCK_M
        else:
            assert args["da"]["N_SPLIT"] > 1


def test_rank_above_fused_da_limit():
    """dA in its own pass beside the dX GEMM (rank > FUSE_DA_MAX_RANK)."""
    inputs = make_inputs(37, 40, 24, 33, torch.bfloat16, adapter_dtype=torch.float32)
    _run_and_check(inputs, 0.5, 0.1, 3, ALL, torch.bfloat16, 37, 24, 40)


def test_broadcast_gradient_with_zero_strides():
    """dY from y.sum().backward() is an expanded tensor (strides 0): no TMA, pointer loads."""
    x, w, b, a, bb = make_inputs(9, 20, 7, 4, torch.float32)
    y, s = tr.forward(x, w, b, a, bb, 1.0, 0.0, 0)
    dy = torch.ones(()).expand(9, 7)
    dx, dw, db, da, dB = tr.backward(dy, x, w, a, bb, s, 1.0, 0.0, 0, ALL)
    torch.testing.assert_close(dx, torch.ones(9, 7) @ (w + bb @ a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dB, torch.ones(7, 9) @ s, rtol=1e-4, atol=1e-4)


def test_strided_and_expanded_bias():
    """A bias that is a strided view or an expanded scalar (stride 0) is read by its strides."""
    x, w, _, a, bb = make_inputs(9, 20, 7, 4, torch.bfloat16)
    bf16 = torch.bfloat16
    for b in (torch.randn(14, dtype=bf16)[::2], torch.randn(1, dtype=bf16).expand(7)):
        _run_and_check((x, w, b, a, bb), 0.5, 0.0, 0, ALL, torch.bfloat16, 9, 7, 20)


def test_empty_rows_and_columns():
    x, w, b, a, bb = make_inputs(0, 8, 6, 3, torch.float32)
    y, s = tr.forward(x, w, b, a, bb, 1.0, 0.5, 1)
    dx, dw, db, da, dB = tr.backward(torch.zeros(0, 6), x, w, a, bb, s, 1.0, 0.5, 1, ALL)
    assert y.shape == (0, 6) and dx.shape == (0, 8)
    assert torch.equal(da, torch.zeros_like(a)) and torch.equal(dB, torch.zeros_like(bb))
    x, w, b, a, bb = make_inputs(4, 8, 0, 3, torch.float32, bias=False)
    y, s = tr.forward(x, w, b, a, bb, 1.0, 0.5, 1)
    dx, _, _, da, dB = tr.backward(torch.zeros(4, 0), x, w, a, bb, s, 1.0, 0.5, 1, ALL)
    assert y.shape == (4, 0) and torch.equal(dx, torch.zeros(4, 8)) and dB.shape == (0, 3)
    assert torch.equal(da, torch.zeros_like(a))


# ----------------------------------------------------------------------------- dropout mask


def test_mask_is_its_definition():
    """Stored bits == the mask applied == Philox4x32-10 computed independently in numpy."""
    for T, in_f, p, seed in [(5, 37, 0.3, 2**40 + 123), (3, 130, 0.1, 2**64 - 1), (2, 8, 0.5, 16)]:
        assert torch.equal(mask_of("triton", T, in_f, p, seed), philox_keep(T, in_f, p, seed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pairs_path_equals_the_elementwise_path(monkeypatch, dtype):
    """A 16-bit x with unit column stride and even row stride and width is read as 32-bit
    pairs, each masked by one AND (PAIRS); any other x selects element by element. Same x,
    two layouts: the same S and the same stored bits, bit for bit."""
    T, in_f, r = 37, 70, 5  # 70: a partial last column block (the masked edge step)
    x = torch.randn(T, in_f, dtype=dtype)
    odd = torch.zeros(T, in_f + 3, dtype=dtype)[:, 1:1 + in_f]  # row stride 73
    odd.copy_(x)
    w, _, a, bb = make_inputs(T, in_f, 3, r, dtype, adapter_dtype=torch.float32)[1:]
    outs = []
    for xv in (x, odd):
        with _recorded_launches(monkeypatch) as launches:
            outs.append(tr.forward(xv, w, None, a, bb, 1.0, 0.3, 77)[1])
        shrink = [args for name, _, args, _ in launches if name == "shrink"]
        outs.append(shrink[0]["PAIRS"])
    assert outs[1] is True and outs[3] is False
    assert torch.equal(outs[0], outs[2])


def test_mask_words_are_floats_in_half_to_two():
    """The saved mask words: keep bits in bytes 0 and 2, constants 0x00 and 0x3F in bytes 1
    and 3, so every word is a finite float in [0.5, 2) (s may be compared by torch.compile)."""
    x, w, _, a, bb = make_inputs(9, 100, 4, 3, torch.bfloat16)
    _, s = tr.forward(x, w, None, a, bb, 1.0, 0.5, 3)
    first, count = drop.mask_columns(100, 3)
    words = s[:, first:first + count]
    bits = words.contiguous().view(torch.int32)
    assert torch.all((bits >> 8) & 0xFF == 0) and torch.all((bits >> 24) & 0xFF == 0x3F)
    assert torch.all((words >= 0.5) & (words < 2.0))
    assert ((bits & 0xFF) != 0).any() and ((bits & 0xFF0000) != 0).any()


def test_threshold_stays_below_65536():
    """The high half is compared as a word against t << 16: t is capped at 65535 (the drop
    probability at most 1 - 2^-16), and the kernels draw the definition at the cap."""
    assert drop.threshold(0.1) == 6554 and drop.threshold(1 - 2**-20) == 65535
    p = 1 - 2**-18
    assert torch.equal(mask_of("triton", 3, 24, p, 5), philox_keep(3, 24, p, 5))


def _stored_keep(T, in_f, p, seed):
    """The mask as the forward stores it (rank 1: cheap in the interpreter); test_mask_is_its_
    definition shows these bits are the mask applied."""
    x, w, _, a, bb = make_inputs(T, in_f, 1, 1, torch.bfloat16)
    _, s = tr.forward(x, w, None, a, bb, 1.0, p, seed)
    return drop.unpack_keep(s, 1, in_f)


def test_dropout_fraction_and_scale():
    keep = _stored_keep(64, 256, 0.3, 123)
    frac = 1 - keep.float().mean().item()
    assert abs(frac - 0.3) < 0.015  # 16384 draws: sigma 0.0036
    # every row and column sees dropping (the mask is not constant along an axis)
    assert (~keep).any(0).float().mean() > 0.9 and (~keep).any(1).all()


def test_mask_statistics_of_the_definition():
    """On 2**19 draws of the definition (the kernels draw exactly it, see above): the drop rate,
    and no correlation between the halves of a Philox word, its words, rows (sigma <= 0.004)."""
    keep = philox_keep(512, 1024, 0.1, 2024)
    assert abs((1 - keep.float().mean().item()) - 0.1) < 0.002  # sigma 0.0004
    for a, b in [(keep[:, 0::2], keep[:, 1::2]), (keep[:, 0::8], keep[:, 2::8]),
                 (keep[:, 0::8], keep[:, 7::8]), (keep[0::2], keep[1::2])]:
        corr = torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1]
        assert abs(corr) < 0.02


def test_mask_depends_on_seed_and_element_only():
    m1 = mask_of("triton", 16, 40, 0.5, 7)
    assert torch.equal(m1, mask_of("triton", 16, 40, 0.5, 7))
    assert not torch.equal(m1, mask_of("triton", 16, 40, 0.5, 8))
    # same (row, column) -> same decision, whatever the other sizes
    assert torch.equal(m1[:8], mask_of("triton", 8, 40, 0.5, 7))
    assert torch.equal(m1[:, :33], mask_of("triton", 16, 33, 0.5, 7))


def test_large_seed():
    inputs = make_inputs(6, 9, 5, 2, torch.float32)
    _run_and_check(inputs, 1.0, 0.2, 2**62 + 12345, ALL, torch.float32, 6, 5, 9)


def test_seed_words_are_always_int32():
    """Two i32 launch arguments whatever the seed: no recompilation by the seed's type."""
    for seed in (0, 1, 16, 2**31, 2**32 + 16, 2**62 + 1, 2**64 - 1, -1):
        lo, hi = drop.seed_words(seed)
        assert -(2**31) <= lo < 2**31 and -(2**31) <= hi < 2**31
        assert ((hi & 0xFFFFFFFF) << 32 | (lo & 0xFFFFFFFF)) == seed & (2**64 - 1)


# ----------------------------------------------------------------------------- launch hygiene


def test_seed_and_threshold_not_specialised():
    """Triton specialises int arguments equal to 1 or divisible by 16: a seed of 16 would
    compile the kernel again mid-training (and break CUDA-graph capture)."""
    fn = tr.KERNELS["shrink"].fn
    if hasattr(fn, "params"):  # compiled: the JITFunction's parameters
        names = {p.name for p in fn.params if p.do_not_specialize}
    else:  # the interpreter keeps what triton.jit was given
        names = set(fn.kwargs["do_not_specialize"])
    assert {"seed_lo", "seed_hi", "thr"} <= names


def test_autotune_keys_are_bucketed():
    for name, kernel in tr.KERNELS.items():
        assert "T_KEY" in kernel.keys, name
        assert not {"T", "M"} & set(kernel.keys), f"{name}: exact length in the key"
    assert [_common.pow2_bucket(n) for n in (1, 5, 97, 128, 4097)] == [1, 8, 128, 128, 8192]


@contextlib.contextmanager
def _recorded_launches(monkeypatch, call_through=True):
    """Record (kernel name, grid, arguments by name, device guard's tensor) of every launch."""
    launches, state = [], {"guarded": None}

    @contextlib.contextmanager
    def guard(t):
        state["guarded"] = t
        yield
        state["guarded"] = None

    monkeypatch.setattr(tr, "device_guard", guard)
    for name, kernel in tr.KERNELS.items():
        original = kernel.run

        def run(*args, grid, warmup=False, _name=name, _original=original, _kernel=kernel, **kw):
            meta = {**_kernel.configs[0].kwargs, **kw}
            g = grid(meta) if callable(grid) else grid
            launches.append((_name, tuple(g), {**dict(zip(_kernel.arg_names, args)), **kw},
                             state["guarded"]))
            if call_through:
                return _original(*args, grid=grid, warmup=warmup, **kw)

        monkeypatch.setattr(kernel, "run", run)
    yield launches


def test_every_launch_under_the_inputs_device_guard(monkeypatch):
    x, w, b, a, bb = make_inputs(97, 24, 20, 3, torch.bfloat16)
    with _recorded_launches(monkeypatch) as launches:
        y, s = tr.forward(x, w, b, a, bb, 1.0, 0.1, 5)
        for needs in (ALL, ONLY_ADAPTERS):  # dA fused into the dX GEMM, and on its own
            tr.backward(torch.randn_like(y), x, w, a, bb, s, 1.0, 0.1, 5, needs)
    assert {name for name, *_ in launches} == set(tr.KERNELS)
    for name, _, args, guarded in launches:
        assert guarded is x, f"{name} launched outside the device guard of x"
        assert args["T_KEY"] == 128, f"{name}: T_KEY {args['T_KEY']} is not T = 97's bucket"


def test_device_guard_picks_the_tensors_gpu():
    class OnGpu1:  # stands in for a CUDA tensor: only .device is read
        device = torch.device("cuda", 1)

    assert _common.device_guard(OnGpu1()).idx == 1
    assert isinstance(_common.device_guard(torch.empty(1)), contextlib.nullcontext)


def test_grids_use_axis_0_only_at_huge_sizes(monkeypatch):
    """Shapes far beyond the interpreter's reach, on the meta device (nothing runs): every grid
    is 1-D, below 2**31, so no axis can exceed the 65,535 limit of axes 1 and 2."""
    T, n = 1 << 22, 8192
    dev = "meta"
    x = torch.empty(T, n, dtype=torch.bfloat16, device=dev)
    w = torch.empty(n, n, dtype=torch.bfloat16, device=dev)
    a, bb = torch.empty(256, n, device=dev), torch.empty(n, 256, device=dev)
    with _recorded_launches(monkeypatch, call_through=False) as launches:
        y, s = tr.forward(x, w, None, a, bb, 1.0, 0.1, 5)
        tr.backward(torch.empty_like(y), x, w, a, bb, s, 1.0, 0.1, 5, ALL)
    assert len(launches) == 5
    for name, grid, *_ in launches:
        assert len(grid) == 1 and 0 < grid[0] < 2**31, (name, grid)
        assert all(g <= _common.MAX_GRID_YZ for g in grid[1:])


def test_no_zero_fill_of_what_kernels_write(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("zero-fill of a buffer the kernels overwrite")

    x, w, b, a, bb = make_inputs(33, 24, 20, 3, torch.float16, adapter_dtype=torch.float32)
    monkeypatch.setattr(torch, "zeros", refuse)
    monkeypatch.setattr(torch, "zeros_like", refuse)
    monkeypatch.setattr(torch.Tensor, "zero_", refuse)
    y, s = tr.forward(x, w, b, a, bb, 1.0, 0.1, 5)
    tr.backward(torch.randn_like(y), x, w, a, bb, s, 1.0, 0.1, 5, ALL)


def test_not_supported_reasons():
    x, w, b, a, bb = make_inputs(3, 4, 5, 2, torch.float64)
    assert any("float64" in r for r in tr.not_supported_reasons(x, w, b, a, bb, 0.0, True))
    x, w, b, a, bb = make_inputs(3, 4, 5, 257, torch.float32)
    assert any("rank 257" in r for r in tr.not_supported_reasons(x, w, b, a, bb, 0.0, True))
    x, w, b, a, bb = make_inputs(3, 4, 5, 2, torch.float16)
    assert tr.not_supported_reasons(x, w, b, a, bb, 0.1, True) == []
