"""The package's shape: layers that only look down, no import circles, no part too large, docs that match.

``lint-imports`` (import-linter, contracts in ``.importlinter``) runs here and in ``.ci/run``;
these tests also show that the contracts can fail, and check what the contracts do not cover.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "explainrt"


LINT = """
import sys
# an editable install redirects `import explainrt` to the checkout: drop it so PYTHONPATH decides
sys.meta_path = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__]
from importlinter.cli import lint_imports
sys.exit(lint_imports(no_cache=True, no_logo=True))
"""


def lint(repo: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package in ``repo`` (no cache, so an edited copy is read afresh)."""
    return subprocess.run([sys.executable, "-c", LINT],
                          cwd=repo, capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold() -> None:
    done = lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("runtime/base.py", "from explainrt.methods import METHODS  # noqa", "Layers only look down"),  # a lower layer looks up
    ("autodiff/gradients.py", "from explainrt.autodiff import rules  # noqa", "No import circles"),  # a circle in a package
    ("methods/base.py", "def late():\n    from explainrt.explainer import Explainer  # noqa", "Layers only look down"),
])
def test_the_contracts_catch_a_violation(tmp_path: Path, module: str, line: str, broken: str) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "explainrt", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(REPO / ".importlinter", copy / ".importlinter")
    with open(copy / "explainrt" / module, "a", encoding="utf-8") as handle:
        handle.write(f"\n\n{line}\n")
    done = lint(copy)
    assert done.returncode != 0
    assert re.search(rf"{re.escape(broken)}.*BROKEN", done.stdout), done.stdout


def test_every_top_level_part_is_in_a_layer() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    placed = {name.strip() for line in layers.splitlines() for name in line.split("|") if name.strip()}
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert parts == placed


def test_no_top_level_part_holds_more_than_a_quarter_of_the_lines() -> None:
    sizes = {}
    for part in PACKAGE.iterdir():
        files = [part] if part.suffix == ".py" else list(part.rglob("*.py"))
        sizes[part.name] = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    assert sizes[largest] <= total / 4, f"{largest} holds {sizes[largest]} of {total} lines"


def test_readme_layout_and_architecture_page_name_every_part() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Repository layout"):]
    layout = layout[:layout.index("\n## ", 3)]
    architecture = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    parts = sorted({p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "version")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()})
    for part in parts:
        assert re.search(rf"\b{part}(/|\.py)", layout), f"README's layout does not name {part}"
        assert re.search(rf"\b{part}\b", architecture), f"ARCHITECTURE.md does not name {part}"
