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


def test_capabilities_explain_each_mismatch():
    caps = backends.Capabilities(devices=("cuda",), dtypes=(torch.float16,), head_dims=(64,),
                                 max_rank=8, dropout=False)
    x = torch.zeros(2, 3)
    reasons = caps.reasons({"x": x}, head_dim=40, rank=9, dropout=True)
    assert any("x is on cpu" in r for r in reasons)
    assert any("x dtype float32 is not supported (float16)" in r for r in reasons)
    assert any("head dim 40 is not supported (64)" in r for r in reasons)
    assert any("rank 9 > 8" in r for r in reasons)
    assert any("dropout in training" in r for r in reasons)
    assert backends.Capabilities().reasons({"x": x}, head_dim=999, rank=999, dropout=True) == []
    capped = backends.Capabilities(max_head_dim=256)
    assert capped.reasons({}, head_dim=256) == [] and capped.reasons({}, head_dim=257)


@pytest.mark.parametrize("op", ["lora_linear", "prefix_attention"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_every_backend_declares_its_capabilities_as_data(op, backend):
    import lora_kernels.ops  # noqa: F401  (registers the ops)

    if backend == "triton" and backends.triton_available_reasons():
        pytest.skip("triton not installed")
    caps = backends.capabilities(op, backend)
    assert isinstance(caps, backends.Capabilities)
    module = backends.load(op, backend)
    assert backends.load(op, backend) is module  # imported once, then looked up
    if backend == "torch":
        assert caps == backends.Capabilities()
    else:
        assert caps.dtypes and torch.float64 not in caps.dtypes
        assert caps.devices and "cuda" in caps.devices


def test_register_op_imports_lazily_and_reports_import_errors():
    backends.register_op("dummy_lazy_op", {"torch": "lora_kernels.no_such_module"})
    reasons = backends.not_supported_reasons("dummy_lazy_op", "torch", torch.device("cpu"))
    assert reasons and "cannot be imported" in reasons[0]
    assert backends.capabilities("dummy_lazy_op", "torch") is None


def test_choose_static_builds_stand_ins():
    """The traced choice sees stand-ins of the described shapes and dtypes (no memory)."""
    cpu = torch.device("cpu")
    if backends.triton_available_reasons(cpu):
        pytest.skip("Triton cannot run on the CPU here")
    seen = {}

    def reasons(**inputs):
        seen.update(inputs)
        return ["float64 only on torch"] if inputs["x"].dtype == torch.float64 else []

    backends.register_support("dummy_static_op", "triton", reasons)
    backends.register_support("dummy_static_op", "torch", lambda **kw: [])
    spec = (("x", backends.spec((1, 8), torch.float32)), ("p", 0.5), ("bias", None))
    assert backends.choose_static("dummy_static_op", "triton", cpu, spec) == "triton"
    assert seen["x"].shape == (1, 8) and seen["x"].dtype == torch.float32
    assert seen["x"].untyped_storage().nbytes() == 4  # one element, expanded
    assert seen["p"] == 0.5 and seen["bias"] is None
    with pytest.raises(ValueError, match="float64 only on torch"):
        backends.choose_static("dummy_static_op", "triton", cpu,
                               (("x", backends.spec((1, 8), torch.float64)),))
    assert backends.choose_static("dummy_static_op", "auto", cpu, spec) == "torch"
