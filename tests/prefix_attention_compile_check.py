"""Compile every prefix-attention Triton kernel for a GPU target (sm_90) without a GPU, for each
autotune config: Triton's front end, MLIR passes and ptxas all run. Not collected by pytest
(under a minute on 2 cores); run it by hand, e.g. under another Triton version:

    PYTHONPATH=$PWD python tests/prefix_attention_compile_check.py

Prints one line per kernel and exits non-zero on the first one that does not compile."""

import os

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lora_kernels.triton.prefix_attention as m  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BF16 = "*bf16"
POINTERS = {name: BF16 for name in "Q K V PK PV O DO DQ KX VX DKX DVX".split()}
POINTERS.update(scale="fp32", LSE="*fp32", DELTA="*fp32", KPM="*u8")


def compile_one(kernel, types, constexprs, num_warps, num_stages) -> int:
    """Shared memory in bytes of one compiled specialisation (every other argument an i32)."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # under the autotuner
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=TARGET, options=options).metadata.shared


def main() -> None:
    count = 0
    for cfg in m._configs():
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        w, s = cfg.num_warps, cfg.num_stages
        for causal, pad in [(True, True), (False, False)]:
            cx = dict(CAUSAL=causal, HAS_PAD=pad, DOT_FP32=False, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=128)
            jobs = [(m._fwd_kernel, POINTERS, cx), (m._bwd_dq_kernel, POINTERS, cx),
                    (m._bwd_kv_kernel, POINTERS, {**cx, "IS_PREFIX": False}),
                    (m._bwd_kv_kernel, {**POINTERS, "DKX": "*fp32", "DVX": "*fp32"},
                     {**cx, "IS_PREFIX": True})]
            for kernel, types, constexprs in jobs:
                shared = compile_one(kernel, types, constexprs, w, s)
                count += 1
                print(f"compiled {kernel.fn.__name__} {bm}x{bn} warps={w} stages={s} "
                      f"{constexprs}: {shared} bytes shared memory")
    shared = compile_one(m._delta_kernel, {"O": BF16, "DO": BF16, "DELTA": "*fp32"},
                         dict(BLOCK_M=16, BLOCK_D=128), 4, 1)
    count += 1
    print(f"compiled {count} kernels with Triton {triton.__version__}")


if __name__ == "__main__":
    main()
