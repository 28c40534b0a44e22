"""PEFT's on-disk adapter format, both ways.

A directory holds ``adapter_config.json`` (PEFT's field names, ``indent=2``, sorted keys,
``inference_mode`` true) and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``):

- LoRA: ``base_model.model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r);
  biases (``bias`` all / lora_only) as ``<module>.base_layer.bias`` inside LoRA layers and
  ``<module>.bias`` elsewhere; ``modules_to_save`` as ``base_model.model.<module>.<param>``.
- prompt tuning: ``prompt_embeddings`` (P, hidden); prefix tuning: ``prompt_embeddings``
  (P, layers*2*Hkv*D), the prefix encoder's output (a reparameterisation MLP is not saved).
- full fine-tuning has no adapter: the directory is a transformers model folder
  (``save_pretrained``: ``config.json`` + ``model.safetensors``, loadable by
  ``AutoModel*.from_pretrained``), plus our config in ``lora_kernels_config.json``.

Fields PEFT does not have (prompt template, verbalizer, ...) go to ``lora_kernels_config.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
from torch import nn

from ..nn.lora_linear import LoRALinear, is_conv1d
from .config import (
    FullFineTuningConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TuningConfig,
)
from .targets import lora_target_names, modules_to_save_names

CONFIG_NAME = "adapter_config.json"
MODEL_CONFIG_NAME = "config.json"  # a transformers model folder (full fine-tuning)
MODEL_WEIGHTS_NAME = "model.safetensors"
EXTRA_CONFIG_NAME = "lora_kernels_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # LoRA: PeftModel.base_model (LoraModel).model (the HF model)
PROMPT_PREFIX = "base_model."  # prompt learning: PeftModel.base_model is the HF model itself


def _module_prefix(config) -> str:
    return PROMPT_PREFIX if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)) else PREFIX


# -- state dict <-> PEFT keys --------------------------------------------------------------
def adapter_state_dict(tuned) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for this adapter, under PEFT's key names."""
    config, model = tuned.config_tuning, tuned.base_model
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        encoder = tuned.prompt_encoder if isinstance(config, PromptTuningConfig) else tuned.prefix_encoder
        out = {"prompt_embeddings": encoder().detach()}
    elif isinstance(config, FullFineTuningConfig):
        return dict(model.state_dict())
    else:
        out = {}
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        for name, layer in layers.items():
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
            if layer.bias is not None and config.bias in ("all", "lora_only"):
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias.detach()
        if config.bias == "all":
            for name, module in model.named_modules():
                if isinstance(module, LoRALinear) or any(name.startswith(n + ".") for n in layers):
                    continue
                bias = module._parameters.get("bias")
                if isinstance(bias, torch.Tensor):
                    out[f"{PREFIX}{name}.bias"] = bias.detach()
    prefix = _module_prefix(config)
    for name in tuned.modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            out[f"{prefix}{name}.{key}"] = value.detach()
    return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor (FSDP2) gathered whole; a plain tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The state's keys grouped by the storage they share (tied weights share one)."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        try:
            shared = value.numel() > 0 and value.device.type != "meta"
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape)) if shared \
                else (key,)
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without storage
            ident = (key,)
        groups.setdefault(ident, []).append(key)
    return list(groups.values())


