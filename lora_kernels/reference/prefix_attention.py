"""prefix_attention in plain PyTorch: the oracle of the tests and the torch backend on the CPU.

- :func:`oracle`: the obvious computation (prefix keys concatenated before the sequence keys,
  an explicit boolean mask, softmax in float32, or float64 for float64 inputs). It is
  differentiable by autograd and is what serves ``dropout_p > 0`` on the CPU.
- :func:`forward` / :func:`backward`: the torch backend of the custom op (the backend contract
  of the package), what CPU tensors run. Nothing is concatenated or expanded per batch row: the
  sequence part runs through PyTorch's CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp and reads
  grouped-query heads without copies), causal attention split into query chunks that attend
  only the keys they can see (the kernel costs Lq * Lk whether causal or not); the prefix part
  is a second flash call on the stride-0 expanded prefix (a view, no copy); the two are merged
  with their log-sum-exps (one lerp). The backward is the FlashAttention one, split the same
  way: with the *merged* output and log-sum-exp, the flash backward of each part gives exactly
  that part of the full gradient (causal squares without padding split their keys into blocks,
  each seen top-left causally by the queries from its first key on).
- :func:`causal_keep`: the bottom-right causal mask, built here once for the whole package.

On other devices the torch backend does not use the custom op: the op calls
:mod:`lora_kernels.reference.prefix_attention_sdpa` (SDPA's fused kernels, autograd's backward).
Called directly on such tensors, :func:`forward` / :func:`backward` fall back to the oracle.
"""
from __future__ import annotations

import functools
import math

import torch

from ..backends import Capabilities

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _as_4d_prefix(prefix: torch.Tensor | None) -> torch.Tensor | None:
    if prefix is None or prefix.dim() == 4:
        return prefix
    return prefix.unsqueeze(0)


def causal_keep(Lq: int, Lk: int, device) -> torch.Tensor:
    """(Lq, Lk) bool, True where query i sees key j: ``j <= i + Lk - Lq``. The queries are the
    last Lq of the Lk positions (bottom-right alignment, as FlashAttention 2 and
    ``torch.nn.attention.bias.causal_lower_right``)."""
    rows = torch.arange(Lq, device=device).unsqueeze(1) + (Lk - Lq)
    return torch.arange(Lk, device=device) <= rows


def keep_mask(Lq: int, Lk: int, key_padding_mask: torch.Tensor | None, causal: bool,
              device) -> torch.Tensor | None:
    """(B or 1, 1, Lq or 1, Lk) bool, True where a query sees a sequence key (bottom-right
    causal and key padding); None when every query sees every key."""
    keep = causal_keep(Lq, Lk, device).view(1, 1, Lq, Lk) if causal else None
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(-1, 1, 1, Lk)
        keep = pad if keep is None else keep & pad
    return keep


def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_lse: bool = False,
):
    """The plain computation, differentiable by autograd.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Hkv, P, D), (Bp, Hkv, P, D) with Bp in
    {1, B}, or None; key_padding_mask (B, Lk) bool (True = keep) or None. All float tensors of
    one dtype. Softmax in float32 (float64 for float64 inputs). Returns out (B, Hq, Lq, D) in
    q's dtype, and with ``return_lse`` also lse (B, Hq, Lq) in the compute dtype.

    Equivalent PyTorch::

        keys = cat([prefix_k.expand(B, ...), k], 2); mask = cat([ones(P), causal & pad], -1)
        out = softmax(q @ keys^T * scale masked by mask) @ cat([prefix_v..., v], 2)
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keep = keep_mask(Lq, Lk, key_padding_mask, causal, q.device)
    if keep is None:
        keep = torch.ones(1, 1, 1, Lk, dtype=torch.bool, device=q.device)
    keep = keep.expand(B, 1, Lq, Lk)
    pk, pv = _as_4d_prefix(prefix_k), _as_4d_prefix(prefix_v)
    if pk is not None and pk.shape[2] > 0:
        P = pk.shape[2]
        k = torch.cat([pk.expand(B, Hkv, P, D), k], 2)
        v = torch.cat([pv.expand(B, Hkv, P, D), v], 2)
        keep = torch.cat([keep.new_ones(B, 1, Lq, P), keep], -1)
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, 1).to(compute)
    v = v.repeat_interleave(rep, 1).to(compute)
    s = (q.to(compute) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    if dropout_p > 0 and training:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = (p @ v).to(q.dtype)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# The torch backend (the CPU path): same contract as lora_kernels/triton/prefix_attention.py.
# The op hands every backend a prefix (Bp, Hkv, P, D) with P > 0, or None.

CAPABILITIES = Capabilities()  # every device, dtype and head dim; dropout through the oracle


def not_supported_reasons(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                          training) -> list[str]:
    """The torch backend serves every valid input."""
    return []


def _sequence_bias(q, Lk, key_padding_mask, causal):
    """How the flash kernel should mask the sequence keys: (is_causal, additive float mask or
    None, rows_without_keys (B, Hq or 1, Lq) bool or None)."""
    B, _, Lq, _ = q.shape
    if key_padding_mask is None and (not causal or Lq == Lk):
        return causal, None, None  # top-left == bottom-right when Lq == Lk
    if key_padding_mask is None:  # causal with Lq != Lk: the same small bias every call
        return False, _causal_bias(Lq, Lk, q.dtype, q.device), None
    keep = keep_mask(Lq, Lk, key_padding_mask, causal, q.device)
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, -math.inf)
    return False, bias, ~keep.any(-1)


@functools.lru_cache(maxsize=64)
def _causal_bias(Lq: int, Lk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, Lq, Lk) additive bottom-right causal mask (read-only, cached)."""
    keep = causal_keep(Lq, Lk, device).view(1, 1, Lq, Lk)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, -math.inf)


