"""PrefixEncoder: the learned prefix of prefix tuning (Li and Liang, 2021), one (key, value)
pair of shape (Hkv, P, D) per layer, optionally produced through a reparameterisation MLP."""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """P virtual tokens -> per-layer prefix keys and values.

    Without projection the trainable tensor is ``embedding.weight`` (P, layers*2*Hkv*D); with
    ``prefix_projection`` it is ``embedding.weight`` (P, token_dim) fed through
    ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size,
    layers*2*Hkv*D)``. The flat output is laid out (P, 2*layers, Hkv, D) with layer ``l``'s key
    at index ``2l`` and its value at ``2l+1`` (PEFT's layout, so PEFT's saved
    ``prompt_embeddings`` load as ``embedding.weight``).

    Equivalent PyTorch::

        flat = mlp(E) if prefix_projection else E                  # (P, layers*2*Hkv*D)
        kv = flat.view(P, 2 * layers, Hkv, D).permute(1, 2, 0, 3)   # (2*layers, Hkv, P, D)
        k_l, v_l = kv[2 * l], kv[2 * l + 1]
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        prefix_projection: bool = False,
        token_dim: int | None = None,
        encoder_hidden_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefixEncoder: {name} must be a positive int, got {value!r}")
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.prefix_projection = bool(prefix_projection)
        out_dim = num_layers * 2 * num_kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if self.prefix_projection:
            token_dim = token_dim or num_kv_heads * head_dim
            encoder_hidden_size = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size, **kw),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, out_dim, **kw),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **kw)
            self.transform = None

    @property
    def out_dim(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def forward(self) -> torch.Tensor:
        """The whole prefix, flat: (P, layers*2*Hkv*D) (what PEFT saves as ``prompt_embeddings``)."""
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (key, value), each (Hkv, P, D), in the encoder's dtype.

        Computed from the parameters on every call (only that layer's slice of the last linear),
        so that gradient checkpointing, which re-runs a layer in backward, sees only leaves."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer_prefix: layer {layer} out of range [0, {self.num_layers})")
        width = self.num_kv_heads * self.head_dim
        start = 2 * layer * width
        if self.transform is None:
            flat = self.embedding.weight[:, start:start + 2 * width]
        else:
            first, act, last = self.transform
            hidden = act(first(self.embedding.weight))
            bias = None if last.bias is None else last.bias[start:start + 2 * width]
            flat = nn.functional.linear(hidden, last.weight[start:start + 2 * width], bias)
        kv = flat.view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_projection={self.prefix_projection}")
