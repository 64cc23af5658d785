"""Conventional and C_N-equivariant MobileNetV2 for 95x95 PatchCamelyon patches."""
from rotconv.summary import ModelSummary, summary

from .model import INVERTED_RESIDUAL_SETTING, MobileNetV2, mobilenet_v2

__all__ = ["mobilenet_v2", "MobileNetV2", "INVERTED_RESIDUAL_SETTING", "summary", "ModelSummary"]
