"""prefix_attention: attention in which every query also sees a learned prefix of keys and
values (prefix tuning).

The op layer: argument checks (before any kernel), the prefix normalised once (a 3-D shared
prefix becomes (1, Hkv, P, D), an empty one None: backends see (Bp, Hkv, P, D) with P > 0, or
None), the backend choice (:mod:`lora_kernels.backends`), and the ``torch.library`` custom ops
``lora_kernels::prefix_attention_fwd`` -> (out, lse) and ``lora_kernels::prefix_attention_bwd``
with fake implementations and registered autograd, so ``torch.compile`` traces them.

The torch backend takes two routes. On CPU tensors, the custom op (the split CPU flash path of
:mod:`lora_kernels.reference.prefix_attention`). On CUDA tensors (any device but the CPU), no
custom op: SDPA's fused kernels composed in Python, differentiated by autograd
(:mod:`lora_kernels.reference.prefix_attention_sdpa`), so its backward is SDPA's fused backward
and it costs no more than PEFT's route. The triton and cuda backends run through the custom op.
"""

from __future__ import annotations

import logging
import numbers

import torch

from .. import _autocast, backends
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import prefix_attention_sdpa as _sdpa
from ..reference.prefix_attention import oracle

OP = "prefix_attention"
backends.register_op(OP, {
    "torch": "lora_kernels.reference.prefix_attention",
    "triton": "lora_kernels.triton.prefix_attention",
    "cuda": "lora_kernels.cuda.prefix_attention",
})
logger = logging.getLogger("lora_kernels")
_dropout_logged = False


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lora_kernels::prefix_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with _autocast.disabled(q.device.type):
        out, lse = backends.load(OP, backend).forward(q, k, v, prefix_k, prefix_v,
                                                      key_padding_mask, causal, scale)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q))


@torch.library.custom_op("lora_kernels::prefix_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _autocast.disabled(q.device.type):
        dq, dk, dv, dpk, dpv = backends.load(OP, backend).backward(
            dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale)
    if prefix_k is None:  # a custom op cannot return None: empty placeholders
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dpk.contiguous(), dpv.contiguous()


@_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, backend):
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.has_prefix = prefix_k is not None


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = torch.ops.lora_kernels.prefix_attention_bwd(
        dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, ctx.causal, ctx.scale,
        ctx.backend)
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# checks and the public function


