"""fastfit: FitNets knowledge distillation — hint losses through regressors plus temperature KD, fast.

Packages, each importing only from those below it (docs/architecture.md; the contract is in pyproject.toml):
cli → demo → perf → engine → data | distill | models → config | dist | kernels → errors.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceCheckoutKernels(importlib.abc.MetaPathFinder):
    """Maps fastfit.kernels onto this repository's top-level kernels/ folder when the checkout is used without
    installing (PYTHONPATH=.). An installed fastfit (wheel or editable) maps it itself and never reaches this."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != "fastfit.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def _own_kernels_folder(package_dir: Path) -> Path | None:
    """The checkout's kernels/ beside fastfit/, only when the folder above is this project (its pyproject.toml names
    the project fastfit): never some other `kernels` folder that happens to sit there."""
    root = package_dir.parent
    kernels = root / "kernels"
    if (package_dir / "kernels").is_dir() or not (kernels / "__init__.py").is_file():
        return None
    try:
        import tomllib

        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return None
    return kernels if project.get("name") == "fastfit" else None


_kernels = _own_kernels_folder(Path(__file__).resolve().parent)
if _kernels is not None:
    sys.meta_path.append(_SourceCheckoutKernels(_kernels))
