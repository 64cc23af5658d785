"""Band-limited steerable filter bases on odd k x k grids (numpy/scipy only).

A basis function is a circular harmonic times a Gaussian radial ring::

    psi_{j,m,c}(rho, phi) = exp(-(rho - r_j)^2 / (2 sigma_j^2)) * cos(m phi)
    psi_{j,m,s}(rho, phi) = exp(-(rho - r_j)^2 / (2 sigma_j^2)) * sin(m phi)

for rings ``j`` at radii ``r_j`` and frequencies ``0 <= m <= max_frequency(r_j)`` (band limit growing with
the ring radius; the ring at the origin carries only m = 0, since harmonics with m > 0 are undefined and set
to zero there). Each function is integrated over the pixel (``supersample`` x ``supersample`` points per
pixel), then a cos/sin pair is normalised jointly (one factor for both), so that rotating a filter
``sum_b w_b psi_b`` by any angle ``theta`` is exactly the linear map ``w -> R(theta) w`` with
``R(theta)`` block-diagonal 2x2 rotations by ``m*theta``. Because the square grid (and square pixel
integration) is invariant under 90-degree rotations, rotating by 90 degrees in coefficient space equals
``torch.rot90`` of the sampled filter to float precision.

Coordinates: x to the right, y up (row index decreasing), angles counter-clockwise as displayed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .validation import check_int, check_positive_int

__all__ = [
    "SteerableBasis",
    "steerable_basis",
    "clear_cache",
    "default_rings",
    "default_sigmas",
    "default_max_frequency",
]

#: Frequency cutoff factor: an inner ring of radius r carries harmonics m <= floor(DEFAULT_FREQUENCY_FACTOR * r);
#: the outermost ring, which the square support truncates at the corners and samples most sparsely relative
#: to its width, carries one frequency less (at least 1). A ring of radius r passes through about 2*pi*r
#: pixels (Nyquist ~pi*r), but a filter's error under rotation also depends on how well the ring is resolved
#: radially: measured on the e2cnn test net (docs/theory.md), cutoffs 2*r raise the 30-degree error of a
#: C_12 k5/k5/k3 stack from 3.9% to 5.2-7% (smoothing 1 px) and from 2.4% to 2.9-3.8% (2 px).
DEFAULT_FREQUENCY_FACTOR = 1.0
#: Width of the Gaussian profile of the rings between the centre and the outermost ring (pixels).
DEFAULT_RING_SIGMA = 0.6
#: The outermost ring is narrower, so the filter does not leak into the corners of the square support.
DEFAULT_OUTER_SIGMA = 0.4
#: The ring at the origin is (nearly) a delta on the centre pixel.
DEFAULT_CENTRE_SIGMA = 0.005
#: Points per pixel side used to integrate each basis function over the pixel.
DEFAULT_SUPERSAMPLE = 1


def default_rings(kernel_size: int) -> tuple[float, ...]:
    """Ring radii 0, 1, ..., (k-1)/2 (one ring per pixel of radius)."""
    return tuple(float(r) for r in range((kernel_size - 1) // 2 + 1))


def default_sigmas(rings: Sequence[float]) -> tuple[float, ...]:
    """Near-delta centre, ``DEFAULT_RING_SIGMA`` in between, narrower ``DEFAULT_OUTER_SIGMA`` outermost."""
    outer = max(rings)
    sigmas = []
    for r in rings:
        if r == 0.0:
            sigmas.append(DEFAULT_CENTRE_SIGMA)
        elif r == outer:
            sigmas.append(DEFAULT_OUTER_SIGMA)
        else:
            sigmas.append(DEFAULT_RING_SIGMA)
    return tuple(sigmas)


def default_max_frequency(radius: float, outermost: bool = False) -> int:
    """Band limit of a ring: ``floor(DEFAULT_FREQUENCY_FACTOR * radius)``, one less (but at least 1) for the
    outermost ring, 0 at the origin. Kernel 3: (0, 1); kernel 5: (0, 1, 1); kernel 7: (0, 1, 2, 2)."""
    if radius == 0:
        return 0
    cutoff = int(math.floor(DEFAULT_FREQUENCY_FACTOR * radius + 1e-9))
    return max(1, cutoff - 1) if outermost else cutoff


@dataclass(frozen=True, eq=False)
class SteerableBasis:
    """A sampled steerable basis.

    Attributes:
        kernel_size: odd k.
        functions: ``(B, k, k)`` float64 array, the sampled, normalised basis functions; row 0 is the top.
        rings: ring index of each function, ``(B,)``.
        frequencies: harmonic frequency m of each function, ``(B,)``.
        parities: 0 for cos, 1 for sin, ``(B,)``. A sin function directly follows its cos partner.
    """

    kernel_size: int
    functions: np.ndarray
    rings: np.ndarray
    frequencies: np.ndarray
    parities: np.ndarray
    radii: tuple[float, ...]
    sigmas: tuple[float, ...]

    @property
    def size(self) -> int:
        """B, the number of basis functions."""
        return int(self.functions.shape[0])

    def __len__(self) -> int:
        return self.size

    def rotation_matrix(self, angle: float) -> np.ndarray:
        """``(B, B)`` matrix R with: rotating ``sum_b w_b psi_b`` by ``angle`` gives ``sum_b (R w)_b psi_b``."""
        matrix = np.zeros((self.size, self.size))
        index = 0
        while index < self.size:
            m = int(self.frequencies[index])
            if m == 0:
                matrix[index, index] = 1.0
                index += 1
                continue
            c, s = math.cos(m * angle), math.sin(m * angle)
            matrix[index : index + 2, index : index + 2] = [[c, -s], [s, c]]
            index += 2
        return matrix

    def rotated(self, angle: float) -> np.ndarray:
        """``(B, k, k)``: the basis functions rotated by ``angle`` (exact, by coefficient rotation)."""
        matrix = self.rotation_matrix(angle)
        return np.einsum("bc,bxy->cxy", matrix, self.functions)


def _sample_points(kernel_size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample coordinates, shape ``(k, k, s*s)`` each for x (right) and y (up)."""
    half = (kernel_size - 1) / 2
    centres = np.arange(kernel_size) - half
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    cols = centres[:, None] + offsets[None, :]  # (k, s)
    xs = np.broadcast_to(cols[None, :, None, :], (kernel_size, kernel_size, supersample, supersample))
    ys = np.broadcast_to(-cols[:, None, :, None], (kernel_size, kernel_size, supersample, supersample))
    shape = (kernel_size, kernel_size, supersample * supersample)
    return xs.reshape(shape), ys.reshape(shape)