def _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p):
    """Every 'bad input' rule of the op; raises TypeError/ValueError naming what came."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v: expected both or neither, got "
                         f"prefix_k={'None' if prefix_k is None else 'a tensor'}, "
                         f"prefix_v={'None' if prefix_v is None else 'a tensor'}")
    if prefix_k is not None:
        check_tensor("prefix_k", prefix_k, ndim=(3, 4), dtypes=FLOAT_DTYPES)
        check_tensor("prefix_v", prefix_v, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
    check_same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v,
                      key_padding_mask=key_padding_mask)
    dtypes = {n: t.dtype for n, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k),
                                      ("prefix_v", prefix_v)) if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"prefix_attention: expected one dtype for all tensors, got {listing}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes (B, Hkv, Lk, D), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"q: expected head dim D >= 1, got shape {tuple(q.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k: expected batch size {B} (from q), got {Bk}")
    if Dk != D:
        raise ValueError(f"k, v: expected head dim {D} (from q), got {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"expected the query heads Hq={Hq} to be a multiple of the key/value "
                         f"heads Hkv={Hkv}")
    if Lq > Lk:
        raise ValueError(f"expected Lq <= Lk (queries are the last Lq of Lk positions), got "
                         f"Lq={Lq}, Lk={Lk}")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k, prefix_v: expected equal shapes, got "
                             f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        want = "(Hkv, P, D) or (B, Hkv, P, D)"
        shape = tuple(prefix_k.shape)
        if shape[-3] != Hkv or shape[-1] != D:
            raise ValueError(f"prefix_k/v: expected {want} with Hkv={Hkv}, D={D}, got {shape}")
        if prefix_k.dim() == 4 and shape[0] not in (1, B):
            raise ValueError(f"prefix_k/v: expected a batch of 1 or {B}, got {shape}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Lk):
        raise ValueError(f"key_padding_mask: expected shape (B, Lk) = {(B, Lk)}, got "
                         f"{tuple(key_padding_mask.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                     key_padding_mask=None, scale=None, dropout_p=0.0, training=True,
                     backend="auto"):
    """Attention over a learned prefix of keys/values followed by the sequence keys.

    Args:
        q: (B, Hq, Lq, D) float32/float16/bfloat16 (float64 on the torch backend), any strides.
        k, v: (B, Hkv, Lk, D), same dtype; Hq % Hkv == 0 (grouped-query attention, no copies);
            Lq <= Lk: the queries are the last Lq of the Lk positions.
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or (B, Hkv, P, D) per row, P >= 0;
            None for no prefix (P = 0). Every query sees every prefix key.
        causal: query i sees sequence key j iff j <= i + (Lk - Lq) (bottom-right alignment).
        key_padding_mask: (B, Lk) bool, True = keep, or None; hides sequence keys only.
        scale: float, default D ** -0.5.
        dropout_p: attention dropout in training (served by the torch backend: SDPA's own on
            CUDA tensors, the oracle on the CPU).
        training: dropout applies only when True.
        backend: "auto", "torch", "triton" or "cuda" (see lora_kernels.backends).

    Under ``torch.autocast`` the tensors are first cast to the autocast dtype, as
    ``scaled_dot_product_attention``'s would be.

    Returns:
        (B, Hq, Lq, D) in q's dtype; a query row that sees no key at all is 0 (never NaN).

    Equivalent PyTorch::

        keys = torch.cat([prefix_k.expand(B, Hkv, P, D), k], 2)  # and the same for values
        mask = torch.cat([ones(Lq, P), causal_bottom_right(Lq, Lk) & key_padding_mask], -1)
        out = softmax(q @ keys.repeat_interleave(Hq // Hkv, 1).mT * scale, masked) @ values
    """
    if isinstance(q, torch.Tensor):  # under autocast, cast as SDPA's inputs would be
        q, k, v, prefix_k, prefix_v = _autocast.cast_inputs(q.device.type, q, k, v, prefix_k,
                                                            prefix_v)
    _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p)
    if prefix_k is not None and prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    if prefix_k is not None and prefix_k.shape[2] == 0:
        prefix_k = prefix_v = None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p) if training else 0.0
    name = _choose(backend, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p,
                   training)
    if name == "torch" and _sdpa.serves(q.device):
        with _autocast.disabled(q.device.type):
            return _sdpa.attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale,
                                   dropout_p)
    if dropout_p > 0:
        _log_dropout_once(name)
        return oracle(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale,
                      dropout_p=dropout_p, training=True)
    out, _ = torch.ops.lora_kernels.prefix_attention_fwd(
        q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, name)
    return out


def _choose(backend, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p, training):
    if not torch.compiler.is_compiling():
        return backends.choose(OP, backend, q.device, q=q, k=k, v=v, prefix_k=prefix_k,
                               prefix_v=prefix_v, key_padding_mask=key_padding_mask,
                               causal=causal, dropout_p=dropout_p, training=training)
    # traced: chosen once from static metadata (batch and lengths given as 1)
    _, Hq, _, D = q.shape
    Hkv = k.shape[1]
    kv = backends.spec((1, Hkv, 1, D), k.dtype)
    pk = None if prefix_k is None else backends.spec((1, Hkv, prefix_k.shape[2], D), k.dtype)
    mask = None if key_padding_mask is None else backends.spec((1, 1), torch.bool)
    return backends.choose_static(OP, backend, q.device, (
        ("q", backends.spec((1, Hq, 1, D), q.dtype)), ("k", kv), ("v", kv), ("prefix_k", pk),
        ("prefix_v", pk), ("key_padding_mask", mask), ("causal", causal),
        ("dropout_p", dropout_p), ("training", training)))


def _log_dropout_once(name: str) -> None:
    global _dropout_logged
    if not _dropout_logged:
        _dropout_logged = True
        logger.debug("lora_kernels: prefix_attention with dropout_p > 0 in training runs the "
                     "torch reference (backend %r)", name)
