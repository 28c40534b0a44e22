"""The tuned models on the fused kernels: the Triton backend (Triton's interpreter on the CPU)
gives the torch backend's logits and gradients for LoRA and prefix tuning. Skipped until the
Triton backends of both ops are registered."""

import pytest
import torch
from tuning_models import (
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    task_type,
)

import lora_kernels as lk
from lora_kernels import backends


def _triton_ready() -> bool:
    import lora_kernels.ops  # noqa: F401  (registers the backends)

    registered = all("triton" in backends._support.get(op, {}) for op in ("lora_linear", "prefix_attention"))
    return registered and not backends.available_reasons("triton", torch.device("cpu"))


pytestmark = pytest.mark.skipif(not _triton_ready(), reason="Triton backends of the ops not available here")


@pytest.mark.parametrize("kind, method", [("llama", "lora"), ("llama", "prefix"), ("bert", "prefix")])
def test_triton_backend_matches_torch_backend(kind, method):
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        if method == "lora":
            cfg = lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type=task_type(kind))
        else:
            cfg = lk.PrefixTuningConfig(num_virtual_tokens=3, task_type=task_type(kind))
        tuned = lk.tune(make_model(kind, init_range=0.2), cfg)
        tuned.train()
        lk.set_backend(backend)
        out = tuned(**batch(kind, B=2, L=5, pad=True))
        out.loss.backward()
        lk.set_backend(None)
        results.append((out.logits.detach(), {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}))
    (logits_t, grads_t), (logits_k, grads_k) = results
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-4)
    assert grads_t.keys() == grads_k.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_gpu_bf16_tuned_llama_close_to_float64(method):
    """On a GPU: the tuned LLaMA (GQA) in bf16 on the automatic (fused) backends, against the
    float64 torch run; error at most a few times that of the bf16 torch run (end to end through
    two layers, hence factor 4 rather than the per-op 2)."""
    from helpers import assert_close_to_reference

    def run(backend, dtype):
        torch.manual_seed(0)
        model = make_model("llama", init_range=0.2).to("cuda", dtype)
        if method == "lora":
            cfg = lk.LoraConfig(r=8, target_modules="all-linear")
        else:
            cfg = lk.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True)
        tuned = lk.tune(model, cfg)
        tuned.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(tuned.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        inputs = {k: v.cuda() for k, v in batch("llama", B=3, L=37, pad=True).items()}
        lk.set_backend(backend)
        try:
            out = tuned(**inputs)
            out.loss.backward()
        finally:
            lk.set_backend(None)
        grads = {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}
        return out.logits, grads

    ref_logits, ref_grads = run("torch", torch.float64)
    base_logits, base_grads = run("torch", torch.bfloat16)
    got_logits, got_grads = run(None, torch.bfloat16)
    assert_close_to_reference(got_logits, ref_logits, base_logits, "logits", factor=4.0)
    for name in ref_grads:
        assert_close_to_reference(got_grads[name], ref_grads[name], base_grads[name], name, factor=4.0)
