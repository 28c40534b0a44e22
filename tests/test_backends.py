"""Backend selection: explicit, set_backend, environment, auto; errors list every reason."""

import pytest
import torch

from lora_kernels import backends


def test_auto_on_cpu_is_torch():
    assert backends.choose("lora_linear", "auto", torch.device("cpu")) == "torch"


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.set_backend("fast")


def test_env_var_is_read(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.get_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        backends.get_backend()


def test_set_backend_overrides_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    backends.set_backend("torch")
    assert backends.get_backend() == "torch"


def test_explicit_cuda_without_extension_lists_every_backend():
    backends.register_support("dummy_op", "torch", lambda **kw: [])
    with pytest.raises(ValueError) as info:
        backends.choose("dummy_op", "cuda", torch.device("cpu"))
    text = str(info.value)
    assert "cuda:" in text and "triton:" in text and "torch: supported" in text


def test_auto_on_cuda_takes_only_gpu_validated_backends(monkeypatch):
    # choose() never touches tensors, so a CUDA device object is enough to test the rule.
    cuda = torch.device("cuda")
    backends.register_support("dummy_op", "torch", lambda **kw: [])
    backends.register_support("dummy_op", "triton", lambda **kw: [])
    monkeypatch.setattr(backends, "GPU_VALIDATED", frozenset())
    assert backends.choose("dummy_op", "auto", cuda) == "torch"
    monkeypatch.setattr(backends, "GPU_VALIDATED", frozenset({("dummy_op", "triton")}))
    assert backends.choose("dummy_op", "auto", cuda) == "triton"
    backends.register_support("dummy_op", "triton", lambda **kw: ["head dim 7 unsupported"])
    assert backends.choose("dummy_op", "auto", cuda) == "torch"


def test_describe_reports_reasons():
    info = backends.describe()
    assert info["torch"] == []
    assert set(info) == set(backends.BACKENDS)
