"""lora_linear: ``y = x W^T + b + scaling * dropout(x) A^T B^T`` as a ``torch.library`` custom op.

Two custom ops, ``lora_kernels::lora_linear`` (forward: returns ``y`` and the saved
``s = dropout(x) A^T``) and ``lora_kernels::lora_linear_backward``, each with a fake
implementation, tied together with ``register_autograd``: ``torch.library.opcheck`` passes and
``torch.compile(fullgraph=True)`` traces through the op. The backend (torch, triton, cuda) is
chosen once per call by :mod:`lora_kernels.backends` and passed to both ops as a string; its
module is imported on first use.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _autocast, backends
from .._checks import check_dim, check_same_device, check_tensor

OP = "lora_linear"
backends.register_op(OP, {
    "torch": "lora_kernels.reference.lora_linear",
    "triton": "lora_kernels.triton.lora_linear",
    "cuda": "lora_kernels.cuda.lora_linear",
})


def _s_dtype(adapter_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(adapter_dtype, torch.float32)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """x (T, in), weight (out, in), bias (out,)?, lora_A (r, in), lora_B (out, r)
    -> y (T, out), s (T, r)."""
    with _autocast.disabled(x.device.type):
        return backends.load(OP, backend).forward(x, weight, bias, lora_A, lora_B, scaling,
                                                  dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    # A backend may save more than S in s (the triton one: its packed dropout mask).
    columns = getattr(backends.load(OP, backend), "saved_s_columns", None)
    r = lora_A.shape[0] if columns is None else columns(x.shape[1], lora_A.shape[0], dropout_p)
    s = x.new_empty(x.shape[0], r, dtype=_s_dtype(lora_A.dtype))
    return y, s


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: Tensor,
    scaling: float, dropout_p: float, seed: int, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dA, dB); an empty tensor where ``needs`` is False."""
    with _autocast.disabled(x.device.type):
        grads = backends.load(OP, backend).backward(
            dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, tuple(needs)
        )
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs, backend):
    shapes = [
        (x.shape, x.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), dy.dtype),
        (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype),
    ]
    return tuple(
        dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0)
        for need, (shape, dtype) in zip(needs, shapes)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, s = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, s)
    ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
    ctx.mark_non_differentiable(s)


def _backward(ctx, dy, _ds):
    x, weight, lora_A, lora_B, s = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if not any(needs):
        return (None,) * 9
    grads = _lora_linear_backward_op(
        dy, x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, ctx.seed, needs, ctx.backend
    )
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out,
                seed):
    """Every argument check, before anything runs; returns (in_features, out_features)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected x's dtype {x.dtype}, got {bias.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: expected lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if fan_in_fan_out:
        in_features, out_features = weight.shape
        layout = "weight (in, out) [fan_in_fan_out=True]"
    else:
        out_features, in_features = weight.shape
        layout = "weight (out, in)"
    check_dim("x", x.shape[-1], in_features, f"last dim = in_features of {layout}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows (r, in), got shape {tuple(lora_A.shape)}")
    check_dim("lora_A", lora_A.shape[1], in_features, f"shape[1] = in_features of {layout}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(
            f"lora_B: expected shape (out, r) = ({out_features}, {r}), got {tuple(lora_B.shape)}"
        )
    if bias is not None:
        check_dim("bias", bias.shape[0], out_features, "length = out_features")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    return in_features, out_features


def _choose(backend, x2, w, bias, lora_A, lora_B, p, training) -> str:
    if not torch.compiler.is_compiling():
        return backends.choose(OP, backend, x2.device, x=x2, weight=w, bias=bias, lora_A=lora_A,
                               lora_B=lora_B, dropout_p=p, training=training)
    # traced: chosen once from static metadata (the number of tokens given as 1)
    out_f, in_f = w.shape
    adt = lora_A.dtype
    return backends.choose_static(OP, backend, x2.device, (
        ("x", backends.spec((1, in_f), x2.dtype)), ("weight", backends.spec((out_f, in_f), w.dtype)),
        ("bias", None if bias is None else backends.spec((out_f,), bias.dtype)),
        ("lora_A", backends.spec(lora_A.shape, adt)), ("lora_B", backends.spec(lora_B.shape, adt)),
        ("dropout_p", p), ("training", training)))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, training=True,
                fan_in_fan_out=False, seed=None, backend="auto"):
    """Fused LoRA linear layer: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Args:
        x: (..., in) float32/float16/bfloat16 (float64 on the torch backend), any strides.
        weight: (out, in) in x's dtype, or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D).
        bias: (out,) in x's dtype, or None.
        lora_A: (r, in) and lora_B: (out, r), both in the adapter dtype (may differ from x's:
            fp32 adapters over a bf16/fp16 base, as PEFT keeps them; the LoRA term is then
            computed in the adapter dtype and added to the base output).
        scaling: float, ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
        dropout_p: float in [0, 1), dropout on x before ``A`` (only when ``training``).
        training: with False (or ``dropout_p == 0``) no mask is made at all.
        fan_in_fan_out: ``weight`` is stored (in, out).
        seed: int seeding the dropout mask (a pure function of the seed and the element index;
            the backward regenerates it); None draws one from torch's default generator (under
            ``torch.compile`` with dropout, pass a seed: drawing one breaks the graph).
        backend: "auto", "torch", "triton" or "cuda" (see :mod:`lora_kernels.backends`).

    Under ``torch.autocast`` x, weight and bias are first cast to the autocast dtype (as
    ``F.linear`` would take them; the adapters keep theirs), so y comes in that dtype.

    Returns: (..., out) in x's dtype. Gradients flow to x, weight, bias, lora_A and lora_B
    (weight and bias gradients are computed only when they require grad).

    Equivalent PyTorch::

        w = weight.t() if fan_in_fan_out else weight
        y = F.linear(x, w, bias) + scaling * F.dropout(x, dropout_p, training) @ lora_A.t() @ lora_B.t()
    """
    if isinstance(x, Tensor):  # under autocast, cast as F.linear's inputs would be
        x, weight, bias = _autocast.cast_inputs(x.device.type, x, weight, bias)
    in_features, out_features = _check_args(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, seed
    )
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features)
    w = weight.t() if fan_in_fan_out else weight
    p = float(dropout_p) if training else 0.0
    name = _choose(backend, x2, w, bias, lora_A, lora_B, p, training)
    if p == 0.0:
        seed = 0
    elif seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    y, _ = _lora_linear_op(x2, w, bias, lora_A, lora_B, float(scaling), p, int(seed), name)
    return y.reshape(*lead, out_features)