# Queries per chunk of the causal split below. PyTorch's CPU flash kernel costs in proportion
# to Lq * Lk whether causal or not (it does not skip the keys a causal query cannot see when
# they share a key block with ones it can), so for causal attention the queries are split into
# chunks, each attending only the keys up to its last query (bottom-right causal within the
# chunk is the global rule): for C chunks the work is (C + 1) / (2 C) of the full square.
CHUNK_ROWS = 64
MAX_CHUNKS = 4
MAX_CHUNKS_BACKWARD = 4


def _causal_chunks(Lq: int, Lk: int, causal: bool, max_chunks: int | None = None
                   ) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) per chunk of queries."""
    n = min(MAX_CHUNKS if max_chunks is None else max_chunks, Lq // CHUNK_ROWS) if causal else 1
    if n <= 1:
        return [(0, Lq, Lk)]
    bounds = [round(i * Lq / n) for i in range(n + 1)]
    return [(a, b, b + Lk - Lq) for a, b in zip(bounds[:-1], bounds[1:])]


def _sequence_chunk_forward(q, k, v, key_padding_mask, causal, scale, a, b, e):
    """Flash attention of queries [a, b) over sequence keys [0, e): (out, lse), lse = -inf and
    out = 0 on rows without a visible key."""
    kpm = None if key_padding_mask is None else key_padding_mask[:, :e]
    qc = q[:, :, a:b]
    is_causal, bias, empty = _sequence_bias(qc, e, kpm, causal)
    out, lse = _flash_fwd(qc, k[:, :, :e], v[:, :, :e], 0.0, is_causal, attn_mask=bias,
                          scale=scale)
    if empty is not None:
        lse = lse.masked_fill(empty, -math.inf)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def _cpu_flash(q: torch.Tensor) -> bool:
    """The split flash path needs PyTorch's CPU flash kernel; elsewhere (the custom op called
    directly: the public op takes the SDPA path there) the oracle serves."""
    return q.device.type == "cpu"


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Bp, Hkv, P, D) or None;
    key_padding_mask (B, Lk) bool or None -> (out (B, Hq, Lq, D) q.dtype, lse (B, Hq, Lq) fp32,
    fp64 for fp64 inputs; -inf and a zero output for a row that sees no key)."""
    if not _cpu_flash(q):
        with torch.no_grad():
            return oracle(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale,
                          return_lse=True)
    B, Hq, Lq, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.numel() == 0:  # PyTorch's CPU flash kernel dies of SIGFPE on Lq = 0
        return torch.zeros_like(q), q.new_full((B, Hq, Lq), -math.inf, dtype=acc)
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    chunks = _causal_chunks(Lq, Lk, causal) if Lk > 0 else []
    if P == 0 and len(chunks) == 1:
        out, lse = _sequence_chunk_forward(q, k, v, key_padding_mask, causal, scale, *chunks[0])
        return out, lse.to(acc)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=acc, device=q.device)
    if P > 0:
        # prefix part, normalised on its own; the expanded prefix is a stride-0 view, no copy
        pk, pv = prefix_k.expand(B, Hkv, P, D), prefix_v.expand(B, Hkv, P, D)
        out_p, lse_p = _flash_fwd(q, pk, pv, 0.0, False, scale=scale)
        lse.copy_(lse_p)
        # merged in place: out = lerp(out_s, out_p, w_p), w_p = sigmoid(lse_p - lse_s), one
        # pass over the output (fp32/fp64; half types merge in fp32 and round once)
        out = out_p if out_p.dtype == acc else out_p.to(acc)
    else:
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
    for a, b, e in chunks:
        out_s, lse_s = _sequence_chunk_forward(q, k, v, key_padding_mask, causal, scale, a, b, e)
        lse_s = lse_s.to(acc)
        if P == 0:
            out[:, :, a:b] = out_s
            lse[:, :, a:b] = lse_s
            continue
        lse_pc = lse[:, :, a:b]
        w_p = torch.sigmoid(lse_pc - lse_s).unsqueeze_(-1)  # 1 where no sequence key is seen
        out_c = out[:, :, a:b]
        torch.lerp(out_s.to(acc), out_c, w_p, out=out_c)
        lse_pc.copy_(torch.logaddexp(lse_pc, lse_s))
    return out.to(q.dtype), lse


def backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of :func:`forward` with respect to its
    tensors, in their shapes and dtypes (dprefix (Bp, Hkv, P, D), or None when P == 0)."""
    if not _cpu_flash(q):
        return _oracle_backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, causal,
                                scale)
    if q.numel() == 0:  # no query: nothing flows back (and the CPU flash kernel cannot run)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                *(None if t is None else torch.zeros_like(t) for t in (prefix_k, prefix_v)))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dout = dout.contiguous()
    # a row that saw no key has lse = -inf and contributes nothing: exp(s - inf) = 0
    lse_b = lse.to(acc).masked_fill(torch.isneginf(lse), math.inf)
    dq = None
    if P > 0:
        Bp = prefix_k.shape[0]
        pk, pv = prefix_k.expand(B, Hkv, P, D), prefix_v.expand(B, Hkv, P, D)
        dq, dpk, dpv = _flash_bwd(dout, q, pk, pv, out, lse_b.to(lse.dtype), 0.0, False,
                                  scale=scale)
        if Bp == 1 and B > 1:
            dpk, dpv = dpk.sum(0, keepdim=True, dtype=acc), dpv.sum(0, keepdim=True, dtype=acc)
        dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
        dq = dq.to(acc)
    else:
        dpk = dpv = None
    dk = dv = None
    chunks = _causal_chunks(Lq, Lk, causal, MAX_CHUNKS_BACKWARD) if Lk > 0 else []
    if len(chunks) > 1 and key_padding_mask is None and Lq == Lk:
        # causal square without padding: split the *keys* instead. Key block [s, e) is seen
        # by queries [s, Lq) only, and in those local coordinates the mask is top-left causal
        # (the kernel's fast path); its dK/dV come out whole, dQ adds up over the blocks.
        dq = torch.zeros(q.shape, dtype=acc, device=q.device) if dq is None else dq
        dks, dvs = [], []
        for s, e, _ in chunks:
            g = _flash_bwd(dout[:, :, s:], q[:, :, s:], k[:, :, s:e], v[:, :, s:e],
                           out[:, :, s:], lse_b[:, :, s:], 0.0, True, scale=scale)
            dq[:, :, s:] += g[0]
            dks.append(g[1])
            dvs.append(g[2])
        return dq.to(q.dtype), torch.cat(dks, 2), torch.cat(dvs, 2), dpk, dpv
    if Lk > 0:
        # the last chunk covers every key: its gradients are the accumulators of dk, dv
        for a, b, e in reversed(chunks):
            kpm = None if key_padding_mask is None else key_padding_mask[:, :e]
            is_causal, bias, _ = _sequence_bias(q[:, :, a:b], e, kpm, causal)
            g = _flash_bwd(dout[:, :, a:b], q[:, :, a:b], k[:, :, :e], v[:, :, :e],
                           out[:, :, a:b], lse_b[:, :, a:b], 0.0, is_causal, attn_mask=bias,
                           scale=scale)
            if dq is None and b - a == Lq:
                dq = g[0]
            elif dq is None:
                dq = torch.zeros(q.shape, dtype=acc, device=q.device)
                dq[:, :, a:b] = g[0]
            else:
                dq[:, :, a:b] += g[0]
            if dk is None:
                dk, dv = g[1].to(acc), g[2].to(acc)
            else:
                dk[:, :, :e] += g[1]
                dv[:, :, :e] += g[2]
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    else:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq = torch.zeros_like(q) if dq is None else dq
    return dq.to(q.dtype), dk, dv, dpk, dpv


def _oracle_backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """Gradients by recomputing the oracle under ``torch.func.vjp`` (the torch backend off the
    CPU). Not ``torch.autograd.grad``: this runs inside a custom op, below the autograd
    dispatch key, where no graph is recorded whatever the grad mode."""
    tensors = [t for t in (q, k, v, prefix_k, prefix_v) if t is not None]

    def run(*ts):
        if prefix_k is None:
            return oracle(*ts, None, None, key_padding_mask, causal, scale)
        return oracle(*ts, key_padding_mask, causal, scale)

    _, vjp = torch.func.vjp(run, *tensors)
    grads = iter(vjp(dout.to(q.dtype)))
    return tuple(None if t is None else next(grads) for t in (q, k, v, prefix_k, prefix_v))


def flops(B: int, Hq: int, Lq: int, Lk: int, P: int, D: int, causal: bool) -> float:
    """Useful forward FLOPs (two matmuls of 2 flops per multiply-add; causal halves the
    sequence square part when Lq == Lk). Backward is 2.5x this."""
    seq = Lq * Lk - (Lq * (Lq - 1) / 2 if causal and Lq == Lk else 0)
    return 4.0 * B * Hq * D * (seq + Lq * P)


__all__ = ["oracle", "forward", "backward", "not_supported_reasons", "flops", "causal_keep",
           "keep_mask"]
