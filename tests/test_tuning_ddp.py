"""LoRA and prefix tuning under DistributedDataParallel and FSDP2 (2 processes, gloo, CPU): the
gradients equal single-process gradients on the same global batch, and save_adapter on a
sharded model writes the whole adapter."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tuning_models import (
    batch,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)

import lora_kernels as lk

METHODS = {
    "lora": lambda: lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "prefix": lambda: lk.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
}


def _grads(method, inputs, wrap=None):
    torch.manual_seed(0)
    tuned = lk.tune(make_model("llama"), METHODS[method]())
    tuned.train()
    model = wrap(tuned) if wrap else tuned
    model(**inputs).loss.backward()
    return {n: p.grad.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = batch("llama", B=4, L=6, seed=7)
        half = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m)
        result = {m: _grads(m, half, ddp) for m in METHODS}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        _fsdp_part(rank, world, out_dir, half)
    finally:
        dist.destroy_process_group()


def _fsdp_part(rank, world, out_dir, half):
    """FSDP2: each decoder layer, then the TunedModel, sharded over the 2 processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for method in METHODS:
        torch.manual_seed(0)
        tuned = lk.tune(make_model("llama"), METHODS[method]())
        tuned.train()
        for layer in tuned.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(tuned, mesh=mesh)
        tuned(**half).loss.backward()
        result[method] = {n: p.grad.full_tensor() for n, p in tuned.named_parameters() if p.requires_grad}
        tuned.save_adapter(os.path.join(out_dir, method))  # every rank; rank 0 writes
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "fsdp.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_and_fsdp2_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    full = batch("llama", B=4, L=6, seed=7)
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for method in METHODS:
        single = _grads(method, full)
        assert single and all(g.abs().sum() > 0 for g in single.values())
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[method]
            assert got.keys() == single.keys()
            for name in single:
                torch.testing.assert_close(got[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
        assert fsdp[method].keys() == single.keys()
        for name in single:
            # FSDP2 reduce-scatters in another order: float32 rounding only
            torch.testing.assert_close(fsdp[method][name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        # save_adapter on the sharded model wrote the whole adapter
        torch.manual_seed(0)
        unsharded = lk.tune(make_model("llama"), METHODS[method]())
        loaded = lk.load_adapter(make_model("llama"), tmp_path / method)
        ids = full["input_ids"]
        torch.testing.assert_close(loaded(input_ids=ids).logits, unsharded(input_ids=ids).logits)
