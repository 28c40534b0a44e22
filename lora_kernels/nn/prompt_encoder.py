"""PromptEncoder: the virtual-token embeddings of prompt tuning (Lester et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """P trainable embeddings (P, hidden) placed before the input embeddings.

    Equivalent PyTorch::

        prompts = E.unsqueeze(0).expand(B, P, hidden)          # E = embedding.weight
        inputs_embeds = torch.cat([prompts.to(x.dtype), x], 1)  # x (B, L, hidden)
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, init: torch.Tensor | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"PromptEncoder: num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
        if not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"PromptEncoder: token_dim must be a positive int, got {token_dim!r}")
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=dtype)
        if init is not None:
            if tuple(init.shape) != (num_virtual_tokens, token_dim):
                raise ValueError(f"PromptEncoder: init must be ({num_virtual_tokens}, {token_dim}), "
                                 f"got {tuple(init.shape)}")
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        """(P, hidden), or (B, P, hidden) when ``batch_size`` is given (an expanded view)."""
        weight = self.embedding.weight
        return weight if batch_size is None else weight.unsqueeze(0).expand(batch_size, -1, -1)

    def prepend(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds (B, L, hidden) -> (B, P + L, hidden) in inputs_embeds' dtype."""
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.token_dim:
            raise ValueError(f"prepend: expected inputs_embeds (B, L, {self.token_dim}), "
                             f"got {tuple(inputs_embeds.shape)}")
        prompts = self(inputs_embeds.shape[0]).to(inputs_embeds.dtype)
        return torch.cat([prompts, inputs_embeds], 1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}"
