"""``tune(model, config) -> TunedModel``: the four methods applied to a transformers model.

Everything is validated before the model is touched; every change made is recorded as an
undo step, so a failure half-way (or ``unload()``) puts the model back exactly as it was."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings

import torch
from torch import nn

from ..integrations import transformers as hf_attention
from ..integrations.model_families import (
    TASK_HEADS,
    attention_geometry,
    classifier_pooler,
    infer_task_type,
    self_attention_layers,
)
from ..nn.lora_linear import LoRALinear
from ..nn.prefix_encoder import PrefixEncoder
from ..nn.prompt_encoder import PromptEncoder
from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .lora import _matches, lora_layers, resolve_target_names, wrap_targets


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
        self._saved_modules: dict[str, nn.Module] = {}  # modules_to_save: name -> original
        self._adapter_enabled = True
        self._owner = id(model)  # the undo steps act on this model object

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

    # -- forward / generate ---------------------------------------------------------------
    forward = _ForwardWithBaseSignature()

    def _forward(self, *args, **kwargs):
        """The wrapped model's forward (same arguments: ``input_ids`` (B, L) int64,
        ``attention_mask`` (B, L), ``labels``, ...). Prompt tuning returns (B, P + L) positions."""
        if self.prompt_encoder is not None and self._adapter_enabled:
            return self.base_model(**self._prompt_inputs(*args, **kwargs))
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """As ``base_model.generate``. With prompt tuning the virtual tokens are prepended
        (as ``inputs_embeds``) and the returned sequences start with ``input_ids``."""
        if self.prompt_encoder is None or not self._adapter_enabled:
            return self.base_model.generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("generate with prompt tuning: input_ids are required")
        inputs = self._prompt_inputs(input_ids=input_ids, attention_mask=kwargs.pop("attention_mask", None))
        out = self.base_model.generate(**inputs, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        sequences = torch.cat([input_ids.to(sequences.device), sequences], 1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    def _prompt_inputs(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                       position_ids=None, token_type_ids=None, **kwargs) -> dict:
        """Prepend the virtual tokens: embeddings (B, P+L, H), mask and token types extended
        by P, labels of the same length as the input extended by P times -100 (as PEFT)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("prompt tuning: pass input_ids or inputs_embeds")
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        P = self.prompt_encoder.num_virtual_tokens
        inputs_embeds = self.prompt_encoder.prepend(inputs_embeds)
        if position_ids is not None:
            warnings.warn("prompt tuning: position_ids are ignored (as PEFT)", stacklevel=3)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, P)
            attention_mask = torch.cat([ones, attention_mask], 1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(batch, P), token_type_ids], 1)
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            labels = torch.cat([labels.new_full((batch, P), -100), labels], 1)
        out = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        if labels is not None:
            out["labels"] = labels
        if token_type_ids is not None:
            out["token_type_ids"] = token_type_ids
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
        attrs = {}
        for name, module in self.base_model.named_modules():
            for key in (hf_attention.PREFIX_ATTR, POSITION_ATTR):
                if key in module.__dict__:
                    attrs[name, key] = module.__dict__.pop(key)
        self._adapter_enabled = False
        try:
            for layer in layers.values():
                layer.scaling = 0.0
            yield self
        finally:
            self._adapter_enabled = True
            for name, layer in layers.items():
                layer.scaling = scalings[name]
            for (name, key), value in attrs.items():
                self.base_model.get_submodule(name).__dict__[key] = value

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
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format
        (full fine-tuning: the whole state dict)."""
        from .io import save_adapter

        save_adapter(self, save_directory, safe_serialization=safe_serialization)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **_ignored) -> None:
        """``save_adapter`` under the name transformers' Trainer calls (extra arguments such as
        ``state_dict`` are ignored: the adapter is read from the model)."""
        self.save_adapter(save_directory, safe_serialization=safe_serialization)

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
            self._undo.pop()()

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
        self._undo = [step for step in self._undo if not getattr(step, "_swap", False)]
        self._run_undo()
        return model


# ------------------------------------------------------------------------------------------
def _record_requires_grad(model: nn.Module, undo: list) -> None:
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)

    undo.append(restore)


def _swap_step(fn):
    fn._swap = True
    return fn


def _modules_to_save(model: nn.Module, config) -> list[str]:
    """The modules trained in full: ``config.modules_to_save`` plus the task head (PEFT's names
    for the task type, and for SEQ_CLS the pooler feeding the classifier unless
    ``train_pooler=False``)."""
    names = list(getattr(config, "modules_to_save", None) or [])
    heads = list(TASK_HEADS.get(config.task_type, ()))
    pooler = classifier_pooler(model) if config.task_type == "SEQ_CLS" else None
    if pooler is not None and getattr(config, "train_pooler", False):
        heads.append(pooler)
    names += [h for h in heads if h not in names and any(_matches(n, [h]) for n, _ in model.named_modules())]
    found = []
    for target in names:
        matched = [n for n, _ in model.named_modules() if n and _matches(n, [target])]
        if not matched:
            raise ValueError(f"modules_to_save: {target!r} matches no module of {type(model).__name__}; "
                             f"top-level modules: {[n for n, _ in model.named_children()]}")
        found += matched
    return sorted(set(found))


def _apply_modules_to_save(tuned: TunedModel, names: list[str]) -> None:
    """Replace each module by a trainable copy (the original is kept for unload)."""
    model = tuned.base_model
    for name in names:
        original = model.get_submodule(name)
        trained = copy.deepcopy(original)
        for p in trained.parameters():
            p.requires_grad_(True)
        model.set_submodule(name, trained)
        tuned._saved_modules[name] = original

        def restore(name=name, original=original):
            # the original sits outside the module tree: follow the copy if it was moved
            current = next(iter(model.get_submodule(name).parameters()), None)
            if current is not None:
                original.to(current.device)
            model.set_submodule(name, original)

        tuned._undo.append(_swap_step(restore))


def _check_transformers_model(model) -> None:
    if isinstance(model, TunedModel):
        raise TypeError("tune: the model is already a TunedModel; call unload() first")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"tune: expected a transformers PreTrainedModel, got {type(model).__name__}")


def _enable_attention(tuned: TunedModel, required: bool) -> None:
    model = tuned.base_model
    if hf_attention.is_fused_attention_enabled(model):
        return
    reason = hf_attention.unsupported_reason(model)
    if reason is not None:
        if required:
            raise ValueError(f"prefix tuning needs our attention function: {reason}")
        warnings.warn(f"lora_kernels: fused attention not enabled ({reason})", stacklevel=3)
        return
    hf_attention.enable_fused_attention(model)
    tuned._undo.append(lambda: hf_attention.disable_fused_attention(model))


# -- methods -------------------------------------------------------------------------------
def _tune_lora(tuned: TunedModel, config: LoraConfig) -> None:
    model = tuned.base_model
    names = resolve_target_names(model, config)
    keep = _modules_to_save(model, config)
    if any(n == k or n.startswith(k + ".") for n in names for k in keep):
        raise ValueError("LoraConfig: a module is both a LoRA target and in modules_to_save")
    _record_requires_grad(model, tuned._undo)
    model.requires_grad_(False)
    layers = wrap_targets(model, names, config, tuned._undo)
    for step in tuned._undo[-len(layers):]:
        step._swap = True
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for layer in layers.values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    _apply_modules_to_save(tuned, keep)


def _tune_full(tuned: TunedModel, config: FullFineTuningConfig) -> None:
    model = tuned.base_model
    frozen = config.frozen_modules or []
    keep = config.modules_to_save or []
    for target in [*frozen, *keep]:
        if not any(_matches(n, [target]) for n, _ in model.named_modules() if n):
            raise ValueError(f"FullFineTuningConfig: {target!r} matches no module of {type(model).__name__}; "
                             f"top-level modules: {[n for n, _ in model.named_children()]}")
    _record_requires_grad(model, tuned._undo)
    model.requires_grad_(True)
    for name, module in model.named_modules():
        if name and _matches(name, frozen):
            module.requires_grad_(False)
    for name, module in model.named_modules():
        if name and _matches(name, keep):
            module.requires_grad_(True)
    if config.gradient_checkpointing:
        _enable_checkpointing(tuned)


def _enable_checkpointing(tuned: TunedModel) -> None:
    """transformers' activation checkpointing (``activation_checkpointing_enable`` since 5.23,
    ``gradient_checkpointing_enable`` before), non-reentrant."""
    model = tuned.base_model
    if hasattr(model, "activation_checkpointing_enable"):
        was = bool(model.is_activation_checkpointing)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        was = bool(getattr(model, "is_gradient_checkpointing", False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    if not was:
        tuned._undo.append(disable)


def _tune_prefix(tuned: TunedModel, config: PrefixTuningConfig) -> None:
    model = tuned.base_model
    layers_n, heads, kv_heads, head_dim = attention_geometry(model)
    attn = self_attention_layers(model)
    reason = hf_attention.unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"PrefixTuningConfig: {reason}")
    if len(attn) != layers_n:
        raise ValueError(f"PrefixTuningConfig: found {len(attn)} self-attention modules calling the "
                         f"attention interface but the config says {layers_n} layers")
    for field, expected in (("num_layers", layers_n), ("num_attention_heads", kv_heads),
                            ("token_dim", kv_heads * head_dim)):
        given = getattr(config, field)
        if given is not None and given != expected:
            raise ValueError(f"PrefixTuningConfig.{field}={given} does not fit {type(model).__name__} "
                             f"(expected {expected})")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"PrefixTuningConfig: {type(model).__name__}.forward takes no position_ids, so the "
                         "real tokens' positions cannot start after the prefix")
    keep = _modules_to_save(model, config)
    config.num_layers, config.num_attention_heads, config.token_dim = layers_n, kv_heads, kv_heads * head_dim
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    if config.encoder_hidden_size is None:  # as PEFT
        config.encoder_hidden_size = config.token_dim
    param = next(model.parameters())
    encoder = PrefixEncoder(config.num_virtual_tokens, layers_n, kv_heads, head_dim,
                            prefix_projection=config.prefix_projection, token_dim=config.token_dim,
                            encoder_hidden_size=config.encoder_hidden_size, device=param.device,
                            dtype=torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype)
    _record_requires_grad(model, tuned._undo)
    model.requires_grad_(False)
    _enable_attention(tuned, required=True)
    tuned.prefix_encoder = encoder
    attach_prefix(tuned, encoder, attn)
    _apply_modules_to_save(tuned, keep)


POSITION_ATTR = "lora_kernels_position_offset"


def _shift_positions(module, args, kwargs):
    """Forward pre-hook on the base model: the real tokens' position ids start at P (read from
    the model's ``POSITION_ATTR``, so copies of the model carry their own)."""
    P = module.__dict__.get(POSITION_ATTR)
    if not P:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        position_ids = torch.arange(past, past + ref.shape[1], device=ref.device).unsqueeze(0)
    kwargs["position_ids"] = position_ids + P
    return args, kwargs


