import os

import torch
from hypothesis import settings

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

def smooth_masked_input(batch: int, channels: int, size: int, sigma: float, seed: int,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gaussian-smoothed white noise, unit std, multiplied by the disc mask (band-limited and rotatable)."""
    import rotconv

    return rotconv.smooth_noise(batch, channels, size, sigma, seed, dtype)

