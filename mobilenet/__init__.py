"""Conventional and C_N-equivariant MobileNetV2 for 95x95 PatchCamelyon patches, with what it takes to train
and use them: the PCam dataset (:mod:`mobilenet.pcam`), a trainer for any classifier and dataset
(:mod:`mobilenet.training`), model files and prediction (:mod:`mobilenet.inference`), freed-memory reuse for CPU
processes
(:mod:`mobilenet.memory`)."""
from rotconv.summary import ModelSummary, summary

from .inference import as_images, load, predict, save, tile_images
from .memory import reuse_freed_memory
from .model import INVERTED_RESIDUAL_SETTING, MobileNetV2, mobilenet_v2
from .pcam import PCam, PCamError, Normalizer
from .pretrained_models import list_pretrained, pretrained
from .training import DivergedError, TrainConfig, UsageError, evaluate_loss, train

__all__ = ["mobilenet_v2", "MobileNetV2", "INVERTED_RESIDUAL_SETTING", "summary", "ModelSummary", "PCam", "PCamError",
           "Normalizer", "TrainConfig", "train", "evaluate_loss", "UsageError", "DivergedError", "save", "load",
           "predict", "as_images", "tile_images", "reuse_freed_memory", "list_pretrained", "pretrained"]
