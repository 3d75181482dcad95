"""fastfit: FitNets knowledge distillation — hint losses through regressors plus temperature KD."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceCheckoutKernels(importlib.abc.MetaPathFinder):
    """Maps fastfit.kernels onto the top-level kernels/ folder of a source checkout used without installing
    (PYTHONPATH=.); an installed fastfit (wheel or editable) has its own mapping and never reaches this finder."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != "fastfit.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


_kernels = Path(__file__).resolve().parent.parent / "kernels"
if not (Path(__file__).resolve().parent / "kernels").is_dir() and (_kernels / "__init__.py").is_file():
    sys.meta_path.append(_SourceCheckoutKernels(_kernels))
