"""Test data for the input pipelines: constant-colour images whose colour encodes an identity k, so a sample can
be recognised after any crop, resize, flip or normalization (its centre pixel still reads back k)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def identity_colour(k: int) -> tuple[int, int, int]:
    return (8 + 6 * (k % 40), 8 + 6 * (k // 40), 128)


def identities(images: torch.Tensor) -> list[int]:
    """The k of each constant image, read back from its centre pixel after normalization with MEAN/STD."""
    centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2].double()
    raw = (centre * torch.tensor(STD, dtype=torch.float64) + torch.tensor(MEAN, dtype=torch.float64)) * 255
    return [int(round((r - 8) / 6)) + 40 * int(round((g - 8) / 6)) for r, g, _ in raw.tolist()]


def constant_split(root: Path, split: str, counts: dict[str, int]) -> dict[str, int]:
    """Constant-colour PNGs of assorted sizes (k in ImageFolder listing order) in root/split/<class>/; path → k."""
    paths, k = {}, 0
    for name in sorted(counts):
        (root / split / name).mkdir(parents=True)
        for i in range(counts[name]):
            path = root / split / name / f"{i:03d}.png"
            Image.fromarray(np.full((12 + i % 5, 14 + i % 3, 3), identity_colour(k), np.uint8)).save(path)
            paths[str(path)] = k
            k += 1
    return paths
