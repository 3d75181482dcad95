"""fastfit: FitNets knowledge distillation — hint losses through regressors plus temperature KD."""

__version__ = "0.1.0"
