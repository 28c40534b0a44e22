"""The CUDA backend's kernels without a GPU: csrc/ compiled by g++ for the CPU emulator
(csrc/emulator: every CUDA thread a fiber; mma.sync, ldmatrix and cp.async computed from their
PTX definitions; barriers, alignment and shared-memory bounds enforced; scheduling orders and
copy timings that expose missing synchronisation). The backend modules
(lora_kernels.cuda.lora_linear / prefix_attention) run unchanged, with torch.ops.lora_kernels_cuda
replaced by the emulated kernels on CPU tensors, against float64 references.

Needs g++ on x86-64 and the CUDA toolkit's headers (cuda_fp16.h); skipped otherwise."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cuda_reference import (
    attention_inputs,
    check_attention_forward_backward,
    dropout_keep_mask,
    lora_torch,
)
from helpers import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
c = ctypes
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TERMS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def _cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    homes += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulator's context switch is x86-64 only")
    include = _cuda_include()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers")
    so = tmp_path_factory.mktemp("lk_emu") / "lk_emu.so"
    cmd = ["g++", "-std=c++17", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC",
           "-DLK_CPU_EMULATION", f"-I{ROOT / 'csrc'}", f"-I{include}",
           str(ROOT / "csrc" / "emulator" / "driver.cpp"), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(so))
    i64, vp = c.c_int64, c.c_void_p
    lib.lk_emu_set_options.argtypes = [c.c_int, c.c_int]
    lib.lk_emu_attn_fwd.argtypes = lib.lk_emu_attn_bwd.argtypes = [c.POINTER(AttnArgs)]
    lib.lk_emu_lora_shrink.argtypes = [c.c_int, vp, i64, vp, c.c_int, vp, i64, i64, c.c_int,
                                       c.c_double, i64, c.c_int]
    lib.lk_emu_lora_expand.argtypes = [c.c_int, vp, vp, c.c_int, vp, vp, i64, i64, c.c_int,
                                       c.c_float]
    lib.lk_emu_lora_grad_s_b.argtypes = [c.c_int, vp, i64, vp, vp, c.c_int, vp, vp, i64, i64,
                                         c.c_int, c.c_float, c.c_int]
    lib.lk_emu_lora_grad_x_a.argtypes = [c.c_int, vp, vp, i64, vp, c.c_int, vp, vp, i64, i64,
                                         c.c_int, c.c_double, i64, c.c_int]
    return lib


class AttnArgs(ctypes.Structure):
    _fields_ = ([(n, c.c_int) for n in "dtype D B Hq Hkv Lq Lk P Bp causal sms".split()]
                + [("scale", c.c_float)]
                + [(n, c.c_void_p) for n in "q k v pk pv kpm out lse dout dq dk dv dpk dpv".split()])


def _ptr(t):
    return None if t is None else t.data_ptr()


class EmulatedOps:
    """torch.ops.lora_kernels_cuda on CPU tensors, served by the emulated kernels; the same
    preparation as the ATen entry points (contiguous operands, fp32 adapters)."""

    def __init__(self, lib, sms=4, copy_at_issue=False, high_first=False):
        self.lib, self.sms = lib, sms
        lib.lk_emu_set_options(int(copy_at_issue), int(high_first))

    def _ok(self, rc):
        assert rc == 0

    def lora_shrink(self, x, lora_A, p, seed):
        x, a32 = x.contiguous(), lora_A.float().contiguous()
        s = torch.empty(x.shape[0], a32.shape[0])
        self._ok(self.lib.lk_emu_lora_shrink(CODE[x.dtype], _ptr(x), x.stride(0), _ptr(a32),
                                             TERMS[lora_A.dtype], _ptr(s), x.shape[0], x.shape[1],
                                             a32.shape[0], p, seed, self.sms))
        return s

    def lora_expand(self, s, lora_B, bias, scaling, out_dtype):
        s, b32 = s.contiguous(), lora_B.float().contiguous()
        bias = None if bias is None else bias.contiguous()
        y = torch.empty(s.shape[0], b32.shape[0], dtype=out_dtype)
        self._ok(self.lib.lk_emu_lora_expand(CODE[out_dtype], _ptr(s), _ptr(b32), TERMS[lora_B.dtype],
                                             _ptr(bias), _ptr(y), s.shape[0], b32.shape[0],
                                             s.shape[1], scaling))
        return y

    def lora_grad_s_b(self, dy, s, lora_B, scaling, need_dB):
        dy, s, b32 = dy.contiguous(), s.contiguous(), lora_B.float().contiguous()
        ds = torch.empty(s.shape)
        db = torch.empty(b32.shape) if need_dB else torch.empty(0)
        self._ok(self.lib.lk_emu_lora_grad_s_b(CODE[dy.dtype], _ptr(dy), dy.stride(0), _ptr(s),
                                               _ptr(b32), TERMS[lora_B.dtype], _ptr(ds),
                                               _ptr(db) if need_dB else None, dy.shape[0],
                                               dy.shape[1], s.shape[1], scaling, self.sms))
        return ds, db

    def lora_grad_x_a(self, ds, x, lora_A, p, seed, need_dx, need_dA):
        ds, x, a32 = ds.contiguous(), x.contiguous(), lora_A.float().contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype) if need_dx else torch.empty(0, dtype=x.dtype)
        da = torch.empty(a32.shape) if need_dA else torch.empty(0)
        self._ok(self.lib.lk_emu_lora_grad_x_a(CODE[x.dtype], _ptr(ds), _ptr(x), x.stride(0),
                                               _ptr(a32), TERMS[lora_A.dtype],
                                               _ptr(dx) if need_dx else None,
                                               _ptr(da) if need_dA else None, x.shape[0],
                                               x.shape[1], ds.shape[1], p, seed, self.sms))
        return dx, da

    def _attn_args(self, q, k, v, pk, pv, kpm, causal, scale):
        B, Hq, Lq, D = q.shape
        a = AttnArgs(dtype=0 if q.dtype == torch.float16 else 1, D=D, B=B, Hq=Hq, Hkv=k.shape[1],
                     Lq=Lq, Lk=k.shape[2], P=pk.shape[2], Bp=pk.shape[0], causal=int(causal),
                     sms=self.sms, scale=scale)
        keep = [t.contiguous() for t in (q, k, v, pk, pv)]
        if kpm is not None:
            keep.append(kpm.to(torch.uint8).contiguous())
            a.kpm = keep[-1].data_ptr()
        for name, t in zip(("q", "k", "v", "pk", "pv"), keep):
            setattr(a, name, t.data_ptr())
        return a, keep

    def prefix_attention_fwd(self, q, k, v, pk, pv, kpm, causal, scale):
        a, keep = self._attn_args(q, k, v, pk, pv, kpm, causal, scale)
        out, lse = torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape[:3])
        a.out, a.lse = out.data_ptr(), lse.data_ptr()
        self._ok(self.lib.lk_emu_attn_fwd(c.byref(a)))
        return out, lse

    def prefix_attention_bwd(self, dout, q, k, v, pk, pv, kpm, out, lse, causal, scale):
        a, keep = self._attn_args(q, k, v, pk, pv, kpm, causal, scale)
        keep += [t.contiguous() for t in (dout, out, lse)]
        a.dout, a.out, a.lse = (t.data_ptr() for t in keep[-3:])
        grads = [torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v, pk, pv)]
        a.dq, a.dk, a.dv, a.dpk, a.dpv = (g.data_ptr() for g in grads)
        self._ok(self.lib.lk_emu_attn_bwd(c.byref(a)))
        return tuple(grads)


@pytest.fixture
def use_emulator(emu, monkeypatch):
    """Route the backend modules' ops() to the emulator; returns a function taking the
    emulator's options (sms, copy_at_issue, high_first)."""
    import lora_kernels.cuda as cuda_pkg

    def configure(**options):
        ops = EmulatedOps(emu, **options)
        monkeypatch.setattr(cuda_pkg, "ops", lambda: ops)
        return ops

    configure()
    return configure


