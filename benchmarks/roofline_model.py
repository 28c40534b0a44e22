"""Traffic and FLOP model of every kernel of a LoRA step and a prefix-attention step on an H200.

MODEL, NOT A MEASUREMENT; A GPU RUN REPLACES IT. For the benchmark shapes it lists, per provider,
each kernel's HBM bytes, tensor-core FLOPs, CUDA-core (SIMT) instructions and special-function
(exp2) operations, and the time they imply at H200 peaks: per work item max(bytes / HBM bandwidth,
tensor FLOPs / tensor peak, SIMT / SIMT rate, exp2 / SFU rate), each compute rate scaled by the
fraction of the 132 SMs the grid occupies; a kernel's items run one after another (a prologue,
then a main loop); kernels are summed (no overlap between launches, no launch latency).

Assumptions (each biases the model towards the optimistic side, alike for every provider):
- every tensor crosses HBM once per kernel that touches it (re-reads of tiles hit L2);
- peaks are reached: 989 TFLOP/s dense bf16 tensor cores, 4.8 TB/s HBM, and the CUDA-core rates
  of 132 SMs x 128 lanes (FFMA, integer) and x 16 (MUFU.EX2) at 1.98 GHz;
- global atomics resolve in L2: counted in their own column, not timed;
- CUDA-core issue at the full rate, whatever the warps per SM (the Triton shrink runs 128
  programs of 4 or 8 warps: one per SM, so its SIMT time is a floor);
- a Philox call costs PHILOX_INSTR SIMT instructions in PyTorch's dropout (Triton's ``tl.rand``
  measured: the SASS of a kernel storing ``tl.rand(seed, offs) >= p`` grows by 50 per element),
  which uses the 4 outputs of each call; our kernels' own counts come from their SASS
  (SHRINK_INSTR, PHILOX4_CALL_INSTR).
Not modelled (the static profile shows them; a GPU run prices them): register spills, mma.sync
instead of wgmma (the CUDA backend's tensor-core FLOPs are priced at the wgmma peak: optimistic
for it), pipeline depth, partial last waves, the softmax and mask arithmetic of attention on
CUDA cores (counted only when an entry gives ``simt``), launch latency.

Each provider is a function of the shape returning its kernels: a kernel is a few lines, to be
updated when a kernel is redesigned (give its reads, writes, dots and Philox draws; tag the passes
over x and dY). Run: ``python benchmarks/roofline_model.py`` (writes
``benchmarks/results/roofline_model.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

LABEL = "model, not a measurement; a GPU run replaces it"
SMS, CLOCK = 132, 1.98e9
PEAK = {
    "hbm": 4.8e12,  # B/s
    "tc": 989e12,  # dense bf16/fp16 tensor-core FLOP/s
    "tf32": 494.5e12,  # dense tf32 tensor-core FLOP/s
    "simt": SMS * 128 * CLOCK,  # CUDA-core lane instructions/s (an FFMA = 2 FLOP: 66.9 TFLOP/s)
    "sfu": SMS * 16 * CLOCK,  # MUFU (exp2) lane operations/s
}
PHILOX_INSTR = 50
# Instructions per element of x of the Triton shrink's loop (Philox once per 8 elements, bit
# packing, masking, bf16 pieces): SASS of `_shrink` M64,K64,w4,s4 with Triton 3.8 (396 loop
# instructions per 32 elements; 13.3 with 3.6), from `python benchmarks/lora_shrink_loop.py`.
SHRINK_INSTR = 12.4
# One Philox4x32-10 call of csrc/device/philox.cuh with its 4 threshold tests (SASS, sm_90,
# nvcc 13.0: a kernel making one call per thread has 66 instructions more than one making none,
# a second call adds 53, sharing the key schedule).
PHILOX4_CALL_INSTR = 60


@dataclass
class Work:
    """One phase of a kernel. Bytes are HBM traffic, compute in operations."""
    read: float = 0.0
    write: float = 0.0
    tc: float = 0.0  # tensor-core FLOPs (bf16/fp16 operands)
    tf32: float = 0.0  # tensor-core FLOPs (tf32 operands)
    simt: float = 0.0  # CUDA-core instructions (an FFMA counts 1)
    sfu: float = 0.0  # exp2
    sm_fraction: float = 1.0  # share of the SMs the grid keeps busy

    def seconds(self) -> float:
        f = max(min(self.sm_fraction, 1.0), 1e-9)
        return max((self.read + self.write) / PEAK["hbm"], self.tc / PEAK["tc"] / f,
                   self.tf32 / PEAK["tf32"] / f, self.simt / PEAK["simt"] / f,
                   self.sfu / PEAK["sfu"] / f)

    def bound(self) -> str:
        f = max(min(self.sm_fraction, 1.0), 1e-9)
        terms = {"HBM": (self.read + self.write) / PEAK["hbm"], "tensor": self.tc / PEAK["tc"] / f,
                 "tf32": self.tf32 / PEAK["tf32"] / f, "SIMT": self.simt / PEAK["simt"] / f,
                 "SFU": self.sfu / PEAK["sfu"] / f}
        return max(terms, key=terms.get)


@dataclass
class Kernel:
    name: str
    works: list[Work]
    atomics: float = 0.0  # global atomic operations (L2), not timed
    x_pass: int = 0  # reads a T x in activation (x or a copy of it)
    dy_pass: int = 0  # reads a T x out gradient (dY or a copy of it)
    philox: int = 0  # draws the dropout mask of every element of x

    def seconds(self) -> float:
        return sum(w.seconds() for w in self.works)

    def totals(self) -> dict:
        return {k: sum(getattr(w, k) for w in self.works) for k in ("read", "write", "tc", "tf32",
                                                                    "simt", "sfu")}


def one(name, atomics=0.0, x_pass=0, dy_pass=0, philox=0, **work) -> Kernel:
    """A kernel of a single phase."""
    return Kernel(name, [Work(**work)], atomics, x_pass, dy_pass, philox)


# ============================================================================ LoRA


@dataclass
class LoraShape:
    T: int = 8192
    IN: int = 4096
    OUT: int = 4096
    R: int = 16
    base_bytes: int = 2  # bf16 x, W, y
    adapter_bytes: int = 4  # fp32 A, B (PEFT's default)

    @property
    def X(self): return self.T * self.IN * self.base_bytes
    @property
    def Y(self): return self.T * self.OUT * self.base_bytes
    @property
    def W(self): return self.OUT * self.IN * self.base_bytes
    @property
    def A(self): return self.R * self.IN * self.adapter_bytes
    @property
    def B(self): return self.OUT * self.R * self.adapter_bytes
    @property
    def S(self): return self.T * self.R * 4  # fp32 (T, r)
    @property
    def gemm(self): return 2.0 * self.T * self.IN * self.OUT  # x W^T or dY W
    @property
    def lora_in(self): return 2.0 * self.T * self.IN * self.R  # x A^T, dS A, dS^T x
    @property
    def lora_out(self): return 2.0 * self.T * self.OUT * self.R  # S B^T, dY B, dY^T S


def lora_cublas(s: LoraShape) -> list[Kernel]:
    """The floor: the frozen base linear alone (forward, and dX = dY W in backward)."""
    return [
        one("cuBLAS y = x W^T", read=s.X + s.W, write=s.Y, tc=s.gemm, x_pass=1),
        one("cuBLAS dx = dY W", read=s.Y + s.W, write=s.X, tc=s.gemm, dy_pass=1),
    ]


def lora_peft(s: LoraShape) -> list[Kernel]:
    """PEFT 0.21 ``lora.Linear`` as benchmarked: x cast to the fp32 adapters' dtype, torch
    dropout, two fp32 GEMMs (cuBLAS SGEMM: SIMT, tf32 is off by default), scale, add in fp32
    (bf16 + fp32 promotes), cast back; autograd's backward of each."""
    T, IN, OUT = s.T, s.IN, s.OUT
    x32, y32, mask = T * IN * 4, T * OUT * 4, T * IN
    fma_in, fma_out = s.lora_in / 2, s.lora_out / 2  # FFMA instructions of an fp32 GEMM
    drop = T * IN * PHILOX_INSTR / 4
    return [
        one("base y0 = x W^T", read=s.X + s.W, write=s.Y, tc=s.gemm, x_pass=1),
        one("x.to(fp32)", read=s.X, write=x32, x_pass=1),
        one("dropout (mask saved)", read=x32, write=x32 + mask, simt=drop, x_pass=1, philox=1),
        one("lora_A: s = xd A^T (fp32)", read=x32 + s.A, write=s.S, simt=fma_in, x_pass=1),
        one("lora_B: l = s B^T (fp32)", read=s.S + s.B, write=y32, simt=fma_out),
        one("l * scaling", read=y32, write=y32),
        one("y0 + l (fp32)", read=s.Y + y32, write=y32),
        one("to(bf16)", read=y32, write=s.Y),
        one("bwd: dY.to(fp32)", read=s.Y, write=y32, dy_pass=1),
        one("bwd: grad of y0 to bf16", read=y32, write=s.Y, dy_pass=1),
        one("bwd: * scaling", read=y32, write=y32, dy_pass=1),
        one("bwd: dS = dl B (fp32)", read=y32 + s.B, write=s.S, simt=fma_out, dy_pass=1),
        one("bwd: dB = dl^T s (fp32)", read=y32 + s.S, write=s.B, simt=fma_out, dy_pass=1),
        one("bwd: dxd = dS A (fp32)", read=s.S + s.A, write=x32, simt=fma_in),
        one("bwd: dA = dS^T xd (fp32)", read=s.S + x32, write=s.A, simt=fma_in, x_pass=1),
        one("bwd: dropout backward", read=x32 + mask, write=x32),
        one("bwd: dx_lora.to(bf16)", read=x32, write=s.X),
        one("bwd: base dx = dY W", read=s.Y + s.W, write=s.X, tc=s.gemm, dy_pass=1),
        one("bwd: dx = dx_base + dx_lora", read=2 * s.X, write=s.X),
    ]


