"""The Triton kernels of prefix_attention (in Triton's interpreter on the CPU) against the
float64 oracle: output and the gradients of q, k, v, prefix_k, prefix_v, over the prefill,
decode (split-K) and both dQ paths; then the launch hygiene (1-D grids, device guard,
bucketed autotune keys, no zero-fills) on meta tensors, where nothing runs.
GPU checks at realistic sizes: tests/test_prefix_attention_triton_gpu.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from prefix_attention_cases import check_against_oracle, make_inputs, run_triton

from lora_kernels import backends

pytestmark = pytest.mark.skipif(
    bool(backends.triton_available_reasons(torch.device("cuda" if torch.cuda.is_available()
                                                        else "cpu"))),
    reason="Triton cannot run here")

# (P, per_row): no prefix, a shared prefix of 1 and of 13, a per-row prefix of 13
PREFIXES = [(0, False), (1, False), (13, False), (13, True)]
# (Hq, Hkv, D): each head grouping with each head dim over the grid below
HEADS_D = [(4, 4, 16), (4, 2, 40), (4, 1, 64)]
# (Lq, Lk): a decoding step with a cache, a square, queries at the end of longer keys
LENGTHS = [(1, 9), (17, 17), (17, 23)]


@pytest.fixture(autouse=True, scope="module")
def _quick_interpreter():
    """Two costs of Triton's interpreter that buy nothing at these tiny shapes, switched off
    for this file and restored after: the int32 overflow check of every integer operation,
    and the re-patching of triton.language at every call of a @triton.jit helper (the launch
    has patched it already). About three times faster; without the interpreter, nothing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    patch = getattr(interpreter, "_patch_lang", None)
    if builder is None or patch is None or not dataclasses.is_dataclass(builder.options):
        yield
        return
    unpatched_load = tl.load  # the same function in triton.language and triton.language.core

    class _Nothing:
        def restore(self):
            pass

    def patch_once(fn):
        langs = [m for m in fn.__globals__.values() if m is tl or m is tl.core]
        if langs and all(m.load is not unpatched_load for m in langs):
            return _Nothing()  # every language module it sees is patched for this launch
        return patch(fn)

    options = builder.options
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    interpreter._patch_lang = patch_once
    try:
        yield
    finally:
        builder.options = options
        interpreter._patch_lang = patch


def _case(prefix, heads_d, lengths, causal, pad, dtype, B=2):
    (P, per_row), (Hq, Hkv, D), (Lq, Lk) = prefix, heads_d, lengths
    inputs = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(B, Hq, Lq, D)
    scale = D**-0.5
    out, _, grads = run_triton(inputs, causal, scale, dout)
    check_against_oracle(out, grads, inputs, causal, scale, dout)


def _covering_grid():
    """Every prefix kind x causal x padding, each with a head grouping/head dim and lengths
    that rotate so that every (Hq/Hkv, D) and every (Lq, Lk) meets both causal modes and both
    padding modes (the interpreter runs each program as a Python loop: the full cross product
    would take minutes; tests/test_prefix_attention_reference.py runs it for the torch path)."""
    cases = []
    for i, prefix in enumerate(PREFIXES):
        for causal in (False, True):
            for pad in (False, True):
                heads_d = HEADS_D[(i + 2 * causal + pad) % 3]
                lengths = LENGTHS[(i + causal + 2 * pad) % 3]
                cases.append((prefix, heads_d, lengths, causal, pad))
    return cases


@pytest.mark.parametrize("prefix,heads_d,lengths,causal,pad", _covering_grid())
def test_fp32_grid(prefix, heads_d, lengths, causal, pad):
    _case(prefix, heads_d, lengths, causal, pad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads_d,lengths,causal,pad", [
    ((4, 2, 40), (17, 23), True, True),
    ((4, 1, 64), (1, 9), True, False),
    ((4, 4, 16), (17, 17), False, True),
])
@pytest.mark.parametrize("prefix", [(13, False), (13, True), (0, False)])
def test_half_precision(prefix, heads_d, lengths, causal, pad, dtype):
    _case(prefix, heads_d, lengths, causal, pad, dtype)


