"""Teachers and students by name: torchvision classifiers and fastfit's small CNNs, with weights by torchvision
name or local file. A new small model goes in small_cnns.py (registered in SMALL_MODELS)."""

from fastfit.models.build import available_models, build_model, load_weights

__all__ = ["available_models", "build_model", "load_weights"]
