"""`fastfit study fmnist`: a multi-seed Fashion-MNIST study of FitNets against fair baselines (see runner.py)."""
