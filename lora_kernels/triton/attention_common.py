"""What the prefix-attention Triton kernels share: constants, the dot and tile-load helpers, the
autotune configurations of every kernel (one table, enumerable by `configs_for`), the autotune
key buckets, the device guard, and the single launch hook.

Design notes for the kernels live in docs/ARCHITECTURE.md and benchmarks/README.md
("Prefix attention kernels").
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# device_guard is re-exported: the launchers call common.device_guard
from ._common import INTERPRETER, device_guard, pow2_bucket  # noqa: F401

# exp(x) = exp2(x * LOG2E); the kernels keep scores in base 2 and report natural-log LSEs.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))

# ----------------------------------------------------------------------------------------------
# autotune configurations, one table for every kernel
#
# Row: (tile sizes, num_warps, num_stages, head-dim tiles BLOCK_D it may serve). Every row that
# can serve a BLOCK_D compiles for sm_90 with no spills, no global atomics and wgmma in every
# bf16/fp16 dot (checked by the static profile, benchmarks/README.md); a row that spilled was
# removed, not kept for another head dim. A matmul whose result feeds another one puts every
# warp on its M side: with 8 warps M must be >= 128 (4 warps: 64) or both warpgroups compute
# the same rows, so 8-warp rows have 128-row M sides.
_SMALL_D = (16, 32, 64)
_UP_TO_128 = (16, 32, 64, 128)
_TABLE: dict[str, list[tuple[dict, int, int, tuple[int, ...]]]] = {
    # forward, Lq > 16: query tile BLOCK_M x key tile BLOCK_N
    "fwd": [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, _UP_TO_128),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3, _SMALL_D),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3, _UP_TO_128),
        ({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 2, (256,)),
    ],
    # forward, Lq <= 16 (queries of a kv head packed in BLOCK_R rows): key tile BLOCK_N
    "decode": [
        ({"BLOCK_N": 64}, 4, 3, _UP_TO_128),
        ({"BLOCK_N": 128}, 8, 3, _UP_TO_128),
        # D = 256: the (256, BLOCK_R) accumulator leaves room for 32-key tiles only (64-key
        # tiles spilled with 4 or 8 warps and 1 to 3 stages); S^T then runs on mma.sync
        ({"BLOCK_N": 32}, 4, 3, (256,)),
    ],
    # backward dK/dV (+ the prefix gradient, + dS): key tile BLOCK_N x query tile BLOCK_M;
    # the prefix programs' query tile BLOCK_MP = 16 x num_warps (a chained wgmma puts every
    # warp on the M side: a smaller M would be computed twice) with PREFIX_STAGES stages.
    # D > 128: every program takes half of the head dim for dK, dV; the prefix programs
    # compute their scores by head-dim chunks (whole 128 x 256 tiles spilled).
    "bwd_kv": [
        ({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_MP": 128, "PREFIX_STAGES": 2}, 8, 3, _UP_TO_128),
        ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_MP": 128, "PREFIX_STAGES": 2}, 8, 3, _UP_TO_128),
        ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_MP": 64, "PREFIX_STAGES": 2}, 4, 3, _UP_TO_128),
        ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_MP": 128, "PREFIX_STAGES": 1}, 8, 2, (256,)),
    ],
    # backward dQ = dS @ K from the stored dS: query tile BLOCK_M x key tile BLOCK_N
    "bwd_dq": [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, _UP_TO_128),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3, _UP_TO_128 + (256,)),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3, _SMALL_D),
    ],
    # backward dQ recomputing S and dP (when the dS workspace would be too large)
    "bwd_dq_recompute": [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, _UP_TO_128),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3, _UP_TO_128),
        ({"BLOCK_M": 128, "BLOCK_N": 16}, 8, 2, (256,)),
    ],
}
KERNELS = tuple(_TABLE)
# rows that serve launches without a key-padding mask only (HAS_PAD = False): with the mask's
# registers the 32 x 128, 8-warp dK/dV row spills 4 bytes under Triton 3.6 at D = 128
_UNPADDED_ONLY = {
    "bwd_kv": [({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_MP": 128, "PREFIX_STAGES": 2}, 8, 3)],
}
# widest head-dim slice of the dK/dV accumulators of one backward program: with D = 256 each
# program takes half of the head dim (S and dP still over all of it), or the accumulators
# alone would fill the registers
MAX_GRAD_TILE_D = 128
_INTERPRETER_TILES = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}, "decode": {"BLOCK_N": 16},
                      "bwd_kv": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_MP": 16,
                                 "PREFIX_STAGES": 1},
                      "bwd_dq": {"BLOCK_M": 16, "BLOCK_N": 16},
                      "bwd_dq_recompute": {"BLOCK_M": 16, "BLOCK_N": 16}}


def configs_for(kernel: str, block_d: int | None = None, interpreter: bool = INTERPRETER,
                padded: bool = False) -> list[triton.Config]:
    """The autotune configs of ``kernel`` (one of KERNELS) that may serve head-dim tile
    ``block_d`` (all of them for None), for a launch with a key-padding mask if ``padded``.
    In Triton's interpreter one small config."""
    if interpreter:
        return [triton.Config(dict(_INTERPRETER_TILES[kernel]), num_warps=1, num_stages=1)]
    unpadded_only = _UNPADDED_ONLY.get(kernel, []) if padded else []
    return [triton.Config(dict(tiles), num_warps=w, num_stages=s)
            for tiles, w, s, dims in _TABLE[kernel]
            if (block_d is None or block_d in dims) and (tiles, w, s) not in unpadded_only]