def _is_writer() -> bool:
    """Rank 0 under torch.distributed (or no process group)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def save_adapter(tuned, save_directory, *, safe_serialization: bool = True) -> None:
    """Write the adapter of ``tuned`` to ``save_directory`` in PEFT's format (full fine-tuning:
    a transformers model folder, always safetensors). Under torch.distributed call it on every
    rank (sharded tensors are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    config, model = tuned.config_tuning, tuned.base_model
    if isinstance(config, FullFineTuningConfig):
        _save_model_folder(model, config, save_directory)
        return
    tensors = {k: _full(v).contiguous().cpu() for k, v in adapter_state_dict(tuned).items()}
    if not _is_writer():
        return
    os.makedirs(save_directory, exist_ok=True)
    data = config.to_dict(peft_only=True)
    data["inference_mode"] = True
    if isinstance(config, LoraConfig):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        data["fan_in_fan_out"] = any(m.fan_in_fan_out for m in layers.values())
        if data["target_modules"] is None:
            data["target_modules"] = sorted({n.split(".")[-1] for n in layers})
    if "modules_to_save" in data:
        # every module saved, by its full path (PEFT matches these as name suffixes)
        saved = set(data["modules_to_save"] or []) | set(tuned.modules_to_save)
        data["modules_to_save"] = sorted(saved) or None
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    extra = {k: v for k, v in config.to_dict().items() if k not in data and k != "tokenizer"}
    if extra:
        with open(os.path.join(save_directory, EXTRA_CONFIG_NAME), "w") as f:
            json.dump(extra, f, indent=2, sort_keys=True)
    if safe_serialization:
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(tensors, os.path.join(save_directory, BIN_NAME))


def _save_model_folder(model: nn.Module, config: FullFineTuningConfig, save_directory) -> None:
    """Full fine-tuning: ``model.save_pretrained`` (tied weights stored once) and our config."""
    state = {k: _full(v) for k, v in model.state_dict().items()}
    if not _is_writer():
        return
    model.save_pretrained(save_directory, state_dict=state)
    with open(os.path.join(save_directory, EXTRA_CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)


# -- loading ---------------------------------------------------------------------------------
def read_adapter(directory, *, allow_bin: bool = False) -> tuple[TuningConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter directory. ``.bin`` only with ``allow_bin=True`` (read
    with ``torch.load(weights_only=True)``)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, MODEL_CONFIG_NAME)):
            return _read_model_folder(directory)
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} (an adapter) nor {MODEL_CONFIG_NAME} "
                                f"(a full fine-tuning model folder) in {directory}")
    with open(path) as f:
        data = json.load(f)
    extra_path = os.path.join(directory, EXTRA_CONFIG_NAME)
    if os.path.isfile(extra_path):
        with open(extra_path) as f:
            data = {**json.load(f), **data}
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias"):
        if data.get(unsupported):
            raise ValueError(f"load_adapter: LoRA option {unsupported}={data[unsupported]!r} is not supported")
    config = TuningConfig.from_dict(data)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(directory, BIN_NAME)):
        if not allow_bin:
            raise ValueError(f"load_adapter: {directory} holds only {BIN_NAME}; pickled weights load only on "
                             "explicit request (allow_bin=True, read with weights_only=True)")
        tensors = torch.load(os.path.join(directory, BIN_NAME), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory}")
    return config, tensors


