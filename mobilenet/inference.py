"""Using a trained model: a model-only file (architecture, preprocessing, weights), loading it ready for
evaluation, and class probabilities for raw PCam-style patches.

    mobilenet.save(model, "model.pt", normalizer=normalizer)     # ~9 MB; no optimizer state
    model = mobilenet.load("model.pt")                           # eval mode, model.normalizer attached
    probabilities = mobilenet.predict(model, patches)            # uint8 (N, 96, 96, 3) -> (N, 2)

Prediction inputs: uint8 0-255, or float in [0, 1]; anything else is refused with a ValueError. Images
larger than the model's input are centre-cropped; :func:`tile_images` cuts them into tiles instead.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import rotconv

from rotconv.files import atomic_write, check_path
from .model import MobileNetV2, mobilenet_v2
from .data import Normalizer

__all__ = ["save", "load", "predict", "as_images", "tile_images", "MODEL_FORMAT", "CPU_BATCH_SIZE"]

MODEL_FORMAT = "rotconv-mobilenet-v2/1"
#: images per forward pass on a CPU (prediction, validation, test): the fastest measured on 2 cores of an Intel
#: Xeon, about 2x faster than 256 and 1.7x faster than 128 for both PCam models, with a fraction of the memory
#: (larger batches spill the caches; docs/experiments.md). A GPU takes larger batches.
CPU_BATCH_SIZE = 32


def save(model: MobileNetV2, path: str, normalizer: Normalizer | None = None, metadata: dict | None = None) -> None:
    """Write ``model``'s architecture arguments, ``normalizer`` (the input preprocessing; default: the
    ``model.normalizer`` that :func:`load` attaches) and weights to ``path`` atomically. ``metadata`` (plain
    values: numbers, strings, lists, dicts) is stored beside them."""
    if not isinstance(model, MobileNetV2):
        raise ValueError(f"model: expected a mobilenet.MobileNetV2, got {type(model).__name__}")
    if model.group is not None and not any(isinstance(m, rotconv.SteerableConv2d) for m in model.modules()):
        raise ValueError("model: an exported equivariant model cannot be rebuilt from its arguments; save the "
                         "model before export() (load(...).export() gives the plain network again)")
    normalizer = normalizer if normalizer is not None else getattr(model, "normalizer", None)
    if normalizer is not None and not isinstance(normalizer, Normalizer):
        raise ValueError(f"normalizer: expected a mobilenet.Normalizer or None, got {type(normalizer).__name__}")
    content = {
        "format": MODEL_FORMAT,
        "architecture": model.arguments(),
        "normalizer": None if normalizer is None else normalizer.state(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
                       if not name.startswith("normalizer.")},
        "metadata": metadata or {},
    }
    atomic_write(path, lambda handle: torch.save(content, handle))


def load(path: str, device: str | torch.device = "cpu") -> MobileNetV2:
    """The model saved by :func:`save`, on ``device`` in eval mode, with its preprocessing as
    ``model.normalizer`` (a :class:`Normalizer`, or None) and ``model.metadata``. A file that is missing,
    unreadable or of another kind raises ValueError naming ``path``."""
    check_path(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: model file not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        raise ValueError(f"{path}: not a readable model file ({type(error).__name__}); a training checkpoint "
                         "(last.pt) is not a model file: use model.pt beside it") from None
    if not isinstance(content, dict) or content.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a model file written by mobilenet.save (format "
                         f"{content.get('format') if isinstance(content, dict) else type(content).__name__!r})")
    model = mobilenet_v2(**content["architecture"])
    try:
        model.load_state_dict(content["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the stored architecture "
                         f"({str(error).splitlines()[0]})") from None
    normalizer = None if content["normalizer"] is None else Normalizer(**content["normalizer"])
    model.normalizer = normalizer.to(device) if normalizer is not None else None
    model.metadata = content["metadata"]
    return model.to(device).eval()


def _channels_first(images) -> torch.Tensor:
    """``(N, H, W, 3)`` or ``(N, 3, H, W)`` (or one image without N), numpy, tensor, a PIL image or a list of
    them -> ``(N, 3, H, W)``."""
    if not isinstance(images, torch.Tensor):
        images = _as_array(images)
        if not images.flags.writeable:
            images = np.array(images)  # torch cannot share read-only memory (it would warn on every call)
    given = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    batch = given.unsqueeze(0) if given.dim() == 3 else given
    if batch.dim() != 4 or 3 not in (batch.shape[1], batch.shape[-1]):
        raise ValueError(f"images: expected (N, H, W, 3) or (N, 3, H, W), got {tuple(given.shape)}"
                         f"{_shape_hint(tuple(given.shape))}")
    return batch if batch.shape[1] == 3 else batch.permute(0, 3, 1, 2)


def _as_array(images) -> np.ndarray:
    """``images`` (an array-like, a PIL image, or a list of either) as one numeric array; a ValueError naming
    ``images`` for a list of differently shaped images or anything that is not numbers."""
    if isinstance(images, (list, tuple)) and images:
        # one at a time: a PIL image inside a list is not a sequence to numpy (older numpy warns on it)
        items = [np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item) for item in images]
        for index, (item, array) in enumerate(zip(images, items)):
            if array.dtype.kind not in "biuf":
                raise ValueError(f"images: item {index}: expected numbers (uint8 pixels or floats in [0, 1]), got "
                                 f"{type(item).__name__}")
        shapes = list(dict.fromkeys(item.shape for item in items))
        if len(shapes) > 1:
            raise ValueError(f"images: a list of images of different shapes {', '.join(map(str, shapes[:4]))}; "
                             "crop or tile them to one size first (mobilenet.tile_images)")
        array = np.stack(items)
    else:
        array = np.asarray(images)  # also a PIL image
    if array.dtype.kind not in "biuf":
        raise ValueError(f"images: expected numbers (uint8 pixels or floats in [0, 1]), got "
                         f"{type(images).__name__}{f' of {array.dtype}' if isinstance(images, np.ndarray) else ''}")
    return array


def _shape_hint(shape: tuple) -> str:
    """What an image array of ``shape`` probably is, when it is not RGB, and how to make it RGB."""
    if len(shape) in (3, 4) and shape[-1] == 4:
        return ": RGBA? drop the alpha channel (images[..., :3])"
    if len(shape) == 2 or (len(shape) == 4 and shape[-1] == 1):
        return f": a grayscale {'image' if len(shape) == 2 else 'batch'}? the models take RGB (3 channels)"
    if len(shape) == 3 and shape[-1] not in (1, 3):
        return ": a grayscale batch? the models take RGB (3 channels)"
    return ""


def as_images(images, input_size: int, normalised: bool = False) -> torch.Tensor:
    """Images as the model's input batch ``(N, 3, s, s)``, ``s = input_size``: uint8 kept, float in ``[0, 1]``
    scaled to ``[0, 255]`` (float), or (``normalised=True``) float taken as already normalised.

    ``images``: ``(N, H, W, 3)`` or ``(N, 3, H, W)`` (a single image without N too), numpy or tensor.
    Larger images are **centre-cropped** to ``s x s`` (PCam's 96x96 patches lose their last row and column,
    as in training); for a probability map of a larger image use :func:`tile_images`. Other dtypes (16-bit,
    integers, bool) and floats outside ``[0, 1]`` raise ValueError: 0-255 pixels must come as uint8."""
    batch = _channels_first(images)
    if batch.shape[-2] < input_size or batch.shape[-1] < input_size:
        raise ValueError(f"images: expected at least {input_size}x{input_size} pixels, got "
                         f"{batch.shape[-2]}x{batch.shape[-1]}")
    top, left = (batch.shape[-2] - input_size) // 2, (batch.shape[-1] - input_size) // 2
    batch = batch[:, :, top:top + input_size, left:left + input_size]
    if batch.dtype == torch.uint8 or (normalised and batch.is_floating_point()):
        return batch
    if not batch.is_floating_point():
        raise ValueError(f"images: expected uint8 (0-255) or float in [0, 1], got {batch.dtype}; scale other bit "
                         "depths to 8 bits first")
    if batch.numel():
        low, high = float(batch.min()), float(batch.max())
        if not (math.isfinite(low) and math.isfinite(high)):  # min and max are NaN where any value is
            raise ValueError("images: contain NaN or infinite values")
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"images: float images must lie in [0, 1], got values from {low:.4g} to {high:.4g} "
                             "(0-255 pixels: pass them as uint8)")
    return batch.float() * 255


def tile_images(images, input_size: int, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``input_size x input_size`` tile of each image, row by row with step ``stride`` (default
    ``input_size``: no overlap; a border narrower than a tile is left out): ``(tiles, positions)`` with
    positions ``(T, 3)`` = (image, top, left). ``images``: ``(N, H, W, 3)`` or ``(N, 3, H, W)``, any dtype
    :func:`predict` takes; each image at least one tile."""
    stride = input_size if stride is None else rotconv.check_positive_int(stride, "stride")
    batch = _channels_first(images)
    height, width = batch.shape[-2:]
    if height < input_size or width < input_size:
        raise ValueError(f"images: expected at least {input_size}x{input_size} pixels, got {height}x{width}")
    tops, lefts = range(0, height - input_size + 1, stride), range(0, width - input_size + 1, stride)
    tiles = [batch[:, :, top:top + input_size, left:left + input_size] for top in tops for left in lefts]
    positions = torch.tensor([(image, top, left) for image in range(batch.shape[0]) for top in tops for left in lefts])
    return torch.stack(tiles, 1).flatten(0, 1), positions