def attach_prefix(tuned: TunedModel, encoder: PrefixEncoder, attn) -> None:
    """Give each self-attention module a callable yielding its layer's (k, v) and shift the
    real tokens' position ids by P (forward pre-hook on the base model)."""
    model = tuned.base_model
    for index, (_, module) in enumerate(attn):
        module.__dict__[hf_attention.PREFIX_ATTR] = functools.partial(encoder.layer_prefix, index)
    model.__dict__[POSITION_ATTR] = encoder.num_virtual_tokens

    def detach():
        for _, module in attn:
            module.__dict__.pop(hf_attention.PREFIX_ATTR, None)
        model.__dict__.pop(POSITION_ATTR, None)

    tuned._undo.append(detach)
    handle = model.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    tuned._undo.append(handle.remove)


def _prompt_init(model, config: PromptTuningConfig, P: int, hidden: int) -> torch.Tensor | None:
    emb = model.get_input_embeddings()
    if config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, emb.weight.shape[0], (P,), device=emb.weight.device)
        return emb(ids).detach().clone()
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenises to nothing")
    ids = (ids * (P // len(ids) + 1))[:P]
    return emb(torch.tensor(ids, device=emb.weight.device)).detach().clone()


def _tune_prompt(tuned: TunedModel, config: PromptTuningConfig) -> None:
    model = tuned.base_model
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is None or not hasattr(emb, "weight"):
        raise ValueError(f"PromptTuningConfig: {type(model).__name__} has no input embeddings")
    hidden = emb.weight.shape[1]
    if config.token_dim is not None and config.token_dim != hidden:
        raise ValueError(f"PromptTuningConfig.token_dim={config.token_dim} does not fit "
                         f"{type(model).__name__} (hidden size {hidden})")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"PromptTuningConfig: {type(model).__name__}.forward takes no inputs_embeds")
    keep = _modules_to_save(model, config)
    init = _prompt_init(model, config, config.num_virtual_tokens, hidden)
    layers, heads, _, _ = attention_geometry(model)
    config.token_dim, config.num_layers, config.num_attention_heads = hidden, layers, heads
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    dtype = torch.float32 if emb.weight.dtype in (torch.float16, torch.bfloat16) else emb.weight.dtype
    encoder = PromptEncoder(config.num_virtual_tokens, hidden, init=init, device=emb.weight.device, dtype=dtype)
    if init is None:
        with torch.no_grad():  # PEFT's RANDOM init: nn.Embedding's normal init
            encoder.embedding.weight.normal_()
    _record_requires_grad(model, tuned._undo)
    model.requires_grad_(False)
    tuned.prompt_encoder = encoder
    _apply_modules_to_save(tuned, keep)


_METHODS = {
    LoraConfig: _tune_lora,
    FullFineTuningConfig: _tune_full,
    PrefixTuningConfig: _tune_prefix,
    PromptTuningConfig: _tune_prompt,
}


def tune(model: nn.Module, config: TuningConfig, *, fused_attention: bool = True) -> TunedModel:
    """Apply ``config``'s method to ``model`` (a transformers PreTrainedModel) in place and
    return the ``TunedModel`` around it. ``fused_attention``: run attention through
    ``prefix_attention`` (always on for prefix tuning; a model whose attention cannot be
    reached then only gets a warning for the other methods).

    ``config.task_type`` None is inferred from the model class (``...ForCausalLM`` ->
    "CAUSAL_LM", ``...ForSequenceClassification`` -> "SEQ_CLS", ...) and written with the
    adapter, so PEFT loads it as the matching ``PeftModelFor...`` class. On any error the model
    is left exactly as it was.

    Equivalent PEFT::

        peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    """
    _check_transformers_model(model)
    method = _METHODS.get(type(config))
    if method is None:
        raise TypeError(f"tune: expected one of {[c.__name__ for c in _METHODS]}, got {type(config).__name__}")
    config = copy.copy(config)
    if config.task_type is None:
        config.task_type = infer_task_type(model)
    tuned = TunedModel(model, config)
    try:
        method(tuned, config)
        if fused_attention and not isinstance(config, PrefixTuningConfig):
            _enable_attention(tuned, required=False)
    except BaseException:
        tuned._run_undo()
        raise
    return tuned


def is_tuned(model: nn.Module) -> bool:
    return isinstance(model, TunedModel) or any(isinstance(m, LoRALinear) for m in model.modules())
