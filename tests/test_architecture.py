"""The shape of the package, held by the suite: its layers (an import-linter contract in
pyproject.toml), no import circle, and modules and classes of a size one can read."""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dasknmf"
#: The aims: no module over ~500 lines, no class over ~250 (docstrings not counted).
MAX_MODULE_LINES = 520
MAX_CLASS_LINES = 300


def test_layers_are_kept():
    """cli > converters > estimator > pipeline > checkpoint, init > engine, svd > panels > ops >
    steps > divergence, solvers > kernels > io > csr > storage: a module imports only from
    layers below its own, which also rules out circles between them."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: pip install '.[test]' installs import-linter")
    result = subprocess.run(
        [lint, "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    """A new module must be placed in the contract, or nothing holds its imports."""
    text = (ROOT / "pyproject.toml").read_text()
    contract = text[text.index("[tool.importlinter]") :]
    for path in _modules():
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1]
        name = ".".join(parts[:2])  # the solvers' modules are inside their package's layer
        if name == "dasknmf":
            continue
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", contract), f"{name}: no layer"


def _docstring_lines(node) -> int:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[0].end_lineno - body[0].lineno + 1
    return 0


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_classes_stay_readable(path):
    source = path.read_text()
    tree = ast.parse(source)
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has grown too long"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            code = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
            assert code <= MAX_CLASS_LINES, f"class {node.name} has {code} lines of code"
