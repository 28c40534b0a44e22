"""The `lora-kernels` command: `info` (versions and backends), `finetune` (one tuning method on
a local model folder and a .jsonl/.csv data file)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, backends

    print(f"lora_kernels {__version__}")
    print(f"python       {platform.python_version()} ({sys.platform})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    for mod in ("triton", "transformers", "peft"):
        try:
            version = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report any import failure as missing
            version = "not installed"
        print(f"{mod:<12} {version}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"GPU          {gpu}")
    print(f"interpreter  TRITON_INTERPRET={'1' if backends.interpreter_enabled() else '0'}")
    print(f"requested    {backends.get_backend()}")
    print("backends:")
    for name, reasons in backends.describe().items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        validated = sorted(op for op, b in backends.GPU_VALIDATED if b == name)
        extra = f" (GPU-validated: {', '.join(validated)})" if validated else ""
        print(f"  {name:<7} {status}{extra}")
    return 0


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from .training.finetune import add_arguments

    add_arguments(parser)


def _finetune(args: argparse.Namespace) -> int:
    from .training.finetune import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, available backends and why not the others")
    p_info.set_defaults(func=_info)
    p_ft = sub.add_parser(
        "finetune",
        help="fine-tune a local model folder on a .jsonl/.csv file with one method",
        description="Fine-tune a local model folder on a .jsonl/.csv file with one method "
        "(full, prompt, prefix, lora); saves the adapter in PEFT's format and metrics.json.",
    )
    _add_finetune_arguments(p_ft)
    p_ft.set_defaults(func=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