def _signature(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def autotune(kernel: str, key: list[str], restore: list[str] | None = None):
    """triton.autotune over ``configs_for(kernel)``, pruned to the rows that serve the launch's
    BLOCK_D and HAS_PAD; LORA_KERNELS_AUTOTUNE=0 keeps only the first (quick GPU tests).
    ``restore``: the arguments a launch may update in place, restored after each timed run."""

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        padded = bool(kwargs.get("HAS_PAD", named_args.get("HAS_PAD", False)))
        allowed = {_signature(c) for c in configs_for(kernel, block_d, padded=padded)}
        keep = [c for c in configs if _signature(c) in allowed] or configs[:1]
        if os.environ.get("LORA_KERNELS_AUTOTUNE", "1").strip() == "0":
            keep = keep[:1]
        return keep

    tune = triton.autotune(configs=configs_for(kernel), key=key, restore_value=restore,
                           prune_configs_by={"early_config_prune": prune})

    def decorate(fn):
        tuner = tune(fn)
        tuner.config_table = kernel  # its entry in the table above (the static profile reads it)
        return tuner

    return decorate


def max_tile(kernel: str, name: str) -> int:
    """The largest value of tile parameter ``name`` among the configs of ``kernel``."""
    return max(c.kwargs[name] for c in configs_for(kernel))


def bucket(n: int) -> int:
    """Autotune key of a length: the next power of two, uncapped (a new length does not
    re-tune)."""
    return pow2_bucket(n, cap=None)


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def prefix_tile(P: int) -> int:
    """Width of the prefix key tile: its own, so P = 32 fills a 32-wide tile (16..64)."""
    return min(64, max(16, triton.next_power_of_2(max(1, P))))


def dot_fp32(dtype: torch.dtype) -> bool:
    """IEEE fp32 dots for fp32 inputs (the interpreter's tests only: on a GPU the launchers
    refuse fp32), and for bf16 in the interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or (INTERPRETER and dtype == torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# launching


def launch(kernel, grid, *args, **kwargs) -> None:
    """The one place every attention kernel is launched from (tests and the static profile
    replace it to see the grids and arguments). Grids are 1-D: axis 0 takes up to 2**31 - 1
    programs, the others only 65,535."""
    kernel[grid](*args, **kwargs)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100/H200's 132 elsewhere, so a plan made on
    the CPU or the meta device is the one a GPU run makes)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# ----------------------------------------------------------------------------------------------
# in-kernel helpers


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with an fp32 accumulator: IEEE fp32 when DOT_FP32, else tensor cores in the
    operands' dtype."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile, masked only where needed (zeros outside): an unmasked load vectorises."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    if MASK_ROWS and MASK_COLS:
        tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])
    elif MASK_ROWS:
        tl.store(ptrs, x, mask=row_ok[:, None])
    elif MASK_COLS:
        tl.store(ptrs, x, mask=col_ok[None, :])
    else:
        tl.store(ptrs, x)


# ----------------------------------------------------------------------------------------------
# arguments shared by the launchers


class Prefix:
    """The prefix as the kernels read it: pointers, length P, strides (batch stride 0 when one
    prefix is shared by the batch), tile width. ``k``/``v`` are stand-ins when P == 0."""

    def __init__(self, prefix_k, prefix_v, q):
        self.present = prefix_k is not None and prefix_k.shape[2] > 0
        if not self.present:
            self.k = self.v = q
            self.P, self.shared = 0, True
            self.k_strides = self.v_strides = (0, 0, 0, 0)
        else:
            self.k, self.v, self.P = prefix_k, prefix_v, prefix_k.shape[2]
            self.shared = prefix_k.shape[0] == 1
            sk, sv = list(prefix_k.stride()), list(prefix_v.stride())
            if self.shared:
                sk[0] = sv[0] = 0
            self.k_strides, self.v_strides = tuple(sk), tuple(sv)
        self.block = prefix_tile(self.P)


class Padding:
    """The key padding mask as the kernels read it (bytes, 0 = padded)."""

    def __init__(self, key_padding_mask, q):
        self.present = key_padding_mask is not None
        if not self.present:
            self.mask, self.strides = q, (0, 0)
        else:
            self.mask = key_padding_mask.view(torch.uint8)
            self.strides = tuple(self.mask.stride())