def lora_peft_bf16(s: LoraShape) -> list[Kernel]:
    """PEFT with bf16 adapters (no casts; its cheapest case): dropout, two bf16 GEMMs on tensor
    cores, scale, add; autograd's backward of each."""
    T, IN = s.T, s.IN
    b = LoraShape(s.T, s.IN, s.OUT, s.R, s.base_bytes, s.base_bytes)
    mask, drop = T * IN, T * IN * PHILOX_INSTR / 4
    return [
        one("base y0 = x W^T", read=b.X + b.W, write=b.Y, tc=b.gemm, x_pass=1),
        one("dropout (mask saved)", read=b.X, write=b.X + mask, simt=drop, x_pass=1, philox=1),
        one("lora_A: s = xd A^T", read=b.X + b.A, write=T * b.R * 2, tc=b.lora_in, x_pass=1),
        one("lora_B: l = s B^T", read=T * b.R * 2 + b.B, write=b.Y, tc=b.lora_out),
        one("l * scaling", read=b.Y, write=b.Y),
        one("y0 + l", read=2 * b.Y, write=b.Y),
        one("bwd: * scaling", read=b.Y, write=b.Y, dy_pass=1),
        one("bwd: dS = dl B", read=b.Y + b.B, write=T * b.R * 2, tc=b.lora_out, dy_pass=1),
        one("bwd: dB = dl^T s", read=b.Y + T * b.R * 2, write=b.B, tc=b.lora_out, dy_pass=1),
        one("bwd: dxd = dS A", read=T * b.R * 2 + b.A, write=b.X, tc=b.lora_in),
        one("bwd: dA = dS^T xd", read=T * b.R * 2 + b.X, write=b.A, tc=b.lora_in, x_pass=1),
        one("bwd: dropout backward", read=b.X + mask, write=b.X),
        one("bwd: base dx = dY W", read=b.Y + b.W, write=b.X, tc=b.gemm, dy_pass=1),
        one("bwd: dx = dx_base + dx_lora", read=2 * b.X, write=b.X),
    ]


