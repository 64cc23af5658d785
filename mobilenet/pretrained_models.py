"""Models trained on real PatchCamelyon patches, shipped with the package and loaded by name.

    mobilenet.list_pretrained()                  # ['pcam-c12', 'pcam-conventional']
    model = mobilenet.pretrained("pcam-c12")     # eval mode, normaliser attached, as mobilenet.load gives
    mobilenet.predict(model, patches)            # uint8 (N, 96, 96, 3) -> (N, 2) probabilities

Each is the seed-0 run of its configuration, trained on 20,000 real PCam patches (4,800 steps of the default
recipe, selected on 3,000 validation patches); test accuracy on 1,000 PCam test patches (FP32 / INT8 .pte):

    pcam-c12           C_12, min_fields=8, width_mult=0.8,  shipped seed 84.5 / 84.3  seeds 0-4 84.06±1.22 / 84.02±1.08
                       antialias=True (291.5 M MACs)
    pcam-conventional  conventional MobileNetV2 (277.7 M)   shipped seed 80.7 / 80.0  seeds 0-4 81.86±0.76 / 81.72±1.30

``model.metadata`` holds the same (``"test_accuracy"``, ``"test_accuracy_over_seeds"``) with the recipe. They
are research models, trained on 20,000 patches of a public data set: **not** diagnostic devices.
The weights are stored in float16 (half the size; validation predictions checked against the float32 weights
when the files were made) and load as float32.
"""
from __future__ import annotations

import os

import torch

from rotconv.files import atomic_write

from .inference import load, save
from .model import MobileNetV2

__all__ = ["list_pretrained", "pretrained", "load_or_pretrained", "save_pretrained", "WEIGHTS_DIRECTORY"]

#: where the shipped weight files are (``<name>.pt``)
WEIGHTS_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def list_pretrained() -> list[str]:
    """The names :func:`pretrained` takes, sorted."""
    if not os.path.isdir(WEIGHTS_DIRECTORY):
        return []
    return sorted(name[:-3] for name in os.listdir(WEIGHTS_DIRECTORY) if name.endswith(".pt"))


def pretrained(name: str, device: str | torch.device = "cpu") -> MobileNetV2:
    """The shipped model ``name`` (one of :func:`list_pretrained`) on ``device``, in eval mode, with
    ``model.normalizer`` and ``model.metadata`` (training data, recipe, test accuracy). ValueError for an
    unknown name."""
    names = list_pretrained()
    if name not in names:
        raise ValueError(f"name: expected one of {names}, got {name!r}")
    return load(os.path.join(WEIGHTS_DIRECTORY, f"{name}.pt"), device)


def load_or_pretrained(model: str, device: str | torch.device = "cpu") -> MobileNetV2:
    """The model file ``model`` (as :func:`~mobilenet.load`), or, where no such file exists, the shipped model of
    that name. ValueError naming ``model`` (and the shipped names) when it is neither."""
    if not os.path.exists(model) and model in list_pretrained():
        return pretrained(model, device)
    if not os.path.exists(model) and os.sep not in model and not model.endswith(".pt"):
        raise ValueError(f"{model}: neither a model file nor a shipped model "
                         f"(shipped: {', '.join(list_pretrained())})")
    return load(model, device)


def save_pretrained(model: MobileNetV2, path: str, metadata: dict) -> None:
    """Write ``model`` (with its ``normalizer``) as a shippable file: float weights stored as float16."""
    save(model, path, metadata=metadata)
    content = torch.load(path, map_location="cpu", weights_only=True)
    content["state_dict"] = {key: value.half() if value.is_floating_point() else value
                             for key, value in content["state_dict"].items()}
    atomic_write(path, lambda handle: torch.save(content, handle))
