"""Per-channel normalisation of uint8 RGB batches, fitted on a data set: the first layer of every PCam model's
input pipeline, stored with the model (:func:`mobilenet.save`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

__all__ = ["Normalizer"]


class Normalizer(nn.Module):
    """Per-channel ``(x / 255 - mean) / std``: uint8 ``(B, 3, H, W)`` or ``(3, H, W)`` -> float32.

    A module (mean and std are buffers), so it can lead an ``nn.Sequential`` and travels with ``.to()``.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean/std: expected 3 values each, std > 0; got {mean!r}, {std!r}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1))

    @classmethod
    def fit(cls, dataset: torch.utils.data.Dataset, samples: int = 1024, seed: int = 0) -> "Normalizer":
        """Mean and std of up to ``samples`` images of ``dataset``: uint8 ``(3, H, W)`` items (``read`` is used
        where it has one). Float images and ``(H, W, 3)`` items raise ValueError (they would fit garbage)."""
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(len(dataset), min(samples, len(dataset)), replace=False))
        if hasattr(dataset, "read"):
            images = dataset.read(positions)
        else:
            images = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in positions])
        if images.dtype != torch.uint8:
            raise ValueError(f"dataset: Normalizer.fit expects uint8 images (0-255), got {images.dtype}; float "
                             "images in [0, 1] (e.g. torchvision's ToTensor) are already scaled: normalise them "
                             "with their own mean and std, or keep the images uint8")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"dataset: Normalizer.fit expects (3, H, W) images, got {tuple(images.shape[1:])}"
                             f"{' (channels last: permute(2, 0, 1) each item)' if images.shape[-1] == 3 else ''}")
        pixels = images.float().div_(255).transpose(0, 1).reshape(3, -1)
        return cls(pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255 - self.mean) / self.std

    def extra_repr(self) -> str:
        mean, std = ([round(v, 4) for v in t.flatten().tolist()] for t in (self.mean, self.std))
        return f"mean={mean}, std={std}"

    def value_range(self) -> tuple[float, float]:
        """The range of normalised values (what a data-free quantizer needs for the network input)."""
        low, high = -self.mean / self.std, (1 - self.mean) / self.std
        return float(low.min()), float(high.max())

    def state(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
