"""The dropout keep-mask of the LoRA kernels: drawn once, stored as bits, read back as tiles.

Definition (a pure function of the seed and the element's (row, column), independent of tile
sizes and of the tensor's other dimensions): one Philox4x32-10 call with key = the 64-bit seed
and counter = (column // 8, row, 0, 0) gives four 32-bit words, i.e. eight 16-bit uniforms u;
column ``8 g + i`` uses half ``i % 2`` of word ``i // 2`` and is kept when
``u >= round(65536 p)``, so the drop probability is p rounded to a multiple of 2^-16. One call
serves eight elements, every bit of it used.

Storage: the forward packs the eight decisions of a call into one byte (bit i = column 8 g + i)
and keeps the bytes in extra columns of the saved ``s`` (float32 columns used as raw bytes, see
:func:`mask_columns`): T * in / 8 bytes, 4 MiB at T = 8192, in = 4096. The backward reads
them back (a tenth of a pass over a bf16 x) instead of running Philox again: regenerating costs
about 70 integer instructions per eight elements, some 300 M per step at that shape, on the SMs
that run the GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def threshold(dropout_p: float) -> int:
    """16-bit uniforms below this are dropped."""
    return min(int(round(float(dropout_p) * 65536)), 65536)


def seed_words(seed: int) -> tuple[int, int]:
    """The Philox key (low, high 32 bits of the seed) as signed int32 values, so a launch
    always passes two i32 arguments, whatever the seed (no recompilation by seed type)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF

    def signed(w):
        return w - (1 << 32) if w >= 1 << 31 else w

    return signed(seed & 0xFFFFFFFF), signed(seed >> 32)


def mask_columns(in_features: int, rank: int) -> tuple[int, int]:
    """(first column, number of columns) of the packed mask inside the saved float32 ``s``:
    after the ``rank`` columns of S, rounded up to 16 bytes; ``in / 8`` bytes per row, rounded
    up to 16 bytes, so every row of bytes starts 16-byte aligned."""
    return triton.cdiv(rank, 4) * 4, triton.cdiv(in_features, 128) * 4


def saved_s_columns(in_features: int, rank: int, dropout_p: float) -> int:
    """Columns of the ``s`` the Triton forward returns: S's ``rank``, plus the mask's under
    dropout."""
    if float(dropout_p) == 0.0:
        return rank
    first, count = mask_columns(in_features, rank)
    return first + count


def mask_bytes(s: torch.Tensor, rank: int, in_features: int) -> torch.Tensor:
    """The (T, in / 8 rounded up) uint8 view of the packed mask inside ``s``."""
    first, count = mask_columns(in_features, rank)
    return s.view(torch.uint8)[:, 4 * first: 4 * first + triton.cdiv(in_features, 8)]


def unpack_keep(s: torch.Tensor, rank: int, in_features: int) -> torch.Tensor:
    """The (T, in) bool keep-mask stored in ``s`` (for tests and debugging)."""
    b = mask_bytes(s, rank, in_features).to(torch.int32)
    bits = (b[:, :, None] >> torch.arange(8, device=s.device, dtype=torch.int32)) & 1
    return bits.reshape(s.shape[0], -1)[:, :in_features].bool()


@triton.jit
def _pair(word, thr):
    """The two keep bits of one Philox word (low half first)."""
    lo = ((word & 0xFFFF) >= thr).to(tl.int32)
    hi = ((word >> 16) >= thr).to(tl.int32)
    return lo | (hi << 1)


@triton.jit
def keep_bytes(seed_lo, seed_hi, thr, rows, groups):
    """Keep bytes (int32 0..255) of rows (BM, 1) x column groups (1, G): bit i of [m, g] keeps
    element (m, 8 g + i). One Philox call per byte."""
    c0 = (groups + rows * 0).to(tl.uint32)
    c1 = (rows + groups * 0).to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, zero, zero, seed_lo.to(tl.uint32, bitcast=True),
                                    seed_hi.to(tl.uint32, bitcast=True))
    t = thr.to(tl.uint32)
    return _pair(w0, t) | (_pair(w1, t) << 2) | (_pair(w2, t) << 4) | (_pair(w3, t) << 6)


@triton.jit
def expand_bits(b, BM: tl.constexpr, BN: tl.constexpr):
    """Bytes (BM, BN // 8) -> the (BM, BN) bool tile they pack (bit i -> column 8 g + i)."""
    bits = (b[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BM, BN)) != 0


@triton.jit
def load_keep(mask_ptr, stride_mm, rows, g0, T, IN, BM: tl.constexpr, BN: tl.constexpr):
    """The (BM, BN) keep tile of rows (BM, 1) and columns 8 g0 .. 8 g0 + BN - 1 from the packed
    bytes (false outside x)."""
    g = g0 + tl.arange(0, BN // 8)
    b = tl.load(mask_ptr + rows * stride_mm + g[None, :],
                mask=(rows < T) & (g[None, :] < tl.cdiv(IN, 8)), other=0)
    return expand_bits(b.to(tl.int32), BM, BN)
