"""Prompt tuning for classification with a language-model head: a prompt template places the
input, a verbalizer maps each label to a word, and the class score is that word's next-token
logit after the prompt.

    python python/prompt_tuning_verbalizer.py                    # tiny random GPT-2, seconds
    python python/prompt_tuning_verbalizer.py --model ./my-gpt2 --steps 200
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _tiny import causal_lm, tokenizer

import lora_kernels as lk

DATA = [("the food was wonderful", "positive"), ("the service was awful", "negative"),
        ("a lovely evening", "positive"), ("cold and bland soup", "negative"),
        ("great staff and great wine", "positive"), ("never again, truly bad", "negative")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="local causal-LM folder (default: tiny random GPT-2)")
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = tokenizer(args.model)
    model = causal_lm(args.model, "gpt2", len(tok))
    labels = ["negative", "positive"]
    config = lk.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Classify the sentiment of the review.", tokenizer=tok,
        prompt_template="Review: {input} Sentiment:", verbalizer={"negative": "bad", "positive": "good"},
    )
    tuned = lk.tune(model, config)
    tuned.print_trainable_parameters()
    texts = [tuned.format_prompt(t) for t, _ in DATA]
    batch = tok(texts, return_tensors="pt", padding=True)
    target = torch.tensor([labels.index(y) for _, y in DATA])
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(args.steps):
        scores = tuned.verbalizer_logits(batch["input_ids"], batch["attention_mask"], tokenizer=tok)
        loss = F.cross_entropy(scores, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        pred = tuned.verbalizer_logits(batch["input_ids"], batch["attention_mask"], tokenizer=tok).argmax(-1)
    acc = (pred == target).float().mean().item()
    print(f"final loss {loss.item():.3f}; training accuracy {acc:.2f}")
    print(f"e.g. {texts[0]!r} -> {labels[pred[0]]}")
    return acc


if __name__ == "__main__":
    main()
