"""The built wheel: kernels/ installs as fastfit.kernels (never as top-level `kernels`), with the configs and the
CMake-generated build info, and the console script."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from isolated_python import run_without_site

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_layout_and_import_from_an_install(tmp_path):
    pytest.importorskip("scikit_build_core", reason="building the wheel needs scikit-build-core (the dev extra)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("fastfit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "fastfit/kernels/__init__.py",
        "fastfit/kernels/kd_loss.py",
        "fastfit/kernels/hint_loss.py",
        "fastfit/_build_info.py",
        "fastfit/configs/fitnets_r50_r18_in1k.toml",
        "fastfit/configs/demo_fmnist_fitnet.toml",
    } <= names
    assert not any(n.startswith("kernels/") for n in names), "the top-level name `kernels` belongs to another project"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastfit = fastfit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import fastfit, fastfit.kernels, fastfit._build_info as b; from fastfit.config import shipped_configs_dir;"
        "print(fastfit.__file__); print(fastfit.kernels.__file__); print(shipped_configs_dir()); print(b.VERSION)"
    )
    # Without site processing an editable install of this checkout cannot shadow the wheel.
    result = run_without_site(["-c", probe], [site], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    assert all(line.startswith(str(site)) for line in out[:3]), out
    assert out[3] == "0.1.0"


def test_source_checkout_without_install_imports_the_kernels(tmp_path):
    # As on a machine that only has the checkout on PYTHONPATH (e.g. a GPU machine without package access).
    probe = "import fastfit.kernels as k, fastfit.kernels.hint_loss as h; print(k.__file__); print(h.__file__)"
    result = run_without_site(["-c", probe], [ROOT], cwd=tmp_path, env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    assert out == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "kernels" / "hint_loss.py")]


def _checkout(tmp_path: Path, project_name: str | None) -> Path:
    """A copy of fastfit/ with a foreign kernels/ beside it (and, if given, a pyproject.toml naming a project)."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "fastfit", root / "fastfit", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text("raise SystemExit('a foreign kernels package was imported')\n")
    if project_name is not None:
        (root / "pyproject.toml").write_text(f'[project]\nname = "{project_name}"\n')
    return root


@pytest.mark.parametrize("project_name", [None, "kernels"])
def test_a_kernels_folder_of_another_project_is_never_bound(tmp_path, project_name):
    """fastfit.kernels binds only this project's kernels/: beside a folder of that name from anything else (no
    pyproject.toml, or one naming another project, e.g. the unrelated PyPI project `kernels`) it stays missing."""
    root = _checkout(tmp_path, project_name)
    probe = (
        "import fastfit\n"
        "try:\n    import fastfit.kernels\nexcept ModuleNotFoundError as err:\n    print('missing', err.name)\n"
    )
    result = run_without_site(["-c", probe], [root], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["missing", "fastfit.kernels"]