@pytest.mark.parametrize("Lq,Lk,splits,causal,pad,prefix,dtype", [
    (1, 70, 3, True, True, (13, False), torch.float32),
    (5, 64, 2, True, False, (1, True), torch.float32),
    (16, 50, 4, False, True, (0, False), torch.float32),
    (3, 40, 3, True, True, (13, True), torch.bfloat16),
])
def test_decode_split_k(monkeypatch, Lq, Lk, splits, causal, pad, prefix, dtype):
    """Lq <= 16 runs the decode kernel; with the keys split over several programs, merged by
    their log-sum-exps (the backward is the general one)."""
    from lora_kernels.triton import attention_decode

    monkeypatch.setattr(attention_decode, "DECODE_SPLITS", splits)
    assert attention_decode.plan_splits(2, 2, 1, Lk, torch.device("cpu"))[0] == splits
    (P, per_row), D = prefix, 40
    inputs = make_inputs(2, 4, 2, Lq, Lk, P, D, dtype, per_row=per_row, pad=pad)
    dout = torch.randn(2, 4, Lq, D)
    out, _, grads = run_triton(inputs, causal, D**-0.5, dout)
    check_against_oracle(out, grads, inputs, causal, D**-0.5, dout)


@pytest.mark.parametrize("prefix,causal,pad,dtype", [
    ((13, False), True, True, torch.float32),
    ((13, True), False, False, torch.float32),
    ((1, False), True, False, torch.float16),
])
def test_dq_recomputed_when_the_ds_workspace_is_too_large(monkeypatch, prefix, causal, pad,
                                                          dtype):
    from lora_kernels.triton import prefix_attention as T

    monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", 0)
    _case(prefix, (4, 2, 24), (17, 23), causal, pad, dtype)


@pytest.mark.parametrize("budget,sms,prefix,causal,pad,dtype,lengths,rows,groups", [
    # row slices of 16 queries (a causal one holds only the keys its rows see), 1-2 groups
    (8192, 1, (13, False), True, True, torch.float32, (37, 41), [16, 16, 5], [1, 1, 2]),
    # row slices of 4 groups; per-row prefix; the first rows see no sequence key
    (20000, 8, (13, True), True, False, torch.float32, (37, 30), [16, 16, 5], [4, 2, 4]),
    # whole groups, two per launch
    (40000, 2, (5, False), False, True, torch.float32, (37, 41), [37], [2]),
    (4096, 1, (0, False), True, False, torch.float16, (37, 41), [16, 16, 5], [2, 1, 4]),
    # a row slice that sees no key and no prefix launches no dK/dV programs
    (8192, 4, (0, False), True, True, torch.float32, (37, 12), [16, 16, 5], [4, 4, 4]),
])
def test_ds_workspace_in_slices(monkeypatch, budget, sms, prefix, causal, pad, dtype, lengths,
                                rows, groups):
    """The 5-matmul backward over slices of the (batch row, kv head) groups and of the query
    rows, within a tiny dS budget (one buffer reused), dK/dV carried over in fp32."""
    from lora_kernels.triton import attention_common as common
    from lora_kernels.triton import prefix_attention as T

    monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", budget)
    monkeypatch.setattr(T, "DS_MIN_SLICE_ROWS", 16)
    monkeypatch.setattr(common, "sm_count", lambda device: sms)
    plan = T.plan_ds(2, 2, 2, *lengths, prefix[0], causal, dtype, sms)
    assert [s.row1 - s.row0 for s in plan.slices] == rows
    assert [s.groups for s in plan.slices] == groups and plan.nbytes <= budget
    _case(prefix, (4, 2, 24), lengths, causal, pad, dtype)


@pytest.mark.parametrize("recompute", [False, True])
def test_more_queries_than_keys(monkeypatch, recompute):
    """Causal with Lq > Lk: the first Lq - Lk queries see no sequence key (only the prefix,
    or nothing: output 0); no tile may start before key 0."""
    from lora_kernels.triton import prefix_attention as T

    if recompute:
        monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", 0)
    _case((3, True) if recompute else (0, False), (4, 2, 24), (37, 12), True, True,
          torch.float32)