@functools.lru_cache(maxsize=128)
def _build(
    kernel_size: int,
    radii: tuple[float, ...],
    sigmas: tuple[float, ...],
    max_frequencies: tuple[int, ...],
    supersample: int,
) -> SteerableBasis:
    xs, ys = _sample_points(kernel_size, supersample)
    rho = np.hypot(xs, ys)
    phi = np.arctan2(ys, xs)
    at_origin = rho < 1e-12
    functions, rings, freqs, parities = [], [], [], []
    for ring, (radius, sigma, max_m) in enumerate(zip(radii, sigmas, max_frequencies)):
        profile = np.exp(-((rho - radius) ** 2) / (2.0 * sigma**2))
        for m in range(max_m + 1):
            if m == 0:
                f = profile.mean(axis=-1)
                norm = np.linalg.norm(f)
                if norm < 1e-8:
                    continue
                functions.append(f / norm)
                rings.append(ring), freqs.append(0), parities.append(0)
                continue
            harmonic_cos = np.where(at_origin, 0.0, np.cos(m * phi))
            harmonic_sin = np.where(at_origin, 0.0, np.sin(m * phi))
            fc = (profile * harmonic_cos).mean(axis=-1)
            fs = (profile * harmonic_sin).mean(axis=-1)
            norm = math.sqrt((np.sum(fc**2) + np.sum(fs**2)) / 2.0)
            if norm < 1e-8:
                continue
            functions += [fc / norm, fs / norm]
            rings += [ring, ring]
            freqs += [m, m]
            parities += [0, 1]
    return SteerableBasis(
        kernel_size=kernel_size,
        functions=np.stack(functions),
        rings=np.asarray(rings),
        frequencies=np.asarray(freqs),
        parities=np.asarray(parities),
        radii=radii,
        sigmas=sigmas,
    )


