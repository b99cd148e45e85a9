"""The documentation: the site builds in strict mode, the Python examples of its pages run,
and the README is a first-visit page whose links stay inside the repository."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"(?ms)^(?P<before>[^\n]*)\n```python\n(?P<code>.*?)^```")
NOT_RUN = re.compile(r"<!-- not run: (?P<why>.+) -->")


def examples(page: pathlib.Path) -> list[tuple[int, str]]:
    """(line, code) of the page's ```python blocks that run: all but those preceded by a
    ``<!-- not run: reason -->`` line, which must give its reason."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if NOT_RUN.search(match["before"]):
            continue
        assert "not run" not in match["before"], f"{page}: say why a block is not run"
        found.append((text[: match.start("code")].count("\n") + 1, match["code"]))
    return found


PAGES = [*sorted(p for p in DOCS.rglob("*.md") if examples(p)), ROOT / "README.md"]


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is missing: pip install '.[test]' (or '.[docs]') installs it")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    reference = (tmp_path / "site" / "reference" / "estimator" / "index.html").read_text()
    assert "fit_transform" in reference and "storage_options" in reference  # from docstrings
    performance = (tmp_path / "site" / "guide" / "performance" / "index.html").read_text()
    assert "Object store against local disk" in performance  # RESULTS.md included


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_a_page_run(page, tmp_path, monkeypatch):
    """Every runnable block of the page, in order, in one namespace, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in examples(page):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as error:
                where = f"{page.relative_to(ROOT)}, the block at line {line}"
                raise AssertionError(where) from error


def test_the_readme_is_a_first_visit_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for required in ("python -m pip install . && dasknmf demo", "python -m pytest"):
        assert required in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links, "the README links into the docs"
    for link in links:
        assert not re.match(r"[a-z]+:", link), f"{link} leaves the repository"
        target = (ROOT / link.split("#")[0]).resolve()
        assert target.is_relative_to(ROOT), f"{link} leaves the repository"
        assert target.exists(), f"{link} points at nothing"


def test_no_page_links_out_of_the_repository():
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]:
        for link in re.findall(r"\]\(([^)#]*)", page.read_text()):
            assert not re.match(r"[a-z]+:", link), f"{page.name}: {link} leaves the repository"
            target = (page.parent / link).resolve()
            assert target.is_relative_to(ROOT), f"{page.name}: {link} leaves the repository"