# ================================ lora_linear ==================================================

LORA_CASES = [  # (T, in, out, r, dtype, adapter dtype, p, bias, emulator options)
    (1, 5, 7, 1, torch.float32, torch.float32, 0.3, True, {}),
    (97, 123, 61, 4, torch.bfloat16, torch.float32, 0.3, False, {"copy_at_issue": True}),
    (97, 123, 61, 4, torch.float16, torch.float16, 0.0, True, {"high_first": True}),
    (64, 260, 96, 40, torch.bfloat16, torch.bfloat16, 0.3, True, {"sms": 8}),  # 64 ranks per block
    (33, 300, 520, 16, torch.float16, torch.float32, 0.1, True, {}),  # dS over 3 column blocks
    (40, 64, 40, 80, torch.float32, torch.bfloat16, 0.2, False, {"high_first": True}),  # 2 rank slices
]


@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}r{c[3]}")
def test_lora_backend_emulated(use_emulator, case):
    from lora_kernels.cuda import lora_linear as cl

    T, n_in, n_out, r, dtype, adapter_dtype, p, bias, options = case
    use_emulator(**options)
    scaling, seed = 1.7, 4321 + T
    x = torch.randn(T, n_in).to(dtype)
    if T > 1:  # any strides: x and weight as transposed views
        x = x.t().contiguous().t()
    w = (torch.randn(n_out, n_in) / math.sqrt(n_in)).to(dtype)
    b = torch.randn(n_out).to(dtype) if bias else None
    a = (torch.randn(r, n_in) / math.sqrt(n_in)).to(adapter_dtype)
    bb = torch.randn(n_out, r).to(adapter_dtype)
    mask = dropout_keep_mask(T, n_in, p, seed) if p > 0 else None

    y, s = cl.forward(x, w, b, a, bb, scaling, p, seed)
    assert y.dtype == dtype and y.shape == (T, n_out) and s.dtype == torch.float32
    leaves64 = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    y64 = lora_torch(*leaves64, scaling, mask, p)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    ybase = lora_torch(*leaves, scaling, mask, p)
    assert_close_to_reference(y, y64.detach(), ybase.detach(), "y")
    x64 = x.double()
    s64 = (x64 if mask is None else x64 * mask / (1 - p)) @ a.double().t()
    xd = x if mask is None else x * mask.to(dtype) / (1 - p)
    assert_close_to_reference(s, s64, (xd.to(adapter_dtype) @ a.t()).float(), "s", floor_eps=32)

    dy = torch.randn(T, n_out).to(dtype)
    grads = cl.backward(dy, x, w, a, bb, s, scaling, p, seed, (True, True, bias, True, True))
    y64.backward(dy.double())
    ybase.backward(dy)
    for name, g, ref, base in zip(("dx", "dweight", "dbias", "dA", "dB"), grads, leaves64, leaves):
        if ref is None:
            assert g is None, name
            continue
        assert g.dtype == base.dtype and g.shape == base.shape, name
        assert_close_to_reference(g, ref.grad, base.grad, name)
    # dA alone draws the mask itself (Philox) instead of receiving it packed: the same result.
    d_a = cl.backward(dy, x, w, a, bb, s, scaling, p, seed, (False, False, False, True, False))[3]
    assert torch.equal(d_a, grads[3])