def _input_size(model: nn.Module, input_size: int | None) -> int:
    """``input_size`` where given, else the model's: ``model.input_size`` (MobileNetV2, quant's INT8 models
    made from one) or the square spatial size of ``model.input_shape`` (quant's ExecuTorch and ONNX modules
    read it from their file)."""
    if input_size is not None:
        return rotconv.check_positive_int(input_size, "input_size")
    size = getattr(model, "input_size", None)
    shape = getattr(model, "input_shape", None)
    if size is None and isinstance(shape, (tuple, list)) and len(shape) == 4 and isinstance(shape[-1], int) \
            and shape[-1] == shape[-2]:
        size = shape[-1]
    if size is None:
        raise ValueError(f"input_size: the model ({type(model).__name__}) does not say its input size (no "
                         "input_size or square input_shape); pass input_size= (95 for the PCam models)")
    return int(size)


def _device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (its first parameter or buffer); the CPU for a model without any (a
    runtime's program)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = CPU_BATCH_SIZE, *, normalizer: Callable | None = None,
            input_size: int | None = None) -> torch.Tensor:
    """Class probabilities ``(N, num_classes)`` of ``images``: uint8 (0-255) or float in ``[0, 1]``,
    ``(N, H, W, 3)`` as in the PCam HDF5 files or ``(N, 3, H, W)`` (a PIL image, or a list of them, too);
    centre-cropped to the model's input (:func:`as_images`), normalised, softmax of the logits. An
    ``h5py.Dataset`` or a memory-mapped array (a whole PCam split) is read ``batch_size`` images at a time,
    never whole.

    ``model``: a :class:`MobileNetV2` (:func:`load`, :func:`mobilenet.pretrained`) or any classifier of
    normalised float ``(B, 3, s, s)`` batches, such as quant's INT8 models (``quant.dfq(model.export(),
    mode="int8")``, ``quant.load_executorch``, ``quant.load_onnx``, ``quant.load_int8``). ``normalizer``: the
    input preprocessing, default ``model.normalizer`` (:func:`load` attaches it, ``export()`` and
    ``quant.dfq`` keep it; for a program file pass ``load("model.pt").normalizer``); without one the images
    must already be float and normalised. ``input_size``: default ``model.input_size``, or the square size of
    the ``input_shape`` an ExecuTorch or ONNX module reads from its file.

    ``batch_size``: images per forward (:data:`CPU_BATCH_SIZE`, the fastest on 2 Xeon cores: 1,024 patches in
    4.9 s against 11.8 s at 256 for the C_12 model, with a fifth of the memory); a GPU takes more.

    The model runs in eval mode and is left in the mode it came in (predicting during training is safe).
    On the CPU a float torch model gets its batches as channels_last (the model itself is left as it is):
    oneDNN then runs the whole network in that layout, 1.23-1.32x faster than contiguous inputs (2 cores,
    batch 64, both models); the logits differ from a contiguous forward only by float rounding (~1e-5
    relative)."""
    batch_size = rotconv.check_positive_int(batch_size, "batch_size")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a MobileNetV2 or an INT8 model of quant), got "
                         f"{type(model).__name__}")
    size = _input_size(model, input_size)
    normalizer = normalizer if normalizer is not None else getattr(model, "normalizer", None)
    if normalizer is not None and not callable(normalizer):
        raise ValueError(f"normalizer: expected a callable such as mobilenet.Normalizer, got "
                         f"{type(normalizer).__name__}")
    device = _device(model)
    if isinstance(normalizer, nn.Module) and _device(normalizer) != device:
        normalizer = copy.deepcopy(normalizer).to(device)  # the caller's normaliser stays where it is
    channels_last = device.type == "cpu" and any(p.is_floating_point() for p in model.parameters())
    outputs = []
    with rotconv.eval_mode(model):  # batch norm on its running statistics; the caller's mode is given back
        for part in _parts(images, batch_size):
            batch = as_images(part, size, normalised=normalizer is None)
            if normalizer is None and not batch.is_floating_point():
                raise ValueError("images: uint8 images need the model's normalizer (load the model with "
                                 "mobilenet.load, pass normalizer= (mobilenet.load('model.pt').normalizer for "
                                 "its INT8 program), or pass float images normalised as in training)")
            for start in range(0, batch.shape[0], batch_size):
                chunk = batch[start:start + batch_size].to(device)
                inputs = normalizer(chunk) if normalizer is not None else chunk.float()
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                outputs.append(torch.softmax(model(inputs).float(), dim=1).cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, getattr(model, "num_classes", None) or 0)


def _parts(images, batch_size: int):
    """``images`` in reads of ``batch_size``: a 4-D array-like that is not in memory as a whole (an
    ``h5py.Dataset``, a memory-mapped array) is sliced batch by batch, so it is never read whole; anything
    else (a tensor, an array, a list, one image) comes as one part."""
    in_memory = isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray)
                                                      and not isinstance(images, np.memmap))
    if in_memory or getattr(images, "ndim", None) != 4 or not hasattr(images, "__getitem__") or len(images) == 0:
        yield images
        return
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]
