"""The tuning layer's layout: no import cycle between its files (imports inside functions
included), no private name imported across files, small files, and the prefix attribute of
attention modules written only through the integration's helper pair."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_kernels"
OWN = ["tuning", "integrations", "nn"]


def _imports(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every relative import in the file, wherever it is."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = f"lora_kernels.{package}".split(".")[: len(f"lora_kernels.{package}".split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((PACKAGE / "tuning").glob("*.py")):
        name = f"lora_kernels.tuning.{path.stem}"
        deps = set()
        for module, names in _imports(path, "tuning"):
            if module == "lora_kernels.tuning":  # "from . import io"
                deps |= {f"lora_kernels.tuning.{n}" for n in names}
            elif module.startswith("lora_kernels.tuning."):
                deps.add(module)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle_in_the_tuning_layer():
    graph = _graph()
    assert {"lora_kernels.tuning.lora", "lora_kernels.tuning.prefix", "lora_kernels.tuning.prompt",
            "lora_kernels.tuning.full", "lora_kernels.tuning.io"} <= set(graph)
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            if dep != "lora_kernels.tuning":  # the package __init__ re-exports only
                visit(dep, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
    # the file format does not reach back into the model or the entry points
    assert not graph["lora_kernels.tuning.io"] & {"lora_kernels.tuning.model", "lora_kernels.tuning.api"}


def test_no_private_names_cross_files_and_files_stay_small():
    for sub in OWN:
        for path in sorted((PACKAGE / sub).glob("*.py")):
            for module, names in _imports(path, sub):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"
            lines = len(path.read_text().splitlines())
            assert lines <= 400, f"{sub}/{path.name} has {lines} lines"


def test_prefix_attribute_written_only_by_the_helper_pair():
    for sub in OWN:
        for path in sorted((PACKAGE / sub).glob("*.py")):
            text = path.read_text()
            if path.name == "transformers.py" and sub == "integrations":
                continue  # where the helpers live
            assert not re.search(r"(?<![\w])(hf_attention\.)?PREFIX_ATTR\b", text), path