def test_dropout_mask_is_the_documented_philox(use_emulator):
    """Forward (shrink) and backward (dx) draw the mask of cuda_reference.dropout_keep_mask."""
    ops = use_emulator()
    T, n_in, p, seed = 9, 37, 0.25, 2**33 + 7
    want = dropout_keep_mask(T, n_in, p, seed)
    assert 0 < want.mean() < 1
    s = ops.lora_shrink(torch.ones(T, n_in), torch.eye(n_in), p, seed)  # S = mask / (1 - p)
    assert torch.equal((s.double() * (1 - p)).round(), want)
    dx, _ = ops.lora_grad_x_a(torch.ones(T, 1), torch.zeros(T, n_in), torch.ones(1, n_in), p, seed,
                              True, False)
    assert torch.equal((dx.double() * (1 - p)).round(), want)


# ================================ prefix_attention =============================================

ATTN_CASES = [  # (B, Hq, Hkv, Lq, Lk, P, D, shared prefix, dtype, causal, padded, options)
    (2, 4, 2, 37, 45, 5, 64, True, torch.float16, True, False, {}),
    (2, 2, 1, 70, 40, 0, 64, True, torch.bfloat16, True, False, {"high_first": True}),  # Lq > Lk
    (2, 3, 3, 1, 130, 3, 128, False, torch.bfloat16, True, True, {"copy_at_issue": True}),  # decode
    (1, 2, 2, 50, 80, 70, 64, True, torch.float16, False, True,
     {"copy_at_issue": True, "high_first": True}),  # prefix across two tiles
    (3, 4, 2, 20, 30, 16, 128, True, torch.float16, True, True, {"sms": 4}),  # prefix grad chunks
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}/{c[4]}P{c[5]}D{c[6]}")
def test_attention_backend_emulated(use_emulator, case):
    from lora_kernels.cuda import prefix_attention as ca

    B, Hq, Hkv, Lq, Lk, P, D, shared, dtype, causal, padded, options = case
    use_emulator(**options)
    q, k, v, pk, pv, kpm = attention_inputs(B, Hq, Hkv, Lq, Lk, P, D, 1 if shared else B, dtype,
                                            padded)
    check_attention_forward_backward(ca, q, k, v, pk, pv, kpm, causal, lse_atol=1e-4)
