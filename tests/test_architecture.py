"""The package's shape: the layer table is one table, modules stay small and say what they hold."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "mrg").rglob("*.py"))


def contract_layers() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r'type = "layers"\nlayers = \[\n(.*?)\n\]', text, re.DOTALL).group(1)
    return re.findall(r'"([^"]+)"', block)


def test_the_architecture_doc_draws_the_contract_s_layers_in_order():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    positions = [doc.find(f" {layer} ") for layer in contract_layers()]
    assert all(p >= 0 for p in positions), contract_layers()
    assert positions == sorted(positions)


def test_every_package_module_is_in_a_layer():
    layered = {m for layer in contract_layers() for m in re.split(r"\s*[|:]\s*", layer)}
    top = {
        f"mrg.{p.relative_to(ROOT / 'mrg').parts[0].removesuffix('.py')}"
        for p in MODULES
        if p.name != "__init__.py" or p.parent != ROOT / "mrg"
    }
    assert top <= layered, top - layered


def test_no_module_is_over_400_lines_and_each_says_what_it_holds():
    for path in MODULES:
        lines = path.read_text().count("\n")
        assert lines <= 400, f"{path.relative_to(ROOT)}: {lines} lines"
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.relative_to(ROOT)} has no opening docstring"


def test_package_faces_only_hand_names_on():
    """As in transformers and timm: a package's ``__init__`` imports and lists names; the
    classes and functions live in named modules (``mrg.batching.batcher``, …)."""
    import ast

    for init in sorted(Path("mrg").rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        defined = [
            node.name
            for node in tree.body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        assert not defined, f"{init} defines {defined}: move them to a module of their own"
