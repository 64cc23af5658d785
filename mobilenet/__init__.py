"""Conventional and C_N-equivariant MobileNetV2 for 95x95 PatchCamelyon patches."""
from .model import INVERTED_RESIDUAL_SETTING, MobileNetV2, mobilenet_v2
from .summary import ModelSummary, summary

__all__ = ["mobilenet_v2", "MobileNetV2", "INVERTED_RESIDUAL_SETTING", "summary", "ModelSummary"]
