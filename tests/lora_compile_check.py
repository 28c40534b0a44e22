"""Compile every lora_linear Triton kernel for a GPU target (sm_90) without a GPU: Triton's
front end, the MLIR passes and ptxas all run, so type errors, bad constexpr use and register or
shared-memory blow-ups show here. Run in a subprocess with TRITON_INTERPRET=0 (the test process
runs Triton in its interpreter, where kernels are not compiled). Prints one line per kernel."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lora_kernels.triton.lora_linear as m  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CODE = {"fp32": 0, "fp16": 1, "bf16": 2}


def compile_one(kernel, types, constexprs, num_warps=4, num_stages=3):
    fn = kernel.fn  # under the autotuner
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return k.metadata.shared


def main(dt: str, adt: str) -> None:
    ct, cta = CODE[dt], (0 if adt == "fp32" else CODE[adt])
    x, a = f"*{dt}", f"*{adt}"
    rng = {"seed": "i64", "p": "fp32", "inv_keep": "fp32", "scaling": "fp32"}
    jobs = [
        (m._shrink, {"x_ptr": x, "a_ptr": a, "s_ptr": "*fp32", **rng},
         {"HAS_DROPOUT": True, "CT": cta, "BLOCK_R": 16, "BLOCK_M": 64, "BLOCK_K": 64}),
        (m._fwd_gemm, {"x_ptr": x, "w_ptr": x, "bias_ptr": x, "s_ptr": "*fp32", "b_ptr": a,
                       "y_ptr": x, **rng},
         {"HAS_BIAS": True, "CT_BASE": ct, "CT_LORA": cta, "BLOCK_R": 16, "BLOCK_M": 128,
          "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}),
        (m._ds_db, {"dy_ptr": x, "b_ptr": a, "s_ptr": "*fp32", "ds_ptr": "*fp32",
                    "db_ptr": "*fp32", **rng},
         {"NEED_DS": True, "NEED_DB": True, "CT": cta, "BLOCK_R": 256, "BLOCK_M": 32, "BLOCK_N": 32}),
        (m._dx, {"dy_ptr": x, "w_ptr": x, "ds_ptr": "*fp32", "a_ptr": a, "dx_ptr": x, **rng},
         {"HAS_DROPOUT": True, "CT_BASE": ct, "CT_LORA": cta, "BLOCK_R": 64, "BLOCK_M": 128,
          "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}),
        (m._da, {"ds_ptr": "*fp32", "x_ptr": x, "da_ptr": a, **rng},
         {"HAS_DROPOUT": True, "CT": cta, "BLOCK_R": 16, "BLOCK_M": 64, "BLOCK_N": 64}),
    ]
    for kernel, types, cx in jobs:
        shared = compile_one(kernel, types, cx, num_stages=2 if kernel is m._ds_db else 3)
        print(f"compiled {kernel.fn.__name__} {dt}/{adt}: {shared} bytes shared memory")


if __name__ == "__main__":
    main(*sys.argv[1:3])
