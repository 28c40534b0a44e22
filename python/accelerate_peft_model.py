"""Accelerate an existing PEFT model in place: its LoRA layers run on ``lora_linear``, its
parameters, state-dict keys and saved files stay PEFT's, and it can be undone.

    python python/accelerate_peft_model.py                       # tiny random GPT-2, seconds
"""

from __future__ import annotations

import argparse

import peft
import torch
from _tiny import tiny_causal_lm

from lora_kernels.integrations.peft import accelerate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_causal_lm("gpt2", vocab_size=256),
        peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
    )
    ids = torch.randint(0, 256, (4, 24))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = accelerate(model)  # the whole change; handle.restore() undoes it
    print(f"{len(handle.lora_layers)} LoRA layers on lora_linear; left on PEFT's path: {handle.skipped or 'none'}")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    print(f"max |logits difference| vs PEFT: {(after - before).abs().max().item():.2e}")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained {args.steps} steps, loss {loss.item():.3f}; state-dict keys unchanged")
    handle.restore()
    return (after - before).abs().max().item()


if __name__ == "__main__":
    main()
