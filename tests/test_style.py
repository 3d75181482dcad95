"""The repository's own rules, checked by the test command: ruff (format and lint) and the import contract of
docs/architecture.md (layers, kernels independent of fastfit, no cycles) — and proof that each check goes red on a
deliberate violation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from isolated_python import run_without_site

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _ruff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # lint-imports analyses whatever `import fastfit` finds: here, the copy in `root`.
    return run_without_site(["-c", LINT_IMPORTS], [root], cwd=root, timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("fastfit", "kernels", "tests", "scripts"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_is_ruff_formatted_and_lint_clean():
    formatted = _ruff("format", "--check", ".", cwd=ROOT)
    assert formatted.returncode == 0, f"run `ruff format .`:\n{formatted.stdout}{formatted.stderr}"
    lint = _ruff("check", ".", cwd=ROOT)
    assert lint.returncode == 0, f"ruff check found problems:\n{lint.stdout}{lint.stderr}"


def test_the_import_contract_holds():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


VIOLATIONS = {
    # module, appended code, what the report must name
    "engine imports perf (deferred)": (
        "fastfit/engine/loop.py",
        "\n\ndef _peek():\n    from fastfit.perf import measure\n\n    return measure\n",
        "fastfit.engine.loop -> fastfit.perf.measure",
    ),
    "kernels import fastfit": ("kernels/kd_loss.py", "\nimport fastfit.config  # noqa: E402\n", "kernels.kd_loss"),
    "a TYPE_CHECKING cycle": (
        "fastfit/engine/run_state.py",
        "\nfrom typing import TYPE_CHECKING  # noqa: E402\n\nif TYPE_CHECKING:\n    from fastfit.engine import setup\n",
        ".run_state -> .setup",
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_the_import_contract_catches_a_deliberate_violation(tmp_path, case):
    module, code, named = VIOLATIONS[case]
    root = _copy(tmp_path)
    with open(root / module, "a") as handle:
        handle.write(code)
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and named in result.stdout, result.stdout


def test_ruff_catches_a_deliberate_violation(tmp_path):
    root = _copy(tmp_path)
    with open(root / "fastfit" / "errors.py", "a") as handle:
        handle.write("import os\nx = [1,2]\n")  # an unused import, and spacing ruff format would change
    assert _ruff("check", ".", cwd=root).returncode != 0
    assert _ruff("format", "--check", ".", cwd=root).returncode != 0
