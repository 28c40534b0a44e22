"""The `lora-kernels` command: `info` (versions and backends), `finetune` (one tuning method on
a local model folder and a .jsonl/.csv data file), `predict` (label a file with a finetune run).

A bad argument or data file ends the command with one line on stderr and exit status 2, before
any model is loaded and before anything is written."""

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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None) or it is a flag."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _finetune(args: argparse.Namespace) -> int:
    from .training.finetune import run

    return run(args)


def _predict(args: argparse.Namespace) -> int:
    from .training.predict import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .training import finetune, predict  # argument definitions only: no transformers import

    parser = _Parser(prog="lora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_info = sub.add_parser("info", help="versions, available backends and why not the others")
    p_info.set_defaults(func=_info)
    p_ft = sub.add_parser(
        "finetune", formatter_class=_HelpFormatter,
        help="fine-tune a local model folder on a .jsonl/.csv file with one method",
        description="Fine-tune a local model folder on a .jsonl/.csv file with one method "
        "(full, prompt, prefix, lora); saves the adapter in PEFT's format (the whole model for "
        "full), metrics.json, training.png and a checkpoint per epoch.",
    )
    finetune.add_arguments(p_ft)
    p_ft.set_defaults(func=_finetune)
    p_pr = sub.add_parser(
        "predict", formatter_class=_HelpFormatter,
        help="label a .jsonl/.csv file with a classification run of finetune",
        description="Label the texts of a .jsonl/.csv file with a finetune run (its --out folder); "
        "scores accuracy and macro-F1 when the file has labels.",
    )
    predict.add_arguments(p_pr)
    p_pr.set_defaults(func=_predict)
    return parser


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .training.arguments import UsageError
    from .training.data import DataError

    try:
        return args.func(args)
    except (UsageError, DataError) as e:
        print(f"lora-kernels {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
