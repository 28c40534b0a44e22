"""The dropout keep-mask of the LoRA kernels: drawn once, stored as bits, read back as tiles.

Definition (a pure function of the seed and the element's (row, column), independent of tile
sizes and of the tensor's other dimensions): one Philox4x32-10 call with key = the 64-bit seed
and counter = (column // 8, row, 0, 0) gives four 32-bit words, i.e. eight 16-bit uniforms u;
column ``8 g + i`` uses half ``i % 2`` of word ``i // 2`` and is kept when
``u >= round(65536 p)``, so the drop probability is p rounded to a multiple of 2^-16. One call
serves eight elements, every bit of it used.

Storage: the forward packs the decisions as bits and keeps them in extra columns of the
saved float32 ``s``, 16 per column (bits 0-15 of a word whose high half is 0x3F80, so every
word is a finite float in [1, 1.0079): the saved tensor stays a well-behaved float tensor that
``torch.compile`` and ``opcheck`` may compare; raw bits would form NaNs). Element (m, k) is bit
k % 16 of word k // 16 of row m: T * in / 8 bytes of bits, 8 MiB of words at T = 8192,
in = 4096. The backward reads them back (an eighth of a pass over a bf16 x) instead of running
Philox again: regenerating costs about 80 integer instructions per eight elements (Philox and
the bit work), some 340 M per step at that shape (10 us of issue slots on 132 SMs), on the SMs
that run the GEMMs; reading the words back costs 1.7 us of bandwidth.
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
    right after the ``rank`` columns of S, 16 elements of x per column."""
    return rank, triton.cdiv(in_features, 16)


def saved_s_columns(in_features: int, rank: int, dropout_p: float) -> int:
    """Columns of the ``s`` the Triton forward returns: S's ``rank``, plus the mask's under
    dropout."""
    if float(dropout_p) == 0.0:
        return rank
    return sum(mask_columns(in_features, rank))


def unpack_keep(s: torch.Tensor, rank: int, in_features: int) -> torch.Tensor:
    """The (T, in) bool keep-mask stored in ``s`` (for tests and debugging)."""
    first, count = mask_columns(in_features, rank)
    words = s[:, first:first + count].contiguous().view(torch.int32) & 0xFFFF
    bits = (words[:, :, None] >> torch.arange(16, device=s.device, dtype=torch.int32)) & 1
    return bits.reshape(s.shape[0], -1)[:, :in_features].bool()


@triton.jit
def _pair(word, thr):
    """The two keep bits of one Philox word (low half first)."""
    lo = ((word & 0xFFFF) >= thr).to(tl.int32)
    hi = ((word >> 16) >= thr).to(tl.int32)
    return lo | (hi << 1)


@triton.jit
def _philox(c0, c1, k0, k1):
    """Philox4x32-10 of counter (c0, c1, 0, 0) and key (k0, k1), all uint32: the same function
    as ``tl.philox_impl``, with each 32 x 32 product written as one 64-bit multiply, so one
    IMAD.WIDE gives both halves (``umulhi`` and ``*`` apart cost two)."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        pa = c0.to(tl.uint64) * 0xD2511F53
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def keep_bytes(seed_lo, seed_hi, thr, rows, groups):
    """Keep bytes (int32 0..255) of rows (BM, 1) x column groups (1, G): bit i of [m, g] keeps
    element (m, 8 g + i). One Philox call per byte."""
    c0 = (groups + rows * 0).to(tl.uint32)
    c1 = (rows + groups * 0).to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, seed_lo.to(tl.uint32, bitcast=True),
                             seed_hi.to(tl.uint32, bitcast=True))
    t = thr.to(tl.uint32)
    return _pair(w0, t) | (_pair(w1, t) << 2) | (_pair(w2, t) << 4) | (_pair(w3, t) << 6)


@triton.jit
def store_bytes(mask_ptr, stride_mm, rows, groups, b, ok):
    """Store keep bytes b of rows (BM, 1) x column groups (1, G) into the words of ``mask_ptr``
    (the uint8 view of the mask columns, ``stride_mm`` bytes per row): group g is byte g % 2 of
    word g // 2; the even groups also write the word's constant high half (bytes 0x80, 0x3F)."""
    at = mask_ptr + rows * stride_mm + 4 * (groups // 2)
    tl.store(at + groups % 2, b.to(tl.uint8), mask=ok)
    even = ok & (groups % 2 == 0)
    tl.store(at + 2, tl.full(b.shape, 0x80, tl.uint8), mask=even)
    tl.store(at + 3, tl.full(b.shape, 0x3F, tl.uint8), mask=even)


@triton.jit
def expand_bits(w, BM: tl.constexpr, BN: tl.constexpr, BITS: tl.constexpr):
    """Bytes (BITS 8) or words (BITS 16) (BM, BN // BITS) -> the (BM, BN) bool tile they pack."""
    bits = (w[:, :, None] >> tl.arange(0, BITS)[None, None, :]) & 1
    return tl.reshape(bits, (BM, BN)) != 0


@triton.jit
def load_keep(mask_ptr, stride_mm, rows, w0, T, IN, BM: tl.constexpr, BN: tl.constexpr):
    """The (BM, BN) keep tile of rows (BM, 1) and columns 16 w0 .. 16 w0 + BN - 1 from the
    stored words (false outside x)."""
    w = w0 + tl.arange(0, BN // 16)
    words = tl.load(mask_ptr + rows * stride_mm + w[None, :],
                    mask=(rows < T) & (w[None, :] < tl.cdiv(IN, 16)), other=0.0)
    return expand_bits(words.to(tl.int32, bitcast=True) & 0xFFFF, BM, BN, 16)
