"""``LoRALinear`` as a drop-in replacement for ``nn.Linear`` in your own model: the frozen
weight is reused (same Parameter, same state-dict key), only the low-rank A and B train, and
``to_linear()`` merges them back into a plain layer.

    python python/lora_linear_dropin.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lora_kernels import LoRALinear


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(256, 32)
    y = torch.randn(256, 8)
    for i in (0, 2):  # swap in place; the weights are shared, not copied
        net[i] = LoRALinear.from_linear(net[i], r=4, lora_alpha=8, lora_dropout=0.0)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    print("trainable:", trainable)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for step in range(args.steps):
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = loss.item()
    print(f"loss {first:.4f} -> {loss.item():.4f}")
    with torch.no_grad():
        tuned_out = net(x)
        for i in (0, 2):
            net[i] = net[i].to_linear()  # merge: a plain nn.Linear again
        merged_err = (net(x) - tuned_out).abs().max().item()
    print(f"merged into nn.Linear: {type(net[0]).__name__}, max difference {merged_err:.2e}")
    return first, loss.item(), merged_err


if __name__ == "__main__":
    main()
