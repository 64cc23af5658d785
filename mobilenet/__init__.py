"""Conventional and C_N-equivariant MobileNetV2 for 95x95 PatchCamelyon patches, with what it takes to train
and use them: the model (:mod:`mobilenet.model`), PCam data, normaliser and augmentation (:mod:`mobilenet.data`),
a trainer for any classifier and dataset (:mod:`mobilenet.training`), model files and prediction
(:mod:`mobilenet.inference`) and the shipped weights (:mod:`mobilenet.pretrained_models`)."""
from rotconv.summary import ModelSummary, summary

from .inference import CPU_BATCH_SIZE, as_images, load, predict, save, tile_images
from .model import DEPTHWISE_MODES, INVERTED_RESIDUAL_SETTING, MobileNetV2, mobilenet_v2
from .data import Normalizer, PCam, PCamError
from .pretrained_models import list_pretrained, load_or_pretrained, pretrained
from .training import DivergedError, TrainConfig, UsageError, evaluate_loss, reuse_freed_memory, train

__all__ = ["mobilenet_v2", "MobileNetV2", "INVERTED_RESIDUAL_SETTING", "DEPTHWISE_MODES", "summary", "ModelSummary",
           "PCam", "PCamError", "Normalizer", "TrainConfig", "train", "evaluate_loss", "UsageError", "DivergedError",
           "save", "load", "predict", "as_images", "tile_images", "CPU_BATCH_SIZE", "reuse_freed_memory",
           "list_pretrained", "pretrained", "load_or_pretrained"]
