"""rotconv: rotation- and reflection-equivariant (C_N, D_N) convolutions with steerable filters, for small, fast
CNNs.

Public API::

    CyclicGroup, DihedralGroup, rotate_image      groups and their action     (rotconv.group)
    SteerableBasis, steerable_basis               band-limited filter bases   (rotconv.basis)
    LiftingConv2d, GroupConv2d, DepthwiseGroupConv2d   equivariant convs      (rotconv.layers)
    GroupBatchNorm2d                              field-wise batch norm       (rotconv.norm)
    LowpassConv2d, lowpass_basis, binomial_filter   anti-aliased strided convs  (rotconv.lowpass)
    GroupPool, CircularMask, MaskedGlobalAvgPool, disc_mask   pooling/masks   (rotconv.pooling)
    equivariant_padding, equivariant_output_size  odd-grid stride policy      (rotconv.grid)
    export, needs_export, EXPORTED_TYPES          to plain torch.nn           (rotconv.export)
    equivariance_error, smooth_noise, randomize_batchnorm   numerical checks (rotconv.checks)
    eval_mode                                     eval mode, the caller's mode given back   (rotconv.modes)
    summary, ModelSummary                         params / MACs / memory      (rotconv.summary)
    as_int, check_int, check_positive_int, check_choice, check_normalised   argument checks  (rotconv.validation)
    cpu_report, hardware_line                     what the CPU offers kernels (rotconv.hardware)
    atomic_write, RunLock, ...                    files never half-written    (rotconv.files)
    MIN_TORCH                                     the oldest torch supported  (rotconv.torch_version)
"""
from .torch_version import MIN_TORCH  # first: an older torch is named before anything else runs
from .basis import SteerableBasis, steerable_basis
from .checks import equivariance_error, randomize_batchnorm, smooth_noise
from .export import EXPORTED_TYPES, export, needs_export
from .grid import equivariant_output_size, equivariant_padding
from . import hardware
from .hardware import cpu_report, hardware_line
from .group import CyclicGroup, DihedralGroup, Group, as_group, mirror_image, rotate_image
from .layers import DepthwiseGroupConv2d, GroupConv2d, LiftingConv2d, SteerableConv2d
from .lowpass import LowpassConv2d, binomial_filter, lowpass_basis
from .modes import eval_mode
from .norm import GroupBatchNorm2d
from .pooling import CircularMask, GroupPool, MaskedGlobalAvgPool, disc_mask
from .summary import ModelSummary, summary
from .validation import NORMALISED_LIMIT, as_int, check_choice, check_int, check_normalised, check_positive_int

__version__ = "0.1.0"

__all__ = [
    "Group",
    "CyclicGroup",
    "DihedralGroup",
    "as_group",
    "rotate_image",
    "mirror_image",
    "SteerableBasis",
    "steerable_basis",
    "SteerableConv2d",
    "LiftingConv2d",
    "GroupConv2d",
    "DepthwiseGroupConv2d",
    "GroupBatchNorm2d",
    "LowpassConv2d",
    "lowpass_basis",
    "binomial_filter",
    "GroupPool",
    "CircularMask",
    "MaskedGlobalAvgPool",
    "disc_mask",
    "equivariant_padding",
    "equivariant_output_size",
    "export",
    "needs_export",
    "eval_mode",
    "EXPORTED_TYPES",
    "equivariance_error",
    "smooth_noise",
    "randomize_batchnorm",
    "summary",
    "ModelSummary",
    "as_int",
    "check_int",
    "check_positive_int",
    "check_normalised",
    "cpu_report",
    "hardware_line",
    "NORMALISED_LIMIT",
    "check_choice",
    "MIN_TORCH",
]

# On an x86 CPU without AVX2 torch would try to start NNPACK at many small convolutions and print, each time, that
# it cannot: turned off there (rotconv.hardware.turn_off_unusable_nnpack; nothing else changes).
hardware.turn_off_unusable_nnpack()
