"""LoRALinear: a drop-in replacement for nn.Linear (or GPT-2's Conv1D) with a trainable
low-rank update beside the frozen weight, computed by the fused ``lora_linear`` op."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import lora_linear

_HALF = (torch.float16, torch.bfloat16)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) stores its weight as (in, out).
    Recognised by duck typing so this tier never imports transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    ``weight`` (out, in), or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D); ``bias`` (out,)
    or None; ``lora_A`` (r, in); ``lora_B`` (out, r); ``scaling = lora_alpha / r`` (or
    ``lora_alpha / sqrt(r)`` with rsLoRA). ``weight`` and ``bias`` are the wrapped layer's own
    Parameter objects, so the layer's state-dict keys ``weight``/``bias`` do not change.
    Adapters are kept in fp32 over an fp16/bf16 base, as PEFT does.

    Equivalent PyTorch::

        y = F.linear(x, W, b) + scaling * (F.dropout(x, p) @ A.T @ B.T)
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D tensor, got {getattr(weight, 'shape', weight)}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected a value in [0, 1), got {lora_dropout}")
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        self.fan_in_fan_out = fan_in_fan_out
        self.backend = backend
        self.merged = False
        adapter_dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        kw = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.reset_lora_parameters(init_lora_weights)
        # The module this layer replaced (if any), returned by to_linear(); kept outside
        # _modules so it adds no state-dict keys.
        self.__dict__["_original"] = None

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        *,
        freeze_base: bool = True,
        backend: str = "auto",
    ) -> LoRALinear:
        """Wrap an ``nn.Linear`` or transformers' ``Conv1D``, reusing its Parameters."""
        if isinstance(base, LoRALinear):
            raise TypeError("from_linear: the layer is already a LoRALinear")
        if isinstance(base, nn.Linear):
            fan_in_fan_out = False
        elif is_conv1d(base):
            fan_in_fan_out = True
        else:
            raise TypeError(f"from_linear: expected nn.Linear or Conv1D, got {type(base).__name__}")
        if freeze_base:
            base.weight.requires_grad_(False)
            if base.bias is not None:
                base.bias.requires_grad_(False)
        layer = cls(
            base.weight,
            base.bias,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            fan_in_fan_out=fan_in_fan_out,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            backend=backend,
        )
        layer.__dict__["_original"] = base
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """True: A Kaiming-uniform, B zero (PEFT's default); "gaussian": A normal with std 1/r,
        B zero; False: both random (the update is non-zero from the start, for tests)."""
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            raise ValueError(
                f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}"
            )

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the layout of ``weight`` ((in, out) with fan_in_fan_out), fp32
        or the adapter dtype."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the low-rank update into ``weight`` in place (forward is then the plain layer)."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        w = self.weight
        w.copy_((w.to(self.lora_A.dtype) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the low-rank update from ``weight`` again."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        w = self.weight
        w.copy_((w.to(self.lora_A.dtype) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def to_linear(self) -> nn.Module:
        """The merged plain layer: the module this one replaced (same class, same Parameter
        objects), or a new ``nn.Linear`` sharing ``weight``/``bias``."""
        if not self.merged:
            self.merge()
        original = self.__dict__["_original"]
        if original is not None:
            return original
        if self.fan_in_fan_out:
            raise TypeError("to_linear: a fan_in_fan_out layer built without from_linear has no original Conv1D")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        if self.merged:
            w = self.weight.t() if self.fan_in_fan_out else self.weight
            return nn.functional.linear(x, w, self.bias)
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.lora_dropout,
            training=self.training,
            fan_in_fan_out=self.fan_in_fan_out,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}"
            f"{', rslora' if self.use_rslora else ''}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"adapter_dtype={str(self.lora_A.dtype).replace('torch.', '')}, merged={self.merged}"
        )