def _read_model_folder(directory) -> tuple[FullFineTuningConfig, dict[str, torch.Tensor]]:
    """A transformers model folder as full fine-tuning: the config from
    ``lora_kernels_config.json`` (defaults without it), every ``*.safetensors`` weight file
    (sharded or not) read."""
    from safetensors.torch import load_file

    data = {}
    extra_path = os.path.join(directory, EXTRA_CONFIG_NAME)
    if os.path.isfile(extra_path):
        with open(extra_path) as f:
            data = json.load(f)
    data["peft_type"] = FullFineTuningConfig.peft_type
    config = TuningConfig.from_dict(data)
    index = os.path.join(directory, MODEL_WEIGHTS_NAME + ".index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, MODEL_WEIGHTS_NAME)):
        files = [MODEL_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"load_adapter: the model folder {directory} has no {MODEL_WEIGHTS_NAME} "
                                "(only safetensors weights are read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(directory, name)))
    return config, tensors


def _check_shapes(what: str, expected: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}" for k in expected
             if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if unexpected or missing or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ ({'; '.join(wrong[:4])})")
        if unexpected:
            parts.append(f"keys the model does not have {unexpected[:4]}")
        if missing:
            parts.append(f"keys missing from the file {missing[:4]}")
        raise ValueError(f"load_adapter: the {what} adapter does not fit this model: " + ", ".join(parts))


def config_for_loading(config: TuningConfig, model: nn.Module, is_trainable: bool) -> tuple[TuningConfig, dict]:
    """The config to ``tune`` with for an adapter read from a file, and the fields to put back
    on the tuned model's config afterwards. The file's ``modules_to_save`` names exactly the
    modules it holds: PEFT writes every classifier name it knows (["classifier", "score"]), so
    only those present are kept, and no pooler is added (``train_pooler``). Prefix tuning's file
    holds the encoder's output (no reparameterisation MLP); prompt tuning's weights come from
    the file (no tokenizer needed for a TEXT init)."""
    config = copy.copy(config)
    config.inference_mode = not is_trainable
    restore = {}
    if getattr(config, "modules_to_save", None):
        names = [n for n, _ in model.named_modules() if n]
        config.modules_to_save = [t for t in config.modules_to_save
                                  if any(n == t or n.endswith("." + t) for n in names)] or None
    if getattr(config, "train_pooler", None) is not None:
        restore["train_pooler"], config.train_pooler = config.train_pooler, False
    if isinstance(config, PrefixTuningConfig):
        config.prefix_projection = False
    if isinstance(config, PromptTuningConfig):
        restore["prompt_tuning_init"] = config.prompt_tuning_init
        config = dataclasses.replace(config, prompt_tuning_init="RANDOM")
    return config, restore


def check_fits(model: nn.Module, config: TuningConfig, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError, before the model is touched, when the file's tensors do not fit ``model``
    (LoRA and full fine-tuning; prompt learning is checked by ``fill_adapter``)."""
    if isinstance(config, LoraConfig):
        _check_lora(model, config, tensors)
    elif isinstance(config, FullFineTuningConfig):
        state = model.state_dict()
        # a tied weight is saved once, under either of its names
        expected = {k: tuple(state[k].shape) for k in state if k in tensors}
        for group in tied_groups(state):
            if not any(k in tensors for k in group):
                expected[group[0]] = tuple(state[group[0]].shape)
        try:
            _check_shapes("full fine-tuning", expected, tensors)
        except ValueError as err:
            raise ValueError(f"{err} (a model folder whose keys transformers converts on loading: load it with "
                             "AutoModel*.from_pretrained, then tune it)") from None


def _check_lora(model, config: LoraConfig, tensors) -> None:
    try:
        names = lora_target_names(model, config)
        keep = modules_to_save_names(model, config)
    except ValueError as err:
        raise ValueError(f"load_adapter: the LoRA adapter does not fit {type(model).__name__}: {err}") from None
    modules = dict(model.named_modules())
    expected = {}
    for name in names:
        m = modules[name]
        out_f, in_f = (m.weight.shape[::-1] if is_conv1d(m) else m.weight.shape)
        expected[f"{PREFIX}{name}.lora_A.weight"] = (config.r, int(in_f))
        expected[f"{PREFIX}{name}.lora_B.weight"] = (int(out_f), config.r)
        if m.bias is not None and f"{PREFIX}{name}.base_layer.bias" in tensors:
            expected[f"{PREFIX}{name}.base_layer.bias"] = tuple(m.bias.shape)
    for name in keep:
        for key, value in modules[name].state_dict().items():
            if f"{PREFIX}{name}.{key}" in tensors:
                expected[f"{PREFIX}{name}.{key}"] = tuple(value.shape)
    for key in tensors:
        if key.startswith(PREFIX) and key.endswith(".bias") and key not in expected:
            owner = key[len(PREFIX):-len(".bias")]
            bias = getattr(modules.get(owner), "bias", None)
            if isinstance(bias, torch.Tensor):
                expected[key] = tuple(bias.shape)
    _check_shapes("LoRA", expected, tensors)


def fill_adapter(tuned, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the file's tensors into the tuned model (PEFT's key names -> our modules)."""
    config, model = tuned.config_tuning, tuned.base_model
    if isinstance(config, FullFineTuningConfig):
        state = model.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                state[key].copy_(value)
        return
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        encoder = tuned.prompt_encoder if isinstance(config, PromptTuningConfig) else tuned.prefix_encoder
        expected = {"prompt_embeddings": tuple(encoder.embedding.weight.shape)}
        expected.update({k: tuple(v.shape) for k, v in _saved_module_state(tuned).items()
                         if k in tensors})
        _check_shapes(config.peft_type, expected, tensors)
        with torch.no_grad():
            encoder.embedding.weight.copy_(tensors["prompt_embeddings"])
    params = {_module_prefix(config) + k: v for k, v in model.state_dict(keep_vars=True).items()}
    layers = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for key, value in tensors.items():
            if key == "prompt_embeddings":
                continue
            target = key
            if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
                target = key[: -len(".weight")]
            elif ".base_layer." in key and key.split(".base_layer.")[0][len(PREFIX):] in layers:
                target = key.replace(".base_layer.", ".")
            if target not in params:
                raise ValueError(f"load_adapter: key {key} has no place in {type(model).__name__}")
            params[target].copy_(value)


def _saved_module_state(tuned) -> dict[str, torch.Tensor]:
    out, prefix = {}, _module_prefix(tuned.config_tuning)
    for name in tuned.modules_to_save:
        for key, value in tuned.base_model.get_submodule(name).state_dict().items():
            out[f"{prefix}{name}.{key}"] = value
    return out
