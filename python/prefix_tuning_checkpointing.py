"""Prefix tuning with gradient checkpointing (which PEFT's KV-cache prefix cannot do): the
prefix reaches every attention layer through ``prefix_attention``, not through the cache.

    python python/prefix_tuning_checkpointing.py                 # tiny random LLaMA, seconds
    python python/prefix_tuning_checkpointing.py --model ./my-llama --steps 100
"""

from __future__ import annotations

import argparse

import torch
from _tiny import causal_lm, tokenizer

import lora_kernels as lk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="local causal-LM folder (default: tiny random LLaMA)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = tokenizer(args.model)
    model = causal_lm(args.model, "llama", len(tok))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned = lk.tune(model, lk.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    tuned.print_trainable_parameters()
    batch = tok(["the quick brown fox jumps", "over the lazy dog again"], return_tensors="pt", padding=True,
                return_token_type_ids=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-2)
    tuned.train()
    losses = []
    for _ in range(args.steps):
        loss = tuned(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} with gradient checkpointing on")
    tuned.eval()
    prompt = tok(["the quick brown"], return_tensors="pt", return_token_type_ids=False)
    out = tuned.generate(**prompt, max_new_tokens=5, do_sample=False)
    print("greedy continuation:", tok.decode(out[0], skip_special_tokens=True))
    return losses


if __name__ == "__main__":
    main()
