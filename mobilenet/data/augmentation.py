"""Training augmentation of uint8 RGB batches: the dihedral group D4 (exact on the pixel grid) and H&E stain
jitter (a per-pixel colour map, so it commutes with rotations and flips)."""
from __future__ import annotations

import torch

__all__ = ["augment_batch", "stain_jitter"]


def augment_batch(batch: torch.Tensor, quarter_turns: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Rotate sample ``i`` by ``quarter_turns[i]`` x 90 degrees and flip it left-right where ``flips[i]``:
    the dihedral group D4, exact on the pixel grid. ``(B, C, H, W)`` -> same."""
    out = batch.clone()
    for turns in range(1, 4):
        chosen = quarter_turns == turns
        if chosen.any():
            out[chosen] = torch.rot90(batch[chosen], turns, dims=(-2, -1))
    flipped = flips.bool()
    if flipped.any():
        out[flipped] = torch.flip(out[flipped], dims=(-1,))
    return out


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical-density space, normalised
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(batch: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """H&E stain augmentation (Tellez et al. 2018): each pixel's optical density ``-ln(rgb / 255)`` is split
    into haematoxylin, eosin and DAB amounts (Ruifrok & Johnston's stain vectors), sample ``i``'s amount of
    stain ``s`` becomes ``amount * scales[i, s] + shifts[i, s]`` (shifts in optical-density units, natural log),
    and the result is mapped back to uint8 RGB. A per-pixel colour map: it commutes with rotations and flips,
    so it leaves every equivariance property of the models alone.

    ``batch``: ``(B, 3, H, W)`` uint8 RGB; ``scales``, ``shifts``: ``(B, 3)``. Returns uint8, same shape."""
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"batch: stain_jitter expects (B, 3, H, W) uint8 RGB, got "
                         f"{tuple(batch.shape)} {batch.dtype}")
    if scales.shape != (batch.shape[0], 3) or shifts.shape != (batch.shape[0], 3):
        raise ValueError(f"scales, shifts: expected ({batch.shape[0]}, 3) each, got {tuple(scales.shape)} and "
                         f"{tuple(shifts.shape)}")
    density = -torch.log(batch.float().clamp(min=1.0) / 255.0)  # 0 counts as 1: finite density
    stains = torch.einsum("bchw,cs->bshw", density, _HED_FROM_RGB.float())
    stains = stains * scales.float()[:, :, None, None] + shifts.float()[:, :, None, None]
    density = torch.einsum("bshw,sc->bchw", stains, _RGB_FROM_HED.float())
    return (torch.exp(-density) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
