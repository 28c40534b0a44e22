"""Every ```python block of README.md runs as written: each in a fresh namespace and its own
empty working folder, all in one child interpreter (CPU; tiny models built from configs, no
model hub). A block that cannot run here belongs in a ```text or ```bash block instead."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LANGUAGES = {"python", "bash", "text"}

RUNNER = r"""
import json, os, sys, tempfile, traceback
sys.path.insert(0, os.getcwd())  # this checkout's package, whatever the folder a block runs in
blocks = json.loads(sys.stdin.read())
results = {}
for line, source in blocks:
    folder = tempfile.mkdtemp(prefix=f"readme_{line}_", dir=sys.argv[1])
    os.chdir(folder)
    try:
        exec(compile(source, f"README.md, block at line {line}", "exec"), {"__name__": "__main__"})
        results[line] = None
    except BaseException:
        results[line] = traceback.format_exc(limit=-4)
print("RESULTS " + json.dumps(results))
"""


def readme_blocks() -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, source) of every fenced block of README.md."""
    text = README.read_text()
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


PYTHON = [(line, src) for lang, line, src in readme_blocks() if lang == "python"]


def test_every_block_names_a_language_it_is_meant_as():
    found = {(lang, line) for lang, line, _ in readme_blocks() if lang not in LANGUAGES}
    assert not found, f"blocks tagged other than {sorted(LANGUAGES)} (line numbers): {sorted(found)}"
    assert len(PYTHON) >= 8


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # noqa: F841 - the blocks need it
    pytest.importorskip("peft")
    work = tmp_path_factory.mktemp("readme")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(work)], input=json.dumps(PYTHON),
                          capture_output=True, text=True, timeout=900, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    marker = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert marker, f"the runner failed (status {proc.returncode}):\n{proc.stderr[-4000:]}"
    return {int(k): v for k, v in json.loads(marker[-1][len("RESULTS "):]).items()}


@pytest.mark.parametrize("line", [line for line, _ in PYTHON], ids=[f"line{line}" for line, _ in PYTHON])
def test_python_block_runs(results, line):
    assert results[line] is None, f"README.md block at line {line} failed:\n{results[line]}"
