"""The `lora-kernels` command: `info` (versions and backends); more subcommands register here."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, available backends and why not the others")
    p_info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
