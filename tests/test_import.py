"""`import lora_kernels` is light (no transformers, no peft) and every subpackage is reachable as
an attribute without importing it first; checked in fresh interpreters, since any earlier import
in the test process would hide a missing attribute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_import_is_light_and_nn_is_an_attribute():
    out = _run(
        "import sys; import lora_kernels as lk\n"
        "print(sorted(m for m in ('transformers', 'peft', 'lora_kernels.nn') if m in sys.modules))\n"
        "print(lk.nn.LoRALinear.__name__, lk.nn.PrefixEncoder.__name__)\n"
        "print('transformers' in sys.modules, 'nn' in dir(lk))\n"
        "try:\n    lk.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    assert out == ["[]", "LoRALinear PrefixEncoder", "False True",
                   "module 'lora_kernels' has no attribute 'nope'"]


def test_every_subpackage_is_an_attribute():
    exprs = ["lk.tuning.tune", "lk.integrations.transformers.register",
             "lk.integrations.peft.accelerate", "lk.training.fit", "lk.reference",
             "lk.cuda", "lk.cli.main"]
    out = _run("import sys; import lora_kernels as lk\n"
               + "".join(f"print({e!r}, {e} is not None)\n" for e in exprs)
               + "print('peft' in sys.modules)")
    assert out == [f"{e} True" for e in exprs] + ["False"]
