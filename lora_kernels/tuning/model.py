"""``TunedModel``: a transformers model under one tuning method (what ``tune`` returns).

The methods themselves live in ``lora.py``, ``prefix.py``, ``prompt.py`` and ``full.py``; every
change they make is recorded with ``on_unload``, so ``unload()`` puts the model back exactly as
it was."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn

from ..nn.lora_linear import LoRALinear
from ..nn.prefix_encoder import PrefixEncoder
from ..nn.prompt_encoder import PromptEncoder
from . import io
from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .lora import lora_layers
from .prefix import prefix_detached
from .prompt import prepend_virtual_tokens


class _ForwardWithBaseSignature:
    """``TunedModel.forward``: ``TunedModel._forward`` bound to the instance, carrying the
    wrapped model's signature, so tools that keep the dataset columns named in the forward's
    parameters (transformers' Trainer) see ``input_ids``, ``labels``, ... (no per-instance
    state, so deepcopy and DDP are unaffected)."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return TunedModel._forward
        bound = functools.partial(TunedModel._forward, obj)
        base = obj._modules.get("base_model")
        try:
            bound.__signature__ = inspect.signature(base.forward)
        except (TypeError, ValueError, AttributeError):
            pass
        return bound


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``, each shared Parameter counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


class TunedModel(nn.Module):
    """A transformers model under one tuning method. ``forward`` and ``generate`` take what
    the wrapped model takes; ``base_model`` is the wrapped model (LoRA layers in place);
    ``prompt_encoder`` / ``prefix_encoder`` hold the prompt-learning parameters. Attributes it
    does not have are looked up on ``base_model``."""

    def __init__(self, model: nn.Module, config: TuningConfig) -> None:
        super().__init__()
        self.base_model = model
        self.config_tuning = config
        self.prompt_encoder: PromptEncoder | None = None
        self.prefix_encoder: PrefixEncoder | None = None
        self._undo: list = []
        # modules_to_save: name -> the original module (the trained copy is in the model)
        self.modules_to_save: dict[str, nn.Module] = {}
        self._adapter_enabled = True
        self._owner = id(model)  # the undo steps act on this model object
        self.register_load_state_dict_post_hook(_only_method_keys_required)

    # -- attribute fallback -----------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def peft_config(self) -> TuningConfig:
        return self.config_tuning

    def on_unload(self, step, *, swap: bool = False) -> None:
        """Record ``step()`` to run on ``unload`` (steps run last-in, first-out). ``swap``: a step
        that puts back an original module, which ``merge_and_unload`` leaves out."""
        self._undo.append((step, swap))

    # -- forward / generate ---------------------------------------------------------------
    forward = _ForwardWithBaseSignature()

    def _forward(self, *args, **kwargs):
        """The wrapped model's forward (same arguments: ``input_ids`` (B, L) int64,
        ``attention_mask`` (B, L), ``labels``, ...). Prompt tuning returns (B, P + L) positions."""
        if self.prompt_encoder is not None and self._adapter_enabled:
            return self.base_model(**prepend_virtual_tokens(self.prompt_encoder, self.base_model, *args, **kwargs))
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """As ``base_model.generate``. With prompt tuning the virtual tokens are prepended
        (as ``inputs_embeds``) and the returned sequences start with ``input_ids``."""
        if self.prompt_encoder is None or not self._adapter_enabled:
            return self.base_model.generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("generate with prompt tuning: input_ids are required")
        inputs = prepend_virtual_tokens(self.prompt_encoder, self.base_model, input_ids=input_ids,
                                        attention_mask=kwargs.pop("attention_mask", None))
        out = self.base_model.generate(**inputs, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        sequences = torch.cat([input_ids.to(sequences.device), sequences], 1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    # -- prompt template + verbalizer -----------------------------------------------------
    def format_prompt(self, text: str) -> str:
        """``text`` placed in the config's ``prompt_template`` (prompt tuning)."""
        config = self.config_tuning
        return config.format(text) if isinstance(config, PromptTuningConfig) else text

    def verbalizer_token_ids(self, tokenizer=None) -> list[int]:
        """The first token id of each verbalizer word, in label order."""
        config = self.config_tuning
        if not isinstance(config, PromptTuningConfig) or not config.verbalizer:
            raise ValueError("verbalizer: the config has no verbalizer (PromptTuningConfig(verbalizer=...))")
        tokenizer = tokenizer or config.tokenizer
        if tokenizer is None:
            raise ValueError("verbalizer: pass a tokenizer (or set PromptTuningConfig.tokenizer)")
        return [tokenizer(" " + w if not w.startswith(" ") else w, add_special_tokens=False)["input_ids"][0]
                for w in config.verbalizer.values()]

    def verbalizer_logits(self, input_ids, attention_mask=None, tokenizer=None) -> torch.Tensor:
        """input_ids (B, L) (right-padded) -> (B, num_labels): the next-token logits of the
        verbalizer words after the last real token, in ``verbalizer`` order."""
        ids = self.verbalizer_token_ids(tokenizer)
        logits = self(input_ids=input_ids, attention_mask=attention_mask).logits
        L = input_ids.shape[1]
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), L - 1, device=input_ids.device)
        else:  # the last real token, with left or right padding
            last = L - 1 - attention_mask.long().flip(1).argmax(1)
        last = last + (logits.shape[1] - L)
        rows = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return rows[:, ids]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model runs without the method (LoRA updates, prefix, virtual
        tokens off; modules_to_save keep their trained copies), e.g. for a reference model."""
        config = self.config_tuning
        if isinstance(config, FullFineTuningConfig):
            raise ValueError("disable_adapter: full fine-tuning has no adapter to disable")
        layers = lora_layers(self.base_model) if isinstance(config, LoraConfig) else {}
        if any(layer.merged for layer in layers.values()):
            raise ValueError("disable_adapter: unmerge_adapter() first")
        scalings = {name: layer.scaling for name, layer in layers.items()}
        self._adapter_enabled = False
        try:
            with prefix_detached(self.base_model):
                for layer in layers.values():
                    layer.scaling = 0.0
                yield self
        finally:
            self._adapter_enabled = True
            for name, layer in layers.items():
                layer.scaling = scalings[name]

    # -- reporting --------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as PEFT's method of the same name."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- saving -----------------------------------------------------------------------------
    def save_adapter(self, save_directory, *, safe_serialization: bool = True) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format. Full
        fine-tuning has no adapter: a transformers model folder (``save_pretrained``, read by
        ``AutoModel*.from_pretrained`` and by ``load_adapter``)."""
        io.save_adapter(self, save_directory, safe_serialization=safe_serialization)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **_ignored) -> None:
        """``save_adapter`` under the name transformers' Trainer calls (extra arguments such as
        ``state_dict`` are ignored: the adapter is read from the model)."""
        self.save_adapter(save_directory, safe_serialization=safe_serialization)

    # -- state dict: the method's tensors ----------------------------------------------------
    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The method's tensors only, under their module keys: LoRA's ``lora_A``/``lora_B`` (and
        biases per ``bias``), the prompt or prefix encoder, the modules_to_save copies; full
        fine-tuning: the whole model, a tied weight once. The frozen base model's weights are
        ``base_model.state_dict()``. So a training loop's checkpoint of this module (transformers'
        Trainer saves ``state_dict()``) holds what training changes, not the whole model.
        ``load_state_dict`` takes such a dict (also through a wrapper such as DDP): with
        ``strict``, only the method's keys must be present."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = self._method_keys({k[len(prefix):]: v for k, v in full.items()})
        out = destination if destination is not None else type(full)()
        metadata = getattr(full, "_metadata", None)
        if metadata is not None:
            out._metadata = {**getattr(out, "_metadata", {}), **metadata}
        for key, value in full.items():
            if key[len(prefix):] in keep:
                out[key] = value
        return out

    def _method_keys(self, state: dict) -> set[str]:
        """The keys of ``state`` (this module's full state, no prefix) that belong to the method."""
        config = self.config_tuning
        layers = set(lora_layers(self.base_model))
        saved = tuple(f"base_model.{n}." for n in self.modules_to_save)
        keys = []
        for key in state:
            if key.startswith(("prompt_encoder.", "prefix_encoder.")) or key.startswith(saved):
                keys.append(key)
            elif isinstance(config, FullFineTuningConfig):
                keys.append(key)
            elif isinstance(config, LoraConfig) and key.startswith("base_model."):
                owner, _, leaf = key[len("base_model."):].rpartition(".")
                if (leaf in ("lora_A", "lora_B") and owner in layers) or (leaf == "bias" and (
                        config.bias == "all" or (config.bias == "lora_only" and owner in layers))):
                    keys.append(key)
        return {group[0] for group in io.tied_groups({k: state[k] for k in keys})}

    # -- LoRA merge / unmerge -----------------------------------------------------------------
    def _lora_layers(self) -> dict[str, LoRALinear]:
        layers = lora_layers(self.base_model)
        if not layers:
            raise ValueError(f"{self.config_tuning.peft_type}: there is no LoRA layer to merge or unmerge")
        return layers

    def merge_adapter(self) -> None:
        """Add every LoRA update into its frozen weight (forward then runs the plain layers)."""
        for layer in self._lora_layers().values():
            if not layer.merged:
                layer.merge()

    def unmerge_adapter(self) -> None:
        """Take the LoRA updates out of the weights again."""
        for layer in self._lora_layers().values():
            if layer.merged:
                layer.unmerge()

    # -- undoing ----------------------------------------------------------------------------
    def _check_owner(self, what: str) -> None:
        if self.__dict__.get("_owner") != id(self.base_model):
            raise RuntimeError(f"{what}: this TunedModel is a copy; its undo steps would act on the "
                               "original model (call it on the original)")

    def _run_undo(self) -> None:
        while self._undo:
            step, _ = self._undo.pop()
            step()

    def unload(self) -> nn.Module:
        """Remove the method without merging: original modules, parameters' requires_grad,
        attention implementation and state-dict keys back. Returns the base model."""
        self._check_owner("unload")
        model = self.base_model
        self._run_undo()
        self.prompt_encoder = self.prefix_encoder = None
        return model

    def merge_and_unload(self) -> nn.Module:
        """LoRA: add each update into its frozen weight and put the original module classes
        back (keys as before tuning); modules_to_save keep their trained copies. Full
        fine-tuning: the model as trained. Returns the base model."""
        config = self.config_tuning
        if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
            raise ValueError(f"merge_and_unload: {config.peft_type} has no weights to merge into the model; "
                             "use unload() to remove it")
        self._check_owner("merge_and_unload")
        model = self.base_model
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                if not layer.merged:
                    layer.merge()
                model.set_submodule(name, layer.to_linear())
        # drop the undo steps that would swap back unmerged modules or the untrained copies
        self._undo = [(step, swap) for step, swap in self._undo if not swap]
        self._run_undo()
        return model


def _only_method_keys_required(module: TunedModel, incompatible) -> None:
    """load_state_dict post-hook: the frozen base model's keys are not missing (their values
    are the pretrained model's, which a state dict of the method does not carry). The keys may
    carry a wrapper's prefix ("module."), so they are matched by dotted suffix."""
    own = nn.Module.state_dict(module, keep_vars=True)
    frozen = set(own) - module._method_keys(own)
    kept = []
    for key in incompatible.missing_keys:
        parts = key.split(".")
        if not any(".".join(parts[i:]) in frozen for i in range(len(parts))):
            kept.append(key)
    incompatible.missing_keys[:] = kept
