"""The CUDA extension on a machine without a GPU: it builds and imports, its ops carry the
expected schemas, the fake implementations give the right shapes and dtypes, the argument checks
reject CPU tensors and bad shapes with messages that name the argument; the loader's reasons;
the build switches of setup.py. Kernels themselves are checked in test_cuda_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_kernels.cuda import extension

ROOT = Path(__file__).resolve().parents[1]
cuda_ext = pytest.mark.cuda_ext


@pytest.fixture
def lib():
    from lora_kernels.cuda import ops

    return ops()


@pytest.fixture
def fresh_loader():
    """Let a test patch the loader; the cached import result is restored afterwards."""
    extension._reset_for_tests()
    yield extension
    extension._reset_for_tests()


# --- the extension itself ---------------------------------------------------------------------


@cuda_ext
def test_extension_imports_and_matches_torch():
    module = extension.load()
    assert module.__name__ == "lora_kernels._C"
    assert module.torch_version == extension._torch_base_version(torch.__version__)
    assert module.cuda_runtime_version > 0
    assert extension.unavailable_reason() in (None, extension.NO_GPU)


@cuda_ext
def test_every_op_registered_with_its_schema(lib):
    from lora_kernels.cuda import SCHEMAS

    for name, schema in SCHEMAS.items():
        assert str(getattr(lib, name).default._schema) == schema, name
    registered = {
        s.name.split("::")[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("lora_kernels_cuda::")
    }
    assert registered == set(SCHEMAS)


# --- fake implementations --------------------------------------------------------------------


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("need_db", [True, False])
def test_lora_fakes_on_meta(lib, dtype, need_db):
    T, n_in, n_out, r = 7, 13, 11, 5
    meta = dict(device="meta")
    x = torch.empty(T, n_in, dtype=dtype, **meta)
    a = torch.empty(r, n_in, dtype=torch.float32, **meta)
    b = torch.empty(n_out, r, dtype=torch.float32, **meta)
    bias = torch.empty(n_out, dtype=dtype, **meta)
    s = lib.lora_shrink(x, a, 0.1, 123)
    assert s.shape == (T, r) and s.dtype == torch.float32 and s.device.type == "meta"
    y = lib.lora_expand(s, b, bias if need_db else None, 2.0, dtype)
    assert y.shape == (T, n_out) and y.dtype == dtype and y.device.type == "meta"
    ds, db = lib.lora_grad_s_b(y, s, b, 2.0, need_db)
    assert ds.shape == (T, r) and ds.dtype == torch.float32
    assert db.shape == ((n_out, r) if need_db else (0,)) and db.dtype == torch.float32
    for need_dx, need_da in [(True, True), (need_db, not need_db)]:
        dx, da = lib.lora_grad_x_a(ds, x, a, 0.1, 123, need_dx, need_da)
        assert dx.shape == ((T, n_in) if need_dx else (0,)) and dx.dtype == dtype
        assert da.shape == ((r, n_in) if need_da else (0,)) and da.dtype == torch.float32


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bp", [1, 3])
@pytest.mark.parametrize("mask", [True, False])
def test_attention_fakes_on_meta(lib, dtype, bp, mask):
    B, Hq, Hkv, Lq, Lk, P, D = 3, 4, 2, 5, 9, 6, 64
    kw = dict(dtype=dtype, device="meta")
    q = torch.empty(B, Hq, Lq, D, **kw)
    k = torch.empty(B, Hkv, Lk, D, **kw)
    v = torch.empty(B, Hkv, Lk, D, **kw)
    pk = torch.empty(bp, Hkv, P, D, **kw)
    pv = torch.empty(bp, Hkv, P, D, **kw)
    kpm = torch.empty(B, Lk, dtype=torch.bool, device="meta") if mask else None
    out, lse = lib.prefix_attention_fwd(q, k, v, pk, pv, kpm, True, 0.125)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    grads = lib.prefix_attention_bwd(out, q, k, v, pk, pv, kpm, out, lse, True, 0.125)
    for g, ref in zip(grads, (q, k, v, pk, pv)):
        assert g.shape == ref.shape and g.dtype == ref.dtype


@cuda_ext
def test_fakes_trace_under_fake_tensor_mode(lib):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 8, dtype=torch.bfloat16)
        a = torch.empty(3, 8)
        s = lib.lora_shrink(x, a, 0.0, 0)
        assert s.shape == (6, 3) and s.dtype == torch.float32
        q = torch.empty(2, 2, 5, 128, dtype=torch.float16)
        k = torch.empty(2, 1, 7, 128, dtype=torch.float16)
        pk = torch.empty(1, 1, 0, 128, dtype=torch.float16)
        out, lse = lib.prefix_attention_fwd(q, k, k, pk, pk, None, False, 0.1)
        assert out.shape == q.shape and lse.shape == (2, 2, 5)


# --- argument checks (ops registered for CPU only to raise these messages) ----------------------


def _lora_cpu(dtype=torch.float32, T=4, n_in=6, n_out=5, r=3):
    x = torch.randn(T, n_in, dtype=dtype)
    return x, torch.randn(r, n_in), torch.randn(n_out, r), torch.randn(T, n_out, dtype=dtype)


@cuda_ext
def test_lora_ops_reject_cpu_tensors(lib):
    x, a, b, y = _lora_cpu()
    s = torch.randn(4, 3)
    calls = {
        "lora_shrink: x must be a CUDA tensor": lambda: lib.lora_shrink(x, a, 0.0, 0),
        "lora_expand: s must be a CUDA tensor": lambda: lib.lora_expand(s, b, None, 1.0,
                                                                        torch.float32),
        "lora_grad_s_b: dy must be a CUDA tensor": lambda: lib.lora_grad_s_b(y, s, b, 1.0, True),
        "lora_grad_x_a: ds must be a CUDA tensor": lambda: lib.lora_grad_x_a(
            s, x, a, 0.0, 0, True, True),
    }
    for message, call in calls.items():
        with pytest.raises(RuntimeError, match=message):
            call()


@cuda_ext
def test_lora_ops_reject_bad_shapes_and_dtypes(lib):
    x, a, b, y = _lora_cpu()
    s = torch.randn(4, 3)
    cases = [
        (lambda: lib.lora_shrink(x, torch.randn(3, 7), 0.0, 0),
         r"lora_shrink: lora_A must have in_features \(x.size\(1\)\) = 6 \(dim 1\), got shape \(3, 7\)"),
        (lambda: lib.lora_shrink(x[0], a, 0.0, 0),
         r"lora_shrink: x must be a 2-D tensor, got shape \(6,\)"),
        (lambda: lib.lora_shrink(x.double(), a, 0.0, 0),
         "lora_shrink: x must be float32, float16 or bfloat16, got float64"),
        (lambda: lib.lora_shrink(x, a, 1.0, 0), r"lora_shrink: dropout_p must be in \[0, 1\), got 1"),
        (lambda: lib.lora_expand(s.half(), b, None, 1.0, torch.float32),
         "lora_expand: s must be float32, got float16"),
        (lambda: lib.lora_expand(s, torch.randn(5, 4), None, 1.0, torch.float32),
         r"lora_expand: lora_B must have rank \(s.size\(1\)\) = 3"),
        (lambda: lib.lora_expand(s, b, torch.randn(6), 1.0, torch.float32),
         r"lora_expand: bias must have out_features \(lora_B.size\(0\)\) = 5"),
        (lambda: lib.lora_expand(s, b, torch.randn(5).half(), 1.0, torch.float32),
         "lora_expand: bias must be float32, got float16"),
        (lambda: lib.lora_expand(s, b, None, 1.0, torch.float64),
         "lora_expand: out_dtype must be float32, float16 or bfloat16, got float64"),
        (lambda: lib.lora_grad_s_b(y, torch.randn(5, 3), b, 1.0, True),
         r"lora_grad_s_b: s must have tokens \(dy.size\(0\)\) = 4"),
        (lambda: lib.lora_grad_x_a(s, x, torch.randn(2, 6), 0.0, 0, True, True),
         r"lora_grad_x_a: lora_A must have rank \(ds.size\(1\)\) = 3"),
        (lambda: lib.lora_grad_x_a(s, torch.randn(5, 6), a, 0.0, 0, True, True),
         r"lora_grad_x_a: ds must have tokens \(x.size\(0\)\) = 5"),
        (lambda: lib.lora_grad_x_a(s, x, torch.randn(3, 7), 0.0, 0, True, True),
         r"lora_grad_x_a: lora_A must have in_features \(x.size\(1\)\) = 6"),
        (lambda: lib.lora_grad_x_a(s, x, a, -0.1, 0, True, True),
         r"lora_grad_x_a: dropout_p must be in \[0, 1\), got -0.1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def _attn_cpu(dtype=torch.float16, B=2, Hq=4, Hkv=2, Lq=3, Lk=5, P=2, D=64, bp=1):
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    k = torch.randn(B, Hkv, Lk, D).to(dtype)
    v = torch.randn(B, Hkv, Lk, D).to(dtype)
    pk = torch.randn(bp, Hkv, P, D).to(dtype)
    pv = torch.randn(bp, Hkv, P, D).to(dtype)
    return q, k, v, pk, pv


@cuda_ext
def test_attention_ops_reject_cpu_tensors(lib):
    q, k, v, pk, pv = _attn_cpu()
    with pytest.raises(RuntimeError, match="prefix_attention_fwd: q must be a CUDA tensor"):
        lib.prefix_attention_fwd(q, k, v, pk, pv, None, True, 0.125)
    lse = torch.zeros(2, 4, 3)
    with pytest.raises(RuntimeError, match="prefix_attention_bwd: q must be a CUDA tensor"):
        lib.prefix_attention_bwd(q, q, k, v, pk, pv, None, q, lse, True, 0.125)


@cuda_ext
def test_attention_ops_reject_bad_shapes_and_dtypes(lib):
    q, k, v, pk, pv = _attn_cpu()
    fwd = lib.prefix_attention_fwd
    cases = [
        (lambda: fwd(*_attn_cpu(D=32), None, True, 0.1),
         "prefix_attention_fwd: q must have head dim 64 or 128, got 32"),
        (lambda: fwd(*_attn_cpu(dtype=torch.float32), None, True, 0.1),
         "prefix_attention_fwd: q must be float16 or bfloat16, got float32"),
        (lambda: fwd(*_attn_cpu(Hq=3, Hkv=2), None, True, 0.1),
         r"prefix_attention_fwd: k heads \(2\) must divide q heads \(3\)"),
        (lambda: fwd(*_attn_cpu(B=3, bp=2), None, True, 0.1),
         r"prefix_attention_fwd: prefix_k must have shape \(1 or 3, 2, P, 64\), got \(2, 2, 2, 64\)"),
        (lambda: fwd(q, k, v[:, :, :4], pk, pv, None, True, 0.1),
         "prefix_attention_fwd: v must have k's shape"),
        (lambda: fwd(q, k, v, pk, pv.bfloat16(), None, True, 0.1),
         "prefix_attention_fwd: prefix_v must have q's dtype float16, got bfloat16"),
        (lambda: fwd(q, k, v, pk, pv, torch.ones(2, 5), True, 0.1),
         "prefix_attention_fwd: key_padding_mask must be bool, got float32"),
        (lambda: fwd(q, k, v, pk, pv, torch.ones(2, 4, dtype=torch.bool), True, 0.1),
         r"prefix_attention_fwd: key_padding_mask must have shape \(2, 5\), got \(2, 4\)"),
        (lambda: fwd(q[0], k, v, pk, pv, None, True, 0.1),
         r"prefix_attention_fwd: q must be a 4-D tensor \(B, Hq, Lq, D\)"),
        (lambda: lib.prefix_attention_bwd(q, q, k, v, pk, pv, None, q, torch.zeros(2, 4), True, 0.1),
         r"prefix_attention_bwd: lse must be float32 of shape \(2, 4, 3\)"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# --- backend modules ---------------------------------------------------------------------------


def test_backend_reasons_are_precise():
    from lora_kernels.cuda import lora_linear as cl
    from lora_kernels.cuda import prefix_attention as ca

    x, a, b, _ = _lora_cpu(dtype=torch.float64)
    w = torch.randn(5, 6, dtype=torch.float64)
    reasons = cl.not_supported_reasons(x, w, None, a, b, 0.0, True)
    assert any("x is on cpu" in r for r in reasons)
    assert any("x dtype float64 is not supported" in r for r in reasons)
    assert any("weight dtype" not in r for r in reasons)
    reasons = cl.not_supported_reasons(x.float(), w.half(), None, a, b, 1.5, True)
    assert any("weight dtype float16 differs from x dtype float32" in r for r in reasons)
    assert any("dropout_p must be in [0, 1)" in r for r in reasons)

    q, k, v, pk, pv = _attn_cpu(dtype=torch.float32, D=96)
    reasons = ca.not_supported_reasons(q, k, v, pk, pv, None, True, 0.1, True)
    assert any("q is on cpu" in r for r in reasons)
    assert any("dtype float32 is not supported" in r for r in reasons)
    assert any("head dim 96 is not supported" in r for r in reasons)
    assert any("dropout in training" in r for r in reasons)
    q, k, v, pk, pv = _attn_cpu()
    reasons = ca.not_supported_reasons(q, k, v, pk, pv, None, True, 0.1, False)
    assert reasons and all("cpu" in r for r in reasons)  # only the device is wrong
    reasons = ca.not_supported_reasons(q, k, v, None, None, torch.ones(2, 5), False, 0.0, False)
    assert any("key_padding_mask dtype float32 is not bool" in r for r in reasons)


def test_cuda_backend_never_auto_selected_until_validated():
    from lora_kernels import backends

    assert ("lora_linear", "cuda") not in backends.GPU_VALIDATED
    assert ("prefix_attention", "cuda") not in backends.GPU_VALIDATED


# --- loader ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, base", [("2.14.1+cu130", "2.14.1"), ("2.11.0a0+git1234", "2.11.0"),
                                           ("2.11.0", "2.11.0"), ("2.12.0.dev20260101", "2.12.0")])
def test_loader_compares_release_numbers(version, base):
    assert extension._torch_base_version(version) == base


def test_loader_reason_not_built(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader.importlib.util, "find_spec", lambda name: None)
    assert fresh_loader.unavailable_reason() == "extension not built"
    with pytest.raises(RuntimeError, match="CUDA extension unavailable: extension not built"):
        fresh_loader.load()


def test_loader_reason_import_failed(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader.importlib.util, "find_spec", lambda name: object())

    def boom(name):
        raise ImportError("undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(fresh_loader.importlib, "import_module", boom)
    assert fresh_loader.unavailable_reason() == (
        "import failed: ImportError: undefined symbol: _ZN3c104impl"
    )


def test_loader_reason_other_torch(fresh_loader, monkeypatch):
    fake = types.ModuleType("lora_kernels._C")
    fake.torch_version = "1.0.0"
    monkeypatch.setattr(fresh_loader.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(fresh_loader.importlib, "import_module", lambda name: fake)
    running = extension._torch_base_version(torch.__version__)
    assert fresh_loader.unavailable_reason() == f"built for torch 1.0.0, running torch {running}"


def test_loader_reason_no_gpu(fresh_loader, monkeypatch):
    fake = types.ModuleType("lora_kernels._C")
    fake.torch_version = extension._torch_base_version(torch.__version__)
    monkeypatch.setattr(fresh_loader.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(fresh_loader.importlib, "import_module", lambda name: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fresh_loader.unavailable_reason() == "no CUDA GPU visible"
    assert fresh_loader.load() is fake  # loading needs no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fresh_loader.unavailable_reason() is None


def test_package_works_without_extension():
    """As after an install with LORA_KERNELS_SKIP_CUDA_BUILD=1: the package imports, the cuda
    backend says why it is unavailable, the CLI reports it, explicit backend="cuda" raises."""
    code = (
        "import sys; sys.modules['lora_kernels._C'] = None\n"
        "import torch, lora_kernels\n"
        "from lora_kernels import backends, cli\n"
        "from lora_kernels.cuda import extension\n"
        "assert extension.unavailable_reason() == 'extension not built', extension.unavailable_reason()\n"
        "assert backends.available_reasons('cuda') == ['extension not built']\n"
        "cli.main(['info'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cuda    unavailable: extension not built" in done.stdout


# --- setup.py build switches -------------------------------------------------------------------


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("lora_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded: does not call setup()
    return module


def test_setup_skip_switch(setup_module, capsys):
    assert setup_module.cuda_extension_kwargs({"LORA_KERNELS_SKIP_CUDA_BUILD": "1"}) == {}
    assert "LORA_KERNELS_SKIP_CUDA_BUILD=1" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="both set"):
        setup_module.cuda_extension_kwargs(
            {"LORA_KERNELS_SKIP_CUDA_BUILD": "1", "LORA_KERNELS_FORCE_CUDA_BUILD": "1"}
        )


def test_setup_skips_or_fails_without_toolkit(setup_module, monkeypatch, capsys):
    monkeypatch.setattr(setup_module, "cuda_build_blocker", lambda: "no CUDA toolkit found")
    assert setup_module.cuda_extension_kwargs({}) == {}
    assert "not building the CUDA extension: no CUDA toolkit found" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="FORCE_CUDA_BUILD=1 but no CUDA toolkit found"):
        setup_module.cuda_extension_kwargs({"LORA_KERNELS_FORCE_CUDA_BUILD": "1"})


def test_setup_build_defaults(setup_module):
    defaults = setup_module.build_env_defaults({}, gpu_visible=False, cpu_count=2)
    assert defaults == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0", "MAX_JOBS": "2"}
    assert setup_module.build_env_defaults({}, gpu_visible=True, cpu_count=16) == {"MAX_JOBS": "16"}
    kept = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "3"}
    assert setup_module.build_env_defaults(kept, gpu_visible=False, cpu_count=8) == {}


def test_setup_extension_description(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module, "cuda_build_blocker", lambda: None)
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "1"}
    kwargs = setup_module.cuda_extension_kwargs(env)
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "lora_kernels._C"
    assert set(ext.sources) == {
        "csrc/registration.cpp",
        "csrc/lora_linear/lora_linear.cu",
        "csrc/prefix_attention/prefix_attention_fwd.cu",
        "csrc/prefix_attention/prefix_attention_bwd.cu",
    }
    assert "build_ext" in kwargs["cmdclass"]


def test_backend_reasons_name_old_gpus(monkeypatch):
    from lora_kernels.cuda import capability_reasons

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert capability_reasons(torch.device("cuda", 0)) == [
        "the CUDA kernels need compute capability 8.0 or newer, got 7.5"
    ]
    assert capability_reasons(torch.device("cpu")) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert capability_reasons(torch.device("cuda", 0)) == []


def test_setup_finds_ninja_off_path(setup_module, tmp_path):
    found = _ninja_dirs(setup_module)  # the venv's ninja (pip package), if any
    expected = found if found else [None]
    assert setup_module.ninja_dir({"PATH": str(tmp_path)}) in expected
    fake = tmp_path / "ninja"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert setup_module.ninja_dir({"PATH": str(tmp_path)}) is None  # already on PATH


def _ninja_dirs(setup_module):
    import shutil

    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.append(ninja.BIN_DIR)
    except ImportError:
        pass
    return [d for d in dirs if shutil.which("ninja", path=d)]
