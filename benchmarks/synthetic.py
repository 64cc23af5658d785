"""A seeded, procedurally generated PCam-like data set in the official HDF5 layout (SYNTHETIC, not tissue).

Each 96x96 RGB patch is H&E-coloured: eosin-pink stroma with fibrous texture at a random orientation, and
haematoxylin-purple nuclei (ellipses of random orientation). Label 1 ("tumour") puts clusters of large,
dark, irregular, crowded nuclei with nucleoli inside the central disc of radius 16 px (the central 32x32 of
PCam, made round so that the label is invariant to rotations by any angle); label 0 patches have normal
nuclei there, and may have tumour-like cells outside a radius of 24 px (as PCam: only the centre counts).
Written as ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` so that every code path that reads
real PCam reads it too.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import h5py
import numpy as np
from scipy import ndimage

from rotconv.files import atomic_write
from mobilenet.data import SPLITS, split_paths

__all__ = ["generate_patch", "write_synthetic_pcam", "DEFAULT_SIZES"]

DEFAULT_SIZES = {"train": 768, "valid": 256, "test": 512}  # the quick profile's; larger profiles add more
SIZE = 96
_CENTRE = (SIZE - 1) / 2
_EOSIN = np.array([0.93, 0.62, 0.78])        # stroma / cytoplasm
_HAEMATOXYLIN = np.array([0.33, 0.20, 0.52])  # nuclei
_BACKGROUND = np.array([0.97, 0.94, 0.96])   # empty glass


def _add_nucleus(density: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float,
                 elongation: float, darkness: float, irregular: bool) -> None:
    """Paint an ellipse (random orientation) of haematoxylin density into ``density`` (H, W)."""
    half = int(np.ceil(radius * elongation)) + 2
    y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, SIZE)
    x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, SIZE)
    if y0 >= y1 or x0 >= x1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    dy, dx = ys - cy, xs - cx
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / (radius * elongation)
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / radius
    rho = np.sqrt(u**2 + v**2)
    if irregular:  # lobed outline
        theta = np.arctan2(v, u)
        rho = rho * (1 + 0.18 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)))
    inside = np.clip((1.0 - rho) * radius, 0.0, 1.0)  # 1 px anti-aliased edge
    value = darkness * inside
    if irregular:  # a bright-rimmed nucleolus off centre
        ny, nx = cy + rng.normal(0, radius / 4), cx + rng.normal(0, radius / 4)
        value = value + 0.35 * darkness * np.exp(-((ys - ny) ** 2 + (xs - nx) ** 2) / 1.2)
    region = density[y0:y1, x0:x1]
    np.maximum(region, value, out=region)


def _positions(rng: np.random.Generator, count: int, r_min: float, r_max: float) -> np.ndarray:
    radius = np.sqrt(rng.uniform(r_min**2, r_max**2, count))
    angle = rng.uniform(0, 2 * np.pi, count)
    return np.stack([_CENTRE + radius * np.sin(angle), _CENTRE + radius * np.cos(angle)], axis=1)


def generate_patch(rng: np.random.Generator, tumour: bool) -> np.ndarray:
    """One ``(96, 96, 3)`` uint8 patch."""
    # stroma: anisotropic smoothed noise (fibres) at a random orientation, with some empty glass
    big = SIZE * 3 // 2  # rotate a larger field and crop, so no seam enters the patch
    noise = ndimage.gaussian_filter(rng.standard_normal((big, big)), (0.8, 4.0))
    margin = (big - SIZE) // 2
    noise = ndimage.rotate(noise, rng.uniform(0, 180), reshape=False)[margin:margin + SIZE, margin:margin + SIZE]
    blobs = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 10)
    glass = np.clip((blobs / (blobs.std() + 1e-9) - rng.uniform(0.8, 2.5)) * 2, 0, 1)
    eosin = np.clip(0.55 + 0.9 * noise / (noise.std() + 1e-9) * 0.25, 0, 1) * (1 - glass)

    nuclei = np.zeros((SIZE, SIZE))
    cellularity = rng.uniform(0.3, 1.0)  # sparse stroma ... dense lymphoid tissue
    everywhere = _positions(rng, int(cellularity * rng.integers(40, 140)), 0, SIZE * 0.75)
    for cy, cx in everywhere:  # normal nuclei: small, round or spindle-shaped, moderately dark
        _add_nucleus(nuclei, rng, cy, cx, rng.uniform(1.6, 3.4), rng.uniform(1.0, 2.2), rng.uniform(0.5, 0.9), False)
    if tumour:
        count, r_min, r_max = rng.integers(2, 9), 0.0, 16.0
    elif rng.random() < 0.4:  # tumour cells outside the centre do not count
        count, r_min, r_max = rng.integers(3, 12), 24.0, SIZE * 0.7
    else:
        count = 0
    centre = _positions(rng, count, r_min, r_max) if count else np.zeros((0, 2))
    if tumour:  # crowded: a cluster around one point
        centre = centre[:1] + 0.6 * (centre - centre[:1])
    for cy, cx in centre:
        _add_nucleus(nuclei, rng, cy, cx, rng.uniform(2.8, 4.6), rng.uniform(1.0, 1.9), rng.uniform(0.65, 1.0), True)

    stain = (_BACKGROUND[None, None] * (1 - eosin[..., None]) + _EOSIN[None, None] * eosin[..., None])
    nuclei = np.clip(nuclei, 0, 1)[..., None]
    image = stain * (1 - nuclei) + _HAEMATOXYLIN[None, None] * nuclei
    image = ndimage.gaussian_filter(image, (0.6, 0.6, 0))  # optics
    image = image * rng.uniform(0.9, 1.05, 3)[None, None] + rng.normal(0, 0.02, image.shape)  # stain, sensor
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_atomically(path: str, name: str, data: np.ndarray) -> None:
    def write(handle) -> None:
        with h5py.File(handle, "w") as out:
            out.create_dataset(name, data=data, chunks=(min(64, data.shape[0]),) + data.shape[1:])

    atomic_write(path, write)


_CHUNK = 128


def _generate_chunk(job: tuple) -> np.ndarray:
    """Patches ``start ..`` of a split, each from its own generator seeded by (seed, split, index)."""
    seed, split_number, start, labels = job
    return np.stack([generate_patch(np.random.default_rng([seed, split_number, start + offset]), bool(label))
                     for offset, label in enumerate(labels)])


def write_synthetic_pcam(directory: str, sizes: dict[str, int] | None = None, seed: int = 0,
                         progress=None) -> str:
    """Write a balanced synthetic PCam to ``directory`` (created if needed) and return it.

    ``sizes`` maps split -> patch count (default :data:`DEFAULT_SIZES`). Deterministic for a given seed (each
    patch has its own seeded generator, so the patches are the same however many worker processes make them:
    one per core); files already there with the right sizes are kept (so a cache directory is reused).
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    os.makedirs(directory, exist_ok=True)
    for split_number, split in enumerate(SPLITS):
        x_path, y_path = split_paths(directory, split)
        count = sizes[split]
        if os.path.exists(x_path) and os.path.exists(y_path):
            try:
                with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
                    if fx["x"].shape[0] == count and fy["y"].shape[0] == count:
                        continue
            except (OSError, KeyError):
                pass
        rng = np.random.default_rng([seed, split_number])
        labels = rng.permutation(np.arange(count) % 2).astype(np.uint8)
        images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
        starts = range(0, count, _CHUNK)
        jobs = [(seed, split_number, start, labels[start:start + _CHUNK]) for start in starts]
        workers = min(os.cpu_count() or 1, len(jobs))
        if workers > 1:  # every patch has its own seeded generator: the same data with any number of workers
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunks = pool.map(_generate_chunk, jobs)
                for start, chunk in zip(starts, chunks):
                    images[start:start + len(chunk)] = chunk
                    if progress is not None:
                        progress(split, start + len(chunk), count)
        else:
            for job in jobs:
                images[job[2]:job[2] + len(job[3])] = _generate_chunk(job)
                if progress is not None:
                    progress(split, job[2] + len(job[3]), count)
        _write_atomically(y_path, "y", labels.reshape(-1, 1, 1, 1))
        _write_atomically(x_path, "x", images)
    return directory