def test_lse_and_empty_rows():
    """LSE is the natural-log log-sum-exp; a row that sees no key gives 0 and -inf."""
    inputs = make_inputs(2, 4, 2, 5, 7, 0, 16, torch.float32, pad=True)
    dout = torch.randn(2, 4, 5, 16)
    out, lse, grads = run_triton(inputs, True, 0.25, dout)
    from lora_kernels.reference.prefix_attention import oracle

    ref, ref_lse = oracle(**{n: (x if x is None or x.dtype == torch.bool else x.double())
                             for n, x in inputs.items()}, causal=True, scale=0.25,
                          return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    torch.testing.assert_close(lse[1].double(), ref_lse[1], rtol=0, atol=1e-5)
    assert torch.equal(grads["q"][0], torch.zeros_like(grads["q"][0]))


def test_strided_and_expanded_inputs():
    """Non-contiguous q/k/v (a (B, L, H, D) layout seen as (B, H, L, D)) and an expanded
    shared prefix (batch stride 0) are read in place."""
    B, Hq, Hkv, L, P, D = 2, 4, 2, 19, 5, 24
    q = torch.randn(B, L, Hq, D).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D).transpose(1, 2)
    v = torch.randn(B, L, Hkv, 2 * D)[..., ::2].transpose(1, 2)
    pk, pv = torch.randn(1, Hkv, P, D), torch.randn(1, Hkv, P, D)
    inputs = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, key_padding_mask=None)
    dout = torch.randn(B, Hq, L, D)
    out, _, grads = run_triton(inputs, True, D**-0.5, dout)
    check_against_oracle(out, grads, inputs, True, D**-0.5, dout)


@pytest.mark.parametrize("D", [80, 96, 160, 256])
def test_head_dims_not_powers_of_two_and_the_largest(D):
    inputs = make_inputs(1, 2, 1, 17, 19, 2, D, torch.float32, pad=D == 96)
    dout = torch.randn(1, 2, 17, D)
    out, _, grads = run_triton(inputs, True, D**-0.5, dout)
    check_against_oracle(out, grads, inputs, True, D**-0.5, dout)


def test_deterministic_prefix_gradient():
    """The shared prefix's gradient is one fp32 partial per batch row, summed in a fixed order:
    bitwise the same on every run."""
    inputs = make_inputs(3, 4, 2, 17, 17, 13, 16, torch.float32)
    dout = torch.randn(3, 4, 17, 16)
    _, _, g1 = run_triton(inputs, True, 0.25, dout)
    _, _, g2 = run_triton(inputs, True, 0.25, dout)
    for name in ("prefix_k", "prefix_v", "k", "q"):
        assert torch.equal(g1[name], g2[name]), name


# ---- launch hygiene, on meta tensors (the launches are recorded, nothing runs) -------------


def _meta_inputs(B, Hq, Hkv, Lq, Lk, P, D, pad=False):
    e = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")
    q, k, v = e(B, Hq, Lq, D), e(B, Hkv, Lk, D), e(B, Hkv, Lk, D)
    pk, pv = (e(1, Hkv, P, D), e(1, Hkv, P, D)) if P else (None, None)
    kpm = torch.ones(B, Lk, dtype=torch.bool, device="meta") if pad else None
    return q, k, v, pk, pv, kpm


def _forward_backward(*inputs, causal=True):
    from lora_kernels.triton import prefix_attention as T

    q = inputs[0]
    out, lse = T.forward(*inputs, causal, q.shape[-1] ** -0.5)
    T.backward(torch.empty_like(q), *inputs, out, lse, causal, q.shape[-1] ** -0.5)


@pytest.fixture
def launches(monkeypatch):
    """Every launch as (kernel, grid, args, kwargs), instead of running it."""
    from lora_kernels.triton import attention_common as common

    calls = []
    monkeypatch.setattr(common, "launch",
                        lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw)))
    return calls


def _name(kernel):
    return getattr(kernel, "fn", kernel).__name__


