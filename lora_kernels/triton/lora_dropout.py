"""The dropout keep-mask of the LoRA kernels: drawn once, stored as bits, read back as tiles.

Definition (a pure function of the seed and the element's (row, column), independent of tile
sizes and of the tensor's other dimensions): one Philox4x32-10 call with key = the 64-bit seed
and counter = (column // 8, row, 0, 0) gives four 32-bit words, i.e. eight 16-bit uniforms u;
column ``8 g + i`` uses half ``i % 2`` of word ``i // 2`` and is kept when ``u >= t``,
``t = min(round(65536 p), 65535)``: the drop probability is p rounded to a multiple of 2^-16
(at most 1 - 2^-16). One call serves eight elements, every bit of it used.

Drawing it is integer work on the CUDA cores, which is what bounds the shrink (the pass over x
that draws it), so the draw is shaped for few instructions: the thread that holds Philox word j
of a call also holds x's elements 8 g + 2j, 8 g + 2j + 1, which a 16-bit x keeps in one 32-bit
register; the keep decision becomes a mask with 0xFFFF over each kept half
(:func:`keep_masks`), ANDed onto the pair at once (:func:`pair_masks`), and the same masks give
the stored bits (a bit of a kept half is set wherever one looks: :func:`keep_halfwords`).

Storage: the forward keeps the decisions as bits in extra columns of the saved float32 ``s``,
16 per column: word w of row m holds elements 16 w .. 16 w + 7 in its byte 0 and
16 w + 8 .. 16 w + 15 in its byte 2 (bit i: element + i); bytes 1 and 3 are the constants 0x00
and 0x3F, so every word is a finite float in [0.5, 2): the saved tensor stays a well-behaved
float tensor that ``torch.compile`` and ``opcheck`` may compare (raw bits would form NaNs).
Each Philox call's thread writes its own 16-bit half of a word (byte and constant), so no
exchange between threads is needed. T * in / 8 bytes of bits, 8 MiB of words at T = 8192,
in = 4096. The backward reads them back (an eighth of a pass over a bf16 x) instead of running
Philox again: regenerating costs about 60 integer instructions per eight elements (Philox and
the bit work) on the SMs that run the GEMMs; reading the words back costs 1.7 us of bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def threshold(dropout_p: float) -> int:
    """16-bit uniforms below this are dropped (below 65536: its shift by 16 fits a word)."""
    return min(int(round(float(dropout_p) * 65536)), 65535)


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
    words = s[:, first:first + count].contiguous().view(torch.int32)
    words = (words & 0xFF) | ((words >> 8) & 0xFF00)
    bits = (words[:, :, None] >> torch.arange(16, device=s.device, dtype=torch.int32)) & 1
    return bits.reshape(s.shape[0], -1)[:, :in_features].bool()


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
def keep_masks(seed_lo, seed_hi, thr, rows, groups):
    """The keep decisions of rows (BM, 1) x column groups (1, G) as four (BM, G) uint32 masks,
    one per Philox word j: 0xFFFF over each kept half (low half: element 8 g + 2 j, high half:
    8 g + 2 j + 1). One Philox call per (row, group)."""
    c0 = (groups + rows * 0).to(tl.uint32)
    c1 = (rows + groups * 0).to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, seed_lo.to(tl.uint32, bitcast=True),
                             seed_hi.to(tl.uint32, bitcast=True))
    t = thr.to(tl.uint32)
    t_hi = t << 16  # the high half is kept when the word is >= t << 16 (t < 65536)
    return (_halves(w0, t, t_hi), _halves(w1, t, t_hi), _halves(w2, t, t_hi),
            _halves(w3, t, t_hi))


@triton.jit
def _halves(w, t, t_hi):
    m = tl.where(w >= t_hi, 0xFFFF0000, 0).to(tl.uint32)
    return tl.where((w << 16) >= t_hi, m | 0xFFFF, m)


@triton.jit
def pair_masks(m0, m1, m2, m3, BM: tl.constexpr, BK: tl.constexpr):
    """(BM, BK // 2) uint32: the masks of :func:`keep_masks` in column order, mask c covering
    elements 2 c and 2 c + 1 of the tile (the register layout of a 16-bit x's pairs)."""
    # join(join(m0, m2), join(m1, m3))[.., a, t] is m_(2 a + t): in order once flattened
    return tl.reshape(tl.join(tl.join(m0, m2), tl.join(m1, m3)), (BM, BK // 2))


@triton.jit
def keep_halfwords(m0, m1, m2, m3, groups):
    """The stored 16-bit half of a mask word for each (row, group) (see the module docstring):
    the group's eight keep bits, then 0x00 (even group: low half) or 0x3F (odd group)."""
    # every bit of a kept half is set: bit 2 j (and 16 + 2 j) straight from word j's mask;
    # bits 8-13 carry the constant byte, which the fold below leaves alone
    top = tl.where(groups % 2 == 0, 0, 0x3F00).to(tl.uint32)
    g = (m0 & 0x10001) | (m1 & 0x40004) | (m2 & 0x100010) | (m3 & 0x400040) | top
    return (g + (g >> 15)).to(tl.uint16)  # bits 16 + 2 j -> 2 j + 1 (bits 16-22 cut off)


@triton.jit
def load_keep(mask_ptr, stride_mm, rows, w0, T, IN, BM: tl.constexpr, BN: tl.constexpr):
    """The (BM, BN) keep tile of rows (BM, 1) and columns 16 w0 .. 16 w0 + BN - 1 from the
    stored words (false outside x)."""
    w = w0 + tl.arange(0, BN // 16)
    words = tl.load(mask_ptr + rows * stride_mm + w[None, :],
                    mask=(rows < T) & (w[None, :] < tl.cdiv(IN, 16)), other=0.0)
    bit = tl.arange(0, 16)
    bit = bit + (bit // 8) * 8  # elements 8-15 of a word sit in its byte 2
    bits = (words.to(tl.int32, bitcast=True)[:, :, None] >> bit[None, None, :]) & 1
    return tl.reshape(bits, (BM, BN)) != 0