def _cdiv(a, b):
    return -(-a // b)


def _lora_triton_plan(s: LoraShape, sms: int = SMS) -> dict:
    """The launch plan lora_kernels/triton/lora_linear.py makes at this shape on `sms` SMs
    (mirrored here: the model stands alone). Buffers in bytes."""
    T, IN, OUT, R = s.T, s.IN, s.OUT, s.R
    row_blocks = _cdiv(T, 128)  # _ds_db's BLOCK_M (T >= 4096, x in one piece)
    groups = min(_cdiv(2 * sms, row_blocks), _cdiv(OUT, 256))  # column groups (x 256 columns)
    group_cols = _cdiv(_cdiv(OUT, groups), 256) * 256
    groups = _cdiv(OUT, group_cols)
    return {
        "mask": T * _cdiv(IN, 16) * 4,  # keep bits, 16 per float32 column of the saved s
        "ds_part": groups * T * R * 4, "db_part": row_blocks * OUT * R * 4,
        "da_part": _cdiv(T, 128) * R * IN * 4,  # dA partials per 128-row block of the dX GEMM
        "groups": groups, "row_blocks": row_blocks,
    }


def lora_triton(s: LoraShape) -> list[Kernel]:
    """lora_kernels/triton/lora_linear.py (redesigned): the shrink draws the mask (one Philox
    call per 8 elements) and stores it as bits in the saved s; the persistent TMA GEMMs (forward,
    dX) start their fp32 accumulator at the LoRA term; dS and dB in one pass over dY (partials
    summed by torch in a fixed order); dA rides in the dX GEMM up to r = 32 (x's tile read there,
    partials per 128-row block). LoRA dots on wgmma in bf16 pieces: 3 piece products for a bf16
    x fp32 dot or fp32 x fp32 into bf16. The shrink's CUDA-core work is the SASS count of its loop
    (SHRINK_INSTR per element of x, Triton 3.8; 13.3 with 3.6)."""
    T, IN, OUT, R = s.T, s.IN, s.OUT, s.R
    plan = _lora_triton_plan(s)
    pieces = 3
    return [
        one("shrink: S = dropout(x) A^T, mask bits", read=s.X + s.A, write=s.S + plan["mask"],
            tc=pieces * s.lora_in, simt=SHRINK_INSTR * T * IN, x_pass=1, philox=1),
        one("fwd GEMM: y = x W^T + scaling S B^T (persistent, TMA)", read=s.X + s.W + s.S + s.B,
            write=s.Y, tc=s.gemm + pieces * s.lora_out, x_pass=1),
        one("ds_db: dS, dB partials (one pass over dY)", read=s.Y + s.B + s.S,
            write=plan["ds_part"] + plan["db_part"], tc=2 * pieces * s.lora_out, dy_pass=1),
        one("dS partial sum (torch)", read=plan["ds_part"], write=s.S),
        one("dB partial sum (torch)", read=plan["db_part"], write=OUT * R * 4),
        one("dX GEMM: dx = dY W + keep dS A / (1-p), dA partials", read=s.Y + s.W + s.S + s.A
            + plan["mask"] + s.X, write=s.X + plan["da_part"],
            tc=s.gemm + 2 * pieces * s.lora_in, dy_pass=1, x_pass=1),
        one("dA partial sum (torch)", read=plan["da_part"], write=R * IN * 4),
    ]


def _split_plan(extent, tile, blocks, min_tiles, blocks_per_sm, sms=SMS):
    """csrc/lora_linear's plan_splits: (splits, per_split) of a reduction dimension."""
    tiles = _cdiv(max(extent, 1), tile)
    n = max(1, min(_cdiv(blocks_per_sm * sms, max(blocks, 1)), _cdiv(tiles, min_tiles)))
    per = _cdiv(tiles, n) * tile
    return _cdiv(tiles * tile, per), per


def lora_cuda(s: LoraShape) -> list[Kernel]:
    """csrc/lora_linear (redesigned): cuBLAS does x W^T and dY W with beta = 1 onto buffers the
    kernels filled with the LoRA terms (so cuBLAS reads them once more); every LoRA product on
    mma.sync in bf16 terms (3 term products here); dropout: one Philox call per 4 elements of x
    in the shrink and again in the dX term kernel, which writes the mask bit-packed for the dA
    sweep; split reductions as fp32 partials summed by reduce_partials_kernel (no atomics).
    CUDA-core work counted: Philox only (PHILOX4_CALL_INSTR per call, from the SASS)."""
    T, IN, OUT, R = s.T, s.IN, s.OUT, s.R
    pieces, philox = 3, T * IN / 4 * PHILOX4_CALL_INSTR
    sh_splits, _ = _split_plan(IN, 64, _cdiv(T, 64), 4, 4)  # shrink: `in` cut over blocks
    col_blocks = _cdiv(OUT, 256)
    sw_splits, _ = _split_plan(T, 32, col_blocks, 1, 2)  # sweeps: T cut over row splits
    sh_part = sh_splits * T * R * 4
    ds_part, db_part = col_blocks * T * R * 4, sw_splits * OUT * R * 4
    da_part = sw_splits * R * IN * 4
    bits = T * _cdiv(IN, 32) * 4
    return [
        one(f"lora_shrink: S partials ({sh_splits} splits of in), Philox", read=s.X + s.A,
            write=sh_part, tc=pieces * s.lora_in, simt=philox, x_pass=1, philox=1),
        one("reduce_partials: S", read=sh_part, write=s.S),
        one("lora_expand: y = scaling S B^T", read=s.S + s.B, write=s.Y, tc=pieces * s.lora_out),
        one("cuBLAS y += x W^T (beta = 1)", read=s.X + s.W + s.Y, write=s.Y, tc=s.gemm, x_pass=1),
        one("lora_sweep over dY: dS, dB partials", read=s.Y + s.S + s.B, write=ds_part + db_part,
            tc=2 * pieces * s.lora_out, dy_pass=1),
        one("reduce_partials: dS", read=ds_part, write=s.S),
        one("reduce_partials: dB", read=db_part, write=OUT * R * 4),
        one("lora_expand: dx = keep dS A / (1-p), mask bits, Philox", read=s.S + s.A,
            write=s.X + bits, tc=pieces * s.lora_in, simt=philox, philox=1),
        one("cuBLAS dx += dY W (beta = 1)", read=s.Y + s.W + s.X, write=s.X, tc=s.gemm,
            dy_pass=1),
        one("lora_sweep over x: dA partials", read=s.X + bits + s.S, write=da_part,
            tc=pieces * s.lora_in, x_pass=1),
        one("reduce_partials: dA", read=da_part, write=R * IN * 4),
    ]


LORA_PROVIDERS = {
    "cuBLAS base linear (floor)": lora_cublas,
    "PEFT, fp32 adapters (as benchmarked)": lora_peft,
    "PEFT, bf16 adapters": lora_peft_bf16,
    "ours Triton": lora_triton,
    "ours CUDA": lora_cuda,
}


# ============================================================================ prefix attention


@dataclass
class AttnShape:
    B: int = 8
    HQ: int = 32
    HKV: int = 8
    L: int = 1024  # query and sequence-key length (causal, aligned bottom-right)
    P: int = 32  # prefix keys, shared by the batch
    D: int = 128
    bytes: int = 2  # bf16

    @property
    def Q(self): return self.B * self.HQ * self.L * self.D * self.bytes  # also O, dO, dQ
    @property
    def K(self): return self.B * self.HKV * self.L * self.D * self.bytes  # also V, dK, dV
    @property
    def PK(self): return self.HKV * self.P * self.D * self.bytes  # also PV
    @property
    def KC(self): return self.B * self.HKV * (self.L + self.P) * self.D * self.bytes  # concat
    @property
    def LSE(self): return self.B * self.HQ * self.L * 4  # also delta


def tiles_by_query_block(Lq, Lk, BM, BN, offset):
    """BM x BN tiles a query-block loop visits when query i sees keys j <= i + offset."""
    return sum(math.ceil(min(Lk, (m + 1) * BM + offset) / BN) for m in range(math.ceil(Lq / BM)))


def tiles_by_key_block(Lq, Lk, BM, BN, offset):
    """BM x BN tiles a key-block loop visits (query blocks from the first that sees the block)."""
    nm = math.ceil(Lq / BM)
    return sum(nm - max(0, j * BN - offset) // BM for j in range(math.ceil(Lk / BN)))


def _tile(BM, BN, D, matmuls, n):
    """(tensor FLOPs, exp2 count) of n tiles with `matmuls` BM x BN x D products each."""
    return n * matmuls * 2.0 * BM * BN * D, n * BM * BN


def attn_fa2_concat(s: AttnShape) -> list[Kernel]:
    """PEFT's route on FlashAttention-2: prefix expanded per row and concatenated to K and V,
    FA2 forward (128 x 64 tiles) and backward (64 x 128 tiles over key blocks, 5 products per
    tile, dQ accumulated with fp32 atomics then converted; GQA: dK/dV per query head, summed
    over the group afterwards), the cat's backward (the prefix gradient summed over the batch)."""
    heads, Lk = s.B * s.HQ, s.L + s.P
    fl_f, ex_f = _tile(128, 64, s.D, 2, heads * tiles_by_query_block(s.L, Lk, 128, 64, s.P))
    nb = heads * tiles_by_key_block(s.L, Lk, 64, 128, s.P)
    fl_b, ex_b = _tile(64, 128, s.D, 5, nb)
    dq_acc = s.B * s.HQ * s.L * s.D * 4
    dkv_exp = 2 * s.B * s.HQ * Lk * s.D * s.bytes
    return [
        one("torch.cat(prefix.expand, k), same for v", read=2 * (s.K + s.B * s.PK),
            write=2 * s.KC),
        one("FA2 fwd", read=s.Q + 2 * s.KC, write=s.Q + s.LSE, tc=fl_f, sfu=ex_f),
        one("FA2 bwd: delta = rowsum(dO O), zero dQ_accum", read=2 * s.Q, write=s.LSE + dq_acc),
        one("FA2 bwd: dK, dV per q head; dQ_accum += (atomics)",
            read=2 * s.Q + 2 * s.KC + 2 * s.LSE + dq_acc, write=dq_acc + dkv_exp, tc=fl_b,
            sfu=ex_b, atomics=nb * 64 * s.D),
        one("FA2 bwd: dQ_accum -> dQ", read=dq_acc, write=s.Q),
        one("FA2 bwd: GQA sum of dK, dV over the group", read=dkv_exp, write=2 * s.KC),
        one("cat backward: prefix grads summed over the batch", read=2 * s.B * s.PK,
            write=2 * s.PK),
    ]


def attn_fa2_no_prefix(s: AttnShape) -> list[Kernel]:
    """Reference: FA2 on the sequence keys alone (what the same layer costs without a prefix)."""
    return attn_fa2_concat(AttnShape(s.B, s.HQ, s.HKV, s.L, 0, s.D, s.bytes))[1:-1]


def attn_triton(s: AttnShape) -> list[Kernel]:
    """lora_kernels/triton/prefix_attention.py (redesigned, FA2 style), first configs of its
    table at D = 128: forward 128 x 64 tiles plus a prefix tile of its own width (32); delta;
    one dK/dV launch (key tiles of 128 x query tiles of 32, 4 products: S^T, dP^T, dV, dK) whose
    first programs are the prefix tiles (32 keys x 128 queries, every query of the group),
    storing dS (bf16) for the tiles it visits; dQ = dS [K_prefix; K] from the stored dS (128 x 64
    tiles, 1 product, no exponentials); the shared prefix's per-row fp32 partials summed by
    torch. No atomics, no zero-fills. dS in slices of (batch x kv-head) groups within
    DS_WORKSPACE_BYTES (256 MiB): three slices here, the same bytes and FLOPs, six launches for
    two (launches not timed)."""
    heads, L, P, D = s.B * s.HQ, s.L, s.P, s.D
    bp = min(64, max(16, 1 << (P - 1).bit_length()))  # prefix tile width
    fl_f, ex_f = _tile(128, 64, D, 2, heads * tiles_by_query_block(L, L, 128, 64, 0))
    fl_fp, ex_fp = _tile(128, bp, D, 2, heads * math.ceil(L / 128) * math.ceil(P / bp))
    n_kv = heads * tiles_by_key_block(L, L, 32, 128, 0)
    fl_kv, ex_kv = _tile(32, 128, D, 4, n_kv)
    n_pkv = heads * math.ceil(L / 128) * math.ceil(P / bp)
    fl_pkv, ex_pkv = _tile(128, bp, D, 4, n_pkv)
    ds = (n_kv * 32 * 128 + n_pkv * 128 * bp) * s.bytes  # dS of every visited tile
    n_q = heads * tiles_by_query_block(L, L, 128, 64, 0)
    fl_q, _ = _tile(128, 64, D, 1, n_q)
    fl_qp, _ = _tile(128, bp, D, 1, heads * math.ceil(L / 128) * math.ceil(P / bp))
    partials = 2 * s.B * s.HKV * P * D * 4
    return [
        one("_fwd_kernel", read=s.Q + 2 * s.K + 2 * s.PK, write=s.Q + s.LSE, tc=fl_f + fl_fp,
            sfu=ex_f + ex_fp),
        one("_delta_kernel", read=2 * s.Q, write=s.LSE),
        one("_bwd_kv_kernel (prefix and sequence keys, stores dS)",
            read=2 * s.K + 2 * s.PK + 2 * s.Q + 2 * s.LSE, write=2 * s.K + partials + ds,
            tc=fl_kv + fl_pkv, sfu=ex_kv + ex_pkv),
        one("_dq_kernel (from the stored dS)", read=ds + s.K + s.PK, write=s.Q, tc=fl_q + fl_qp),
        one("shared-prefix batch sum (torch)", read=partials, write=2 * s.PK),
    ]


def attn_cuda(s: AttnShape) -> list[Kernel]:
    """csrc/prefix_attention (redesigned, FA2 structure on mma.sync, accumulators in registers,
    4 warps per block): forward 64 x 64 tiles, the prefix in one 64-key tile (32 valid keys,
    computed whole); the dQ kernel computes delta and dQ (S, dP, dQ: 3 products per 64 x 64
    tile); the dK/dV kernel (64 keys x 32 queries per step at D = 128, 4 products) with the
    prefix keys as extra blocks, a shared prefix reduced per batch chunk into fp32 partials
    summed by torch. 7 products per backward tile pair, no atomics. mma.sync runs below the
    wgmma peak this model assumes."""
    heads, L, P, D = s.B * s.HQ, s.L, s.P, s.D
    pre = math.ceil(L / 64) * math.ceil(P / 64)  # query blocks x 64-wide prefix tiles
    fl_f, ex_f = _tile(64, 64, D, 2, heads * (pre + tiles_by_query_block(L, L, 64, 64, 0)))
    fl_q, ex_q = _tile(64, 64, D, 3, heads * (pre + tiles_by_query_block(L, L, 64, 64, 0)))
    n_kv = heads * (tiles_by_key_block(L, L, 32, 64, 0) + math.ceil(L / 32) * math.ceil(P / 64))
    fl_kv, ex_kv = _tile(32, 64, D, 4, n_kv)
    chunks = min(s.B, math.ceil(2 * SMS / (math.ceil(P / 64) * s.HKV)))
    partials = 2 * chunks * s.HKV * P * D * 4
    return [
        one("attn_fwd_kernel", read=s.Q + 2 * s.K + 2 * s.PK, write=s.Q + s.LSE, tc=fl_f,
            sfu=ex_f),
        one("attn_bwd_dq_kernel (delta, S, dP, dQ)",
            read=3 * s.Q + 2 * s.K + 2 * s.PK + s.LSE, write=s.Q + s.LSE, tc=fl_q, sfu=ex_q),
        one("attn_bwd_dkdv_kernel (sequence and prefix keys)",
            read=2 * s.Q + 2 * s.K + 2 * s.PK + 2 * s.LSE, write=2 * s.K + partials,
            tc=fl_kv, sfu=ex_kv),
        one("shared-prefix chunk sum (torch)", read=partials, write=2 * s.PK),
    ]


ATTN_PROVIDERS = {
    "FA2 over concatenated keys (PEFT's route)": attn_fa2_concat,
    "FA2, sequence keys only (no prefix, reference)": attn_fa2_no_prefix,
    "ours Triton": attn_triton,
    "ours CUDA": attn_cuda,
}


# ============================================================================ report


def _tensor_bound(k: Kernel) -> bool:
    """Whether the kernel's longest phase is bound by the tensor cores."""
    return max(k.works, key=lambda w: w.seconds()).bound() in ("tensor", "tf32")


def evaluate(providers: dict, shape) -> list[dict]:
    out = []
    for name, fn in providers.items():
        kernels = fn(shape)
        rows = []
        for k in kernels:
            t = k.totals()
            rows.append({"kernel": k.name, "ms": k.seconds() * 1e3,
                         "bound": "+".join(w.bound() for w in k.works),
                         "MB": (t["read"] + t["write"]) / 1e6, "tensor_GFLOP": (t["tc"] + t["tf32"]) / 1e9,
                         "simt_Ginstr": t["simt"] / 1e9, "exp2_G": t["sfu"] / 1e9,
                         "atomics_M": k.atomics / 1e6,
                         "passes": " ".join(n for n, c in (("x", k.x_pass), ("dY", k.dy_pass),
                                                           ("Philox", k.philox)) if c)})
        out.append({
            "provider": name, "doc": " ".join((fn.__doc__ or "").split()),
            "kernels": rows, "launches": len(kernels), "ms": sum(r["ms"] for r in rows),
            "MB": sum(r["MB"] for r in rows), "tensor_GFLOP": sum(r["tensor_GFLOP"] for r in rows),
            "simt_Ginstr": sum(r["simt_Ginstr"] for r in rows),
            "atomics_M": sum(r["atomics_M"] for r in rows),
            "x_passes": sum(k.x_pass for k in kernels), "dy_passes": sum(k.dy_pass for k in kernels),
            "x_passes_outside_gemms": sum(k.x_pass for k in kernels if not _tensor_bound(k)),
            "dy_passes_outside_gemms": sum(k.dy_pass for k in kernels if not _tensor_bound(k)),
            "philox_passes": sum(k.philox for k in kernels),
        })
    return out


def _summary(op: str, results: list[dict], baseline: str, passes: bool) -> list[str]:
    base = next(r for r in results if r["provider"] == baseline)["ms"]
    head = "| provider | launches | HBM MB | tensor GFLOP | SIMT G instr | atomics M | modelled ms | vs " \
           f"{baseline.split(' (')[0]} |"
    more = (" passes over x (not tensor-bound) | over dY (not tensor-bound) | Philox passes |"
            if passes else "")
    lines = [f"### {op}: summary ({LABEL})", "", head + more,
             "| --- " + "| ---: " * (7 + (3 if passes else 0)) + "|"]
    for r in results:
        line = (f"| {r['provider']} | {r['launches']} | {r['MB']:.0f} | {r['tensor_GFLOP']:.1f} | "
                f"{r['simt_Ginstr']:.2f} | {r['atomics_M']:.2f} | {r['ms']:.3f} | {r['ms'] / base:.3f}x |")
        if passes:
            line += (f" {r['x_passes']} ({r['x_passes_outside_gemms']}) | {r['dy_passes']} "
                     f"({r['dy_passes_outside_gemms']}) | {r['philox_passes']} |")
        lines.append(line)
    if passes:
        lines += ["", "Passes: kernels that read x (a T x in activation) or dY (a T x out "
                  "gradient); in brackets those that are not tensor-bound (their read of x or dY "
                  "is not hidden under a GEMM's compute)."]
    return lines + [""]


def _details(op: str, results: list[dict]) -> list[str]:
    lines = [f"### {op}: per kernel ({LABEL})", ""]
    for r in results:
        lines += [f"**{r['provider']}**: {r['doc']}", "",
                  "| kernel | HBM MB | tensor GFLOP | SIMT G instr | exp2 G | atomics M | bound | "
                  "modelled ms | pass over |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
        for k in r["kernels"]:
            lines.append(f"| {k['kernel']} | {k['MB']:.1f} | {k['tensor_GFLOP']:.2f} | "
                         f"{k['simt_Ginstr']:.3f} | {k['exp2_G']:.3f} | {k['atomics_M']:.2f} | "
                         f"{k['bound']} | {k['ms']:.4f} | {k['passes']} |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    lora, attn = LoraShape(), AttnShape()
    lora_res = evaluate(LORA_PROVIDERS, lora)
    attn_res = evaluate(ATTN_PROVIDERS, attn)
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in PEAK.items())
    md = [f"# Traffic and FLOP model of the benchmark shapes on an H200 ({LABEL})", "",
          f"**{LABEL[0].upper() + LABEL[1:]}.** Written by `python benchmarks/roofline_model.py`; the "
          "assumptions are in that file's docstring: compulsory HBM traffic only, peaks reached, "
          "per phase max(bytes / bandwidth, work / rate), kernels summed, atomics not timed.",
          "", f"Peaks (per second): {peaks}; Philox: {PHILOX_INSTR} SIMT instructions per "
          "element drawn.", "",
          f"LoRA: T={lora.T}, in={lora.IN}, out={lora.OUT}, r={lora.R}, p=0.1, bf16 x/W, "
          f"{'fp32' if lora.adapter_bytes == 4 else 'bf16'} adapters, forward + backward with W "
          "frozen (dX, dA, dB; no dW). Passes over x / dY: kernels that read a T x in activation "
          "(x or a copy of it) / a T x out gradient; Philox passes: kernels drawing the mask of "
          "every element of x.", "",
          f"Prefix attention: B={attn.B}, Hq={attn.HQ}, Hkv={attn.HKV}, L={attn.L}, P={attn.P}, "
          f"D={attn.D}, bf16, causal (bottom-right), prefix shared by the batch, forward + "
          "backward.", ""]
    md += _summary("LoRA", lora_res, "cuBLAS base linear (floor)", True)
    md += _summary("Prefix attention", attn_res, "FA2 over concatenated keys (PEFT's route)", False)
    fa2 = next(r for r in attn_res if r["provider"].startswith("FA2 over concatenated"))
    kernels_only = sum(k["ms"] for k in fa2["kernels"] if "cat" not in k["kernel"])
    md += [f"FA2's kernels alone (without the concatenation and its backward): "
           f"{kernels_only:.3f} ms; " + "; ".join(
               f"{r['provider']} {r['ms'] / kernels_only:.3f}x of it" for r in attn_res
               if r["provider"].startswith("ours")) + ".", ""]
    md += _details("LoRA", lora_res) + _details("Prefix attention", attn_res)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline_model.md").write_text("\n".join(md) + "\n")
    doc = {"label": LABEL, "peaks_per_s": PEAK, "philox_instr_per_element": PHILOX_INSTR,
           "lora_shape": asdict(lora), "attention_shape": asdict(attn),
           "lora": lora_res, "attention": attn_res}
    (out / "roofline_model.json").write_text(json.dumps(doc, indent=1) + "\n")
    for op, res in (("LoRA", lora_res), ("attention", attn_res)):
        for r in res:
            print(f"{op:9s} {r['provider']:48s} {r['ms']:.3f} ms  ({LABEL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