def steerable_basis(
    kernel_size: int,
    rings: Sequence[float] | None = None,
    sigma: Sequence[float] | float | None = None,
    max_frequency: Callable[[float], int] | Sequence[int] | None = None,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> SteerableBasis:
    """Build (or fetch from cache) the steerable basis for an odd ``kernel_size``.

    Args:
        kernel_size: odd k >= 1.
        rings: ring radii in pixels; default 0, 1, ..., (k-1)/2.
        sigma: Gaussian width of each ring (a float for all rings); default :func:`default_sigmas`.
        max_frequency: band limit per ring, a callable ``radius -> m_max`` or one int per ring; default
            :func:`default_max_frequency` (which treats the outermost ring specially). Rings at the origin
            always carry only m = 0.
        supersample: points per pixel side for integrating the functions over each pixel.
    Returns:
        :class:`SteerableBasis`; identical arguments return the same (cached) object.
    """
    kernel_size = check_int(kernel_size, "kernel_size", minimum=1, odd=True)  # steerable bases need a centre pixel
    supersample = check_positive_int(supersample, "supersample")
    radii = default_rings(kernel_size) if rings is None else tuple(float(r) for r in rings)
    if len(radii) == 0 or any(r < 0 for r in radii):
        raise ValueError(f"rings: expected non-negative radii, got {rings!r}")
    if sigma is None:
        sigmas = default_sigmas(radii)
    elif isinstance(sigma, (int, float)):
        sigmas = tuple(float(sigma) for _ in radii)
    else:
        sigmas = tuple(float(s) for s in sigma)
    if len(sigmas) != len(radii) or any(s <= 0 for s in sigmas):
        raise ValueError(f"sigma: expected one positive width per ring ({len(radii)}), got {sigma!r}")
    if max_frequency is None:
        outer = max(radii)
        cutoffs = tuple(default_max_frequency(r, outermost=(r == outer)) for r in radii)
    elif callable(max_frequency):
        cutoffs = tuple(int(max_frequency(r)) for r in radii)
    else:
        cutoffs = tuple(int(m) for m in max_frequency)
    if len(cutoffs) != len(radii) or any(m < 0 for m in cutoffs):
        raise ValueError(f"max_frequency: expected one non-negative cutoff per ring, got {max_frequency!r}")
    cutoffs = tuple(0 if r == 0.0 else m for r, m in zip(radii, cutoffs))
    return _build(kernel_size, radii, sigmas, cutoffs, supersample)


@functools.lru_cache(maxsize=128)
def _group_basis(basis: SteerableBasis, N: int) -> torch.Tensor:
    quarter = N // 4 if N % 4 == 0 else N
    rotated = [basis.rotated(2.0 * math.pi * i / N) for i in range(quarter)]
    return torch.from_numpy(np.stack(rotated)).to(torch.float32)


def group_basis(basis: SteerableBasis, N: int) -> torch.Tensor:
    """Rotated copies of the basis for the elements of C_N that must be computed by interpolation.

    Returns ``(Q, B, k, k)`` float32 with ``Q = N/4`` when 4 divides N (the other elements follow by exact
    ``torch.rot90``), else ``Q = N``. Cached per (basis, N); do not modify the result in place.
    """
    return _group_basis(basis, N)


def clear_cache() -> None:
    """Forget every cached basis and rotated basis (the next layer builds its basis anew, e.g. to time it)."""
    _build.cache_clear()
    _group_basis.cache_clear()