@pytest.mark.parametrize("shape", [
    (4096, 32, 8, 1, 1000, 32, 128),   # decoding a batch of 4096: B * Hkv > 65,535 / 2
    (2048, 64, 64, 1, 4096, 0, 64),    # B * Hq = 131,072 query heads, long cache (split-K)
    (1, 32, 8, 9, 300_000, 16, 128),   # split-K over a very long cache
    (600, 128, 8, 300, 300, 16, 128),  # prefill and backward with B * Hq = 76,800
])
def test_grids_are_one_dimensional(launches, shape):
    """Axis 0 takes 2**31 - 1 programs, the others 65,535: every grid has one axis, for every
    config the autotuner may choose (the GPU table's too)."""
    from lora_kernels.triton import attention_common as common

    _forward_backward(*_meta_inputs(*shape))
    assert launches
    for kernel, grid, _, kwargs in launches:
        table = getattr(kernel, "config_table", None)
        metas = [kwargs]
        if table is not None:
            metas = [{**kwargs, **c.kwargs} for interp in (True, False)
                     for c in common.configs_for(table, kwargs["BLOCK_D"], interpreter=interp)]
        for meta in metas:
            g = grid(meta) if callable(grid) else grid
            assert len(g) == 1 and 1 <= g[0] < 2**31, (_name(kernel), g)


def test_decode_splits_only_when_programs_leave_sms_idle():
    from lora_kernels.triton import attention_decode as dec

    cpu = torch.device("cpu")  # planned as for a 132-SM GPU
    assert dec.plan_splits(4096, 8, 1, 100_000, cpu)[0] == 1
    n, length = dec.plan_splits(1, 8, 1, 8192, cpu)
    assert n > 1 and n * length >= 8192 and length % dec.common.max_tile("decode", "BLOCK_N") == 0
    assert dec.plan_splits(1, 8, 1, 100, cpu)[0] == 1  # too few keys to split


def test_autotune_keys_are_length_buckets(launches):
    """An autotuned kernel re-tunes per key; the keys hold powers of two of the lengths, so a
    new sequence length (every decoding step) does not re-benchmark."""
    from lora_kernels.triton import attention_common as common

    def keys_of(shape):
        launches.clear()
        _forward_backward(*_meta_inputs(*shape))
        out = {}
        for kernel, _, args, kwargs in launches:
            if hasattr(kernel, "keys"):
                named = dict(zip(kernel.fn.arg_names, args), **kwargs)
                out[_name(kernel)] = {k: named[k] for k in kernel.keys}
        return out

    for Lq in (5, 300):  # decode and prefill, + 2 stays in the same bucket
        a, b = keys_of((2, 8, 2, Lq, 1000, 13, 64)), keys_of((2, 8, 2, Lq + 2, 1003, 13, 64))
        assert a == b and len(a) >= 3
        for keys in a.values():
            assert not {"Lq", "Lk", "P"} & set(keys)
            for name in ("LQ_KEY", "LK_KEY", "P_KEY"):
                if name in keys:
                    assert keys[name] == common.bucket(keys[name]), (name, keys)


def test_launches_run_on_the_inputs_device(monkeypatch, launches):
    """Triton launches on the current CUDA device; every launch of ours sits inside a guard
    of the inputs' device (torch.cuda.device), so a model spread over GPUs computes each
    layer on its own GPU."""
    from lora_kernels.triton import attention_common as common

    entered = []

    class _Recorder:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", _Recorder)
    with common.device_guard(SimpleNamespace(device=torch.device("cuda", 3))):
        pass
    assert entered == [torch.device("cuda", 3)]

    active = []

    @contextlib.contextmanager
    def guard(t):
        active.append(t.device)
        yield
        active.pop()

    monkeypatch.setattr(common, "device_guard", guard)
    seen = []
    monkeypatch.setattr(common, "launch", lambda kernel, *a, **kw: seen.append(list(active)))
    for Lq in (3, 40):
        _forward_backward(*_meta_inputs(2, 4, 2, Lq, 64, 5, 32, pad=True))
    assert len(seen) >= 8 and all(s == [torch.device("meta")] for s in seen)


