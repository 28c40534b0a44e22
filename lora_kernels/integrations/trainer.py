"""A ``TunedModel`` under transformers' ``Trainer``.

Trainer saves and loads a model that is neither a ``PreTrainedModel`` nor a ``PeftModel``
through ``model.state_dict()`` / ``model.load_state_dict(state, strict=False)`` (in
``model.safetensors``; checked in transformers 5.17 to 5.24: ``Trainer._save``,
``_load_from_checkpoint``, ``_load_best_model``). A ``TunedModel``'s state dict is the method's
tensors only, so with no help each checkpoint holds the trainable weights (not the frozen
model, and no tied weight twice, which safetensors refuses), and ``resume_from_checkpoint`` and
``load_best_model_at_end`` restore them, with Trainer's optimizer, scheduler and RNG state.

:class:`AdapterCheckpointCallback` also writes the adapter in PEFT's format into each checkpoint
folder, so ``load_adapter`` and ``peft.PeftModel.from_pretrained`` read any checkpoint.
This module imports transformers; the package does not import it."""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class AdapterCheckpointCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdapterCheckpointCallback()])``: after each checkpoint, the
    model's ``save_adapter`` into it (every rank calls it; rank 0 writes). Full fine-tuning is
    left alone: its checkpoint already holds the whole model."""

    def on_save(self, args, state, control, model=None, **kwargs):
        config = getattr(model, "peft_config", None)
        if config is None or not hasattr(model, "save_adapter") or config.peft_type == "FULL":
            return control
        model.save_adapter(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control
