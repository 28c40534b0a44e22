"""LoRA on a causal language model with the Trainer of transformers.

    python python/lora_causal_lm_trainer.py                      # tiny random GPT-2, seconds
    python python/lora_causal_lm_trainer.py --model ./my-gpt2 --steps 200 --out out/lora

The adapter is saved in PEFT's format (adapter_config.json + adapter_model.safetensors): both
``lora_kernels.load_adapter`` and ``peft.PeftModel.from_pretrained`` read it. Trainer's
checkpoints hold the adapter only (``TunedModel.state_dict()`` is the method's tensors), the
callback adds PEFT's files to each, and ``--resume checkpoint-N`` continues from one.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _tiny import causal_lm, tokenizer
from transformers import Trainer, TrainingArguments

import lora_kernels as lk
from lora_kernels.integrations.trainer import AdapterCheckpointCallback

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun rose over the hills",
         "we drank tea by the fire", "rain fell on the quiet town", "she read a book at night"]


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, tok, texts, max_length=32):
        self.enc = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]

    def __len__(self):
        return len(self.enc)

    def __getitem__(self, i):
        return {"input_ids": self.enc[i]}


def collate(pad_id):
    def fn(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="local causal-LM folder (default: tiny random GPT-2)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temp folder)")
    ap.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = tokenizer(args.model)
    model = causal_lm(args.model, "gpt2", len(tok))
    tuned = lk.tune(model, lk.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                         target_modules="all-linear"))
    tuned.print_trainable_parameters()
    out = args.out or tempfile.mkdtemp()
    trainer = Trainer(
        model=tuned,
        args=TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=4,
                               learning_rate=2e-3, logging_steps=max(1, args.steps // 4),
                               save_strategy="steps", save_steps=max(1, args.steps // 2), report_to=[],
                               remove_unused_columns=False, use_cpu=not torch.cuda.is_available()),
        train_dataset=TextDataset(tok, TEXTS * 4),
        data_collator=collate(tok.pad_token_id),
        callbacks=[AdapterCheckpointCallback()],
    )
    result = trainer.train(resume_from_checkpoint=args.resume)
    tuned.save_adapter(out)
    print(f"final training loss {result.training_loss:.3f}; adapter saved to {out}")
    return result.training_loss


if __name__ == "__main__":
    main()