class _NoZeroFills:
    """torch, except the zero-filling constructors (a kernel overwrites every buffer)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name in ("zeros", "zeros_like", "full", "full_like"):
            raise AssertionError(f"torch.{name}: the kernels overwrite it, allocate empty")
        return getattr(self._real, name)


def test_buffers_the_kernels_overwrite_are_not_zero_filled(monkeypatch, launches):
    from lora_kernels.triton import (
        attention_common,
        attention_decode,
        attention_dq,
        prefix_attention,
    )

    for module in (attention_common, attention_decode, attention_dq, prefix_attention):
        if hasattr(module, "torch"):
            monkeypatch.setattr(module, "torch", _NoZeroFills(torch))
    monkeypatch.setattr(attention_decode, "DECODE_SPLITS", 3)
    for Lq, pad in ((2, True), (40, False)):
        _forward_backward(*_meta_inputs(2, 4, 2, Lq, 600, 13, 32, pad=pad))
    assert {_name(k) for k, *_ in launches} >= {"_fwd_kernel", "_decode_kernel", "_merge_kernel",
                                                "_delta_kernel", "_bwd_kv_kernel", "_dq_kernel"}


def _named(kernel, args, kwargs):
    return dict(zip(kernel.fn.arg_names, args), **kwargs)


def test_ds_slices_cover_every_group_and_row_once(monkeypatch, launches):
    """Within a small dS budget: per row slice (in order) and group slice, one dK/dV launch
    and then the dQ launch of the same heads and rows; together they cover every (group,
    query row) once; fp32 partials carried in (all but the first row slice) and out (every
    row slice: the launcher scales and casts them); the workspace (one buffer) within the
    budget."""
    from lora_kernels.triton import attention_common as common
    from lora_kernels.triton import prefix_attention as T

    B, Hq, Hkv, Lq, Lk, P = 3, 4, 2, 70, 90, 13
    budget = 40_000
    monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", budget)
    monkeypatch.setattr(T, "DS_MIN_SLICE_ROWS", 16)
    monkeypatch.setattr(common, "sm_count", lambda device: 16)
    _forward_backward(*_meta_inputs(B, Hq, Hkv, Lq, Lk, P, 32))
    names = [_name(k) for k, *_ in launches]
    first = names.index("_delta_kernel") + 1
    assert names[first:] == ["_bwd_kv_kernel", "_dq_kernel"] * ((len(names) - first) // 2)
    covered, row_slices, workspaces = [], [], set()
    for (kv, _, kv_args, kv_kw), (dq, _, dq_args, dq_kw) in zip(launches[first::2],
                                                               launches[first + 1::2]):
        a, d = _named(kv, kv_args, kv_kw), _named(dq, dq_args, dq_kw)
        rows = (a["row0"], a["row1"])
        assert (d["row0"], d["row1"]) == rows and d["head0"] == a["group0"] * (Hq // Hkv)
        assert a["ACC_IN"] == (rows[0] > 0) and a["ACC_OUT"]
        assert a["ds_head_stride"] == d["ds_head_stride"] == (rows[1] - rows[0]) * a["ds_rows"]
        covered += [(g, r) for g in range(a["group0"], a["group0"] + a["n_groups"])
                    for r in range(*rows)]
        if not row_slices or row_slices[-1] != rows:
            row_slices.append(rows)
        workspaces.add(id(a["DS"]))
        assert a["DS"] is d["DS"] and a["DS"].numel() * 2 <= budget
    assert sorted(covered) == [(g, r) for g in range(B * Hkv) for r in range(Lq)]
    assert len(row_slices) > 1 and row_slices == sorted(row_slices)
    assert len(names) - first > 2 * len(row_slices)  # several group slices too
    assert len(workspaces) == 1 and len(covered) == len(set(covered))


def test_ds_plan_keeps_five_matmuls_at_long_lengths(monkeypatch):
    """The GPU's configs (H200, 132 SMs), bf16, Hq 32, Hkv 8, P 32: up to 32 k keys the dS
    path holds, within DS_WORKSPACE_BYTES, with launches of about 132 key-tile programs or
    more (unless the whole problem is smaller); dQ recomputes only beyond that."""
    from lora_kernels.triton import attention_common as common
    from lora_kernels.triton import prefix_attention as T

    monkeypatch.setattr(common, "max_tile", lambda kernel, name: max(
        c.kwargs[name] for c in common.configs_for(kernel, interpreter=False)))
    for B, L, causal in [(8, 1024, True), (8, 8192, True), (8, 8192, False), (1, 32768, True)]:
        plan = T.plan_ds(B, 8, 4, L, L, 32, causal, torch.bfloat16)
        assert plan is not None and plan.nbytes <= T.DS_WORKSPACE_BYTES, (B, L)
        assert plan.slices[0].row0 == 0 and plan.slices[-1].row1 == L
        for s in plan.slices[1:]:
            assert s.row1 - s.row0 >= T.DS_MIN_SLICE_ROWS // 4
            assert s.groups * -(-s.keys // 128) >= 120 or s.groups == B * 8, (B, L, s)
    whole = T.plan_ds(8, 8, 4, 1024, 1024, 32, True, torch.bfloat16)  # the benchmark shape
    assert len(whole.slices) == 1 and whole.slices[0].groups == 22
    assert T.plan_ds(2, 8, 4, 200_000, 200_000, 32, True, torch.bfloat16) is None


def test_padded_launches_leave_out_the_rows_that_spill_with_a_mask(monkeypatch):
    """The GPU's dK/dV configs at D = 128: a launch with a key-padding mask is never tuned over
    the 32 x 128, 8-warp row (4 bytes of spills under Triton 3.6); one without still is."""
    from lora_kernels.triton import attention_backward as bwd
    from lora_kernels.triton import attention_common as common

    gpu_table = common.configs_for
    monkeypatch.setattr(common, "configs_for",
                        lambda *args, **kw: gpu_table(*args, **{**kw, "interpreter": False}))
    monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "1")
    prune = bwd._bwd_kv_kernel.early_config_prune
    gpu = common.configs_for("bwd_kv")

    def rows(has_pad):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in prune(gpu, {}, BLOCK_D=128, HAS_PAD=has_pad)}

    assert rows(False) == {(32, 128, 8), (16, 128, 8), (16, 64, 4)}
    assert rows(True) == {(16, 128, 8), (16, 64, 4)}


def test_dq_recomputes_when_no_slice_fits(monkeypatch, launches):
    from lora_kernels.triton import prefix_attention as T

    inputs = _meta_inputs(2, 4, 2, 40, 60, 13, 32)
    _forward_backward(*inputs)
    names = [_name(k) for k, *_ in launches]
    assert names.count("_dq_kernel") == names.count("_bwd_kv_kernel") == 1
    launches.clear()
    monkeypatch.setattr(T, "DS_WORKSPACE_BYTES", 1000)
    _forward_backward(*inputs)
    names = [_name(k) for k, *_ in launches]
    assert "_dq_recompute_kernel" in names and "_dq_kernel" not in names
    assert names.count("_bwd_kv_kernel") == 1


def test_fp32_is_declined_and_served_by_torch(monkeypatch):
    """fp32 is not in the Triton backend's capabilities (outside Triton's interpreter, which
    these tests run in, switched off here): auto on a GPU takes torch (SDPA) for it and Triton
    for fp16/bf16; an explicit backend="triton" on fp32 is a ValueError before any kernel runs
    (choose() never touches tensors: a CUDA device object is enough; only Triton is marked
    GPU-validated here, so the CUDA extension is no candidate)."""
    import lora_kernels.ops  # noqa: F401  (registers the op)
    from lora_kernels import prefix_attention
    from lora_kernels.triton import prefix_attention as T

    assert torch.float32 not in T.CAPABILITIES.dtypes
    monkeypatch.setattr(T, "INTERPRETER", False)
    monkeypatch.setattr(backends, "GPU_VALIDATED",
                        frozenset({("prefix_attention", "triton")}))
    cuda = torch.device("cuda")
    for dtype, want in ((torch.float32, "torch"), (torch.bfloat16, "triton"),
                        (torch.float16, "triton")):
        x = make_inputs(1, 2, 2, 3, 3, 2, 16, dtype)
        kw = dict(x, causal=True, dropout_p=0.0, training=True)
        assert backends.choose("prefix_attention", "auto", cuda, **kw) == want, dtype
    x = make_inputs(1, 2, 2, 3, 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="float32 is not supported"):
        prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], backend="triton")
