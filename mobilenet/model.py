"""Conventional and equivariant (C_N, D_N) MobileNetV2 for 95x95 PatchCamelyon patches.

MobileNetV2 (Sandler et al. 2018): inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear
projection), expansion 6, ReLU6, residual connections where shapes allow. Adapted to PCam as in Mohamed et
al.: 95x95 (odd) inputs, the stride of two stages reduced from 2 to 1 (the 64- and 160-channel stages) so
the last feature map is 11x11 instead of 3x3, odd grids kept by every strided layer
(``rotconv.equivariant_padding``), a circular mask on the input and a circular field of view in the
global pooling. The equivariant network uses the same table with ``round(c / order)`` regular fields
(``order``: the group's elements, N for C_N, 2N for D_N; at least ``min_fields``, 1 by default) where the
conventional one has ``c`` channels, and an invariant head: masked global average pooling, pooling over
the group (max by default; ``group_pool="sort"`` keeps every order statistic), linear classifier.
"""

from typing import Callable

import torch
import torch.nn as nn

import rotconv
from rotconv.grid import equivariant_padding
from rotconv.group import as_group
from rotconv.validation import (check_choice, check_int, check_normalised, check_positive_int, input_checks_skipped,
                                is_symbolic, shape_of)

__all__ = ["MobileNetV2", "mobilenet_v2", "INVERTED_RESIDUAL_SETTING", "STEM_CHANNELS", "LAST_CHANNELS",
           "DEPTHWISE_MODES"]

#: (expansion t, output channels c, repeats n, first stride s). Strides of the 64- and 160-channel stages
#: are 1 here (2 in the ImageNet model): the total stride is 8, 95 -> 47 -> 23 -> 11.
INVERTED_RESIDUAL_SETTING: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 1),
    (6, 96, 3, 1),
    (6, 160, 3, 1),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
_ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}
#: the spatial conv of an equivariant block: per channel (MobileNetV2's FLOPs) or per field (regular -> regular)
DEPTHWISE_MODES = ("channel", "field")


def _make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


class _PlainLayers:
    """Builds the conventional layers (unconstrained nn.Conv2d filters); ``norm_layer(channels)`` (default
    ``nn.BatchNorm2d``)."""

    group = None

    def __init__(self, norm_layer: Callable[..., nn.Module] | None = None, antialias: bool = False) -> None:
        self.norm_layer = norm_layer or nn.BatchNorm2d
        self.antialias = antialias

    def width(self, channels: int) -> int:
        return channels

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, size: int,
             lifting: bool = False) -> nn.Module:
        return self._conv(in_channels, out_channels, kernel_size, stride, size, 1)

    def depthwise(self, channels: int, kernel_size: int, stride: int, size: int) -> nn.Module:
        return self._conv(channels, channels, kernel_size, stride, size, channels)

    def _conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, size: int,
              groups: int) -> nn.Module:
        padding = equivariant_padding(size, kernel_size, stride)
        if padding < 0:
            raise ValueError(f"internal: negative padding for size {size}")
        if self.antialias and stride > 1:
            return rotconv.LowpassConv2d(in_channels, out_channels, kernel_size, stride, padding, groups, bias=False)
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    def norm(self, channels: int) -> nn.Module:
        return self.norm_layer(channels)

    def pool_rotations(self, mode: str) -> nn.Module:
        return nn.Identity()


class _EquivariantLayers:
    """Builds the equivariant layers; ``c`` conventional channels become ``max(min_fields, round(c / order))``
    fields; ``norm_layer(fields, group)`` (default :class:`rotconv.GroupBatchNorm2d`)."""

    def __init__(self, group: rotconv.Group, min_fields: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, depthwise: str = "channel",
                 antialias: bool = False) -> None:
        self.group = group
        self.antialias = antialias
        self.min_fields = min_fields
        self.depthwise_mode = depthwise
        self.norm_layer = norm_layer or rotconv.GroupBatchNorm2d

    def fields(self, channels: int) -> int:
        return max(self.min_fields, round(channels / self.group.order))

    def width(self, channels: int) -> int:
        return self.fields(channels) * self.group.order

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, size: int,
             lifting: bool = False) -> nn.Module:
        order = self.group.order
        kernel_size, basis = self._filter(kernel_size, stride)
        if lifting:
            return rotconv.LiftingConv2d(
                in_channels, out_channels // order, kernel_size, self.group, stride, bias=False, basis=basis
            )
        return rotconv.GroupConv2d(in_channels // order, out_channels // order, kernel_size, self.group, stride,
                                   bias=False, basis=basis)

    def depthwise(self, channels: int, kernel_size: int, stride: int, size: int) -> nn.Module:
        fields = channels // self.group.order
        kernel_size, basis = self._filter(kernel_size, stride)
        if self.depthwise_mode == "field":
            return rotconv.GroupConv2d(fields, fields, kernel_size, self.group, stride, bias=False, groups=fields,
                                       basis=basis)
        return rotconv.DepthwiseGroupConv2d(fields, kernel_size, self.group, stride, bias=False, basis=basis)

    def _filter(self, kernel_size: int, stride: int) -> tuple[int, rotconv.SteerableBasis | None]:
        """The kernel size and basis of a conv: the default ones, or for an anti-aliased strided conv the
        ``k x k`` basis blurred to ``(k+2) x (k+2)`` (:func:`rotconv.lowpass_basis`)."""
        if self.antialias and stride > 1:
            return kernel_size + 2, rotconv.lowpass_basis(rotconv.steerable_basis(kernel_size))
        return kernel_size, None

    def norm(self, channels: int) -> nn.Module:
        return self.norm_layer(channels // self.group.order, self.group)

    def pool_rotations(self, mode: str) -> nn.Module:
        return rotconv.GroupPool(self.group, mode)


class ConvNormActivation(nn.Sequential):
    """conv -> batch norm -> activation (activation omitted for ``activation=None``).

    ``float32_under_cpu_autocast=True`` runs the three in float32 when CPU autocast is on (bf16 training), with
    the input cast up: the builder sets it for the strided depthwise blocks, whose oneDNN bf16 backward is an
    order of magnitude slower than float32 on the CPUs measured (torch 2.13.0, 2 threads, batch 32,
    channels_last: 96 channels at 47x47, stride 2, forward + backward 103 ms in bf16 vs 9.2 ms in float32; 36
    channels 16.1 vs 2.6 ms; a whole bf16 train step 0.88-0.89x). Values stay float32-exact; GPUs, float32
    training and inference are unaffected."""

    def __init__(self, conv: nn.Module, norm: nn.Module, activation: type[nn.Module] | None,
                 float32_under_cpu_autocast: bool = False) -> None:
        layers = [conv, norm] + ([activation()] if activation is not None else [])
        super().__init__(*layers)
        self.float32_under_cpu_autocast = float32_under_cpu_autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32_under_cpu_autocast and not torch.jit.is_scripting() and self._cpu_autocast(x):
            return self._float32_forward(x)
        for module in self:
            x = module(x)
        return x

    def extra_repr(self) -> str:
        return "float32_under_cpu_autocast=True" if self.float32_under_cpu_autocast else ""

    @torch.jit.unused
    def _cpu_autocast(self, x: torch.Tensor) -> bool:
        return not is_symbolic(x) and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")

    @torch.jit.unused
    def _float32_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return nn.Sequential.forward(self, x.float())


class InvertedResidual(nn.Module):
    """1x1 expand (skipped for t = 1) -> 3x3 depthwise (stride s) -> 1x1 linear projection, + input when
    the stride is 1 and the channel counts match. Shapes: ``(B, in, H, W) -> (B, out, H', W')``."""

    def __init__(self, layers, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 size: int, activation: type[nn.Module]) -> None:
        super().__init__()
        hidden = layers.width(int(round(in_channels * expand_ratio)))
        in_width, out_width = layers.width(in_channels), layers.width(out_channels)
        self.stride = stride
        self.use_residual = stride == 1 and in_width == out_width
        blocks: list[nn.Module] = []
        if expand_ratio != 1:
            blocks.append(
                ConvNormActivation(layers.conv(in_width, hidden, 1, 1, size), layers.norm(hidden), activation)
            )
        else:
            hidden = in_width
        blocks.append(ConvNormActivation(layers.depthwise(hidden, 3, stride, size), layers.norm(hidden), activation,
                                         float32_under_cpu_autocast=stride > 1))
        blocks.append(ConvNormActivation(layers.conv(hidden, out_width, 1, 1, size), layers.norm(out_width), None))
        self.conv = nn.Sequential(*blocks)
        self.in_channels, self.out_channels = in_width, out_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for square ``input_size`` RGB patches (build it with :func:`mobilenet_v2`).

    Shapes: ``(B, 3, input_size, input_size) -> (B, num_classes)`` logits.

    Args:
        num_classes: classifier outputs (2 for PCam).
        group: ``None`` for the conventional network (plain ``nn.Conv2d``), or the group of the equivariant
            one: a :class:`rotconv.CyclicGroup` or its number of rotations N (the paper uses ``group=12``), or a
            :class:`rotconv.DihedralGroup` / ``"D12"`` for rotations and reflections.
        width_mult: channel multiplier (as torchvision).
        input_size: odd side of the square input (95 for PCam's 96x96 patches cropped by one pixel).
        activation: ``"relu6"`` (MobileNetV2) or ``"relu"``.
        dropout: dropout before the classifier.
        group_pool: the invariant readout of an equivariant model (:class:`rotconv.GroupPool` mode):
            ``"max"`` over each field's ``order`` channels (the paper's; the classifier sees ``round(1280 / order)``
            features), ``"mean"``, or ``"sort"`` (each field's ``order`` values in ascending order: as many features as
            the conventional model, still exactly invariant).
        min_fields: the fewest regular fields of any equivariant layer. With ``round(c / order)`` a large group leaves
            the narrow early layers one or two fields (C_12: one 12-channel field after block 1; D_12: one
            24-channel field from the stem on), i.e. one or two distinct features in ``order`` poses; ``min_fields=3``
            widens only those layers (C_12: +2.7% MACs, D_12: +18% over the conventional model), ``min_fields=8``
            every layer below 96 channels (C_12: +29%); docs/training.md section 10 measures both.
        depthwise: the spatial conv of every block in an equivariant model: ``"channel"`` (default; each
            channel filtered on its own, :class:`rotconv.DepthwiseGroupConv2d`, the FLOPs of MobileNetV2's
            depthwise conv) or ``"field"`` (each field's ``order`` channels mixed by a regular-to-regular filter,
            :class:`rotconv.GroupConv2d` with ``groups=fields``: ``order`` times the depthwise MACs and free
            filters).
        inverted_residual_setting: the block table, rows ``(t, c, n, s)`` (default
            :data:`INVERTED_RESIDUAL_SETTING`; ``c`` in conventional channels, fields follow ``min_fields``).
        norm_layer: the normalisation: ``norm_layer(channels)`` for the conventional model (default
            ``nn.BatchNorm2d``), ``norm_layer(fields, group)`` for an equivariant one (default
            :class:`rotconv.GroupBatchNorm2d`; it must be equivariant, e.g. field-wise).
        antialias: blur before every stride-2 layer (the stem and the first block of the 24- and 32-channel
            stages): the fixed binomial low-pass ``[1, 2, 1]^T [1, 2, 1] / 16`` folded into the strided 3x3
            filter, which becomes 5x5 (:mod:`rotconv.lowpass`; same parameters, the strided layers' MACs x 25/9,
            quarter-turn exactness kept). Less aliasing: the class changes less under one-pixel shifts and
            arbitrary angles. Default False.
    """

    def __init__(self, num_classes: int = 2, group: rotconv.Group | int | str | None = None, width_mult: float = 1.0,
                 input_size: int = 95, activation: str = "relu6", dropout: float = 0.2,
                 group_pool: str = "max", min_fields: int = 1, depthwise: str = "channel",
                 inverted_residual_setting: list[tuple[int, int, int, int]] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, antialias: bool = False) -> None:
        super().__init__()
        num_classes = check_positive_int(num_classes, "num_classes")
        setting = [tuple(row) for row in (INVERTED_RESIDUAL_SETTING if inverted_residual_setting is None
                                          else inverted_residual_setting)]
        if not setting or any(len(row) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                          for v in row) or row[3] not in (1, 2) for row in setting):
            raise ValueError("inverted_residual_setting: expected a non-empty list of (t, c, n, s) positive integers "
                             f"with stride s 1 or 2, got {inverted_residual_setting!r}")
        if norm_layer is not None and not callable(norm_layer):
            raise ValueError(f"norm_layer: expected a callable or None, got {norm_layer!r}")
        group = None if group is None else as_group(group)
        if not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
        input_size = check_int(input_size, "input_size", minimum=15, odd=True)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_choice(activation, "activation", sorted(_ACTIVATIONS))
        check_choice(group_pool, "group_pool", rotconv.GroupPool.MODES)
        if group is None and group_pool != "max":
            raise ValueError(f"group_pool: only an equivariant model (group=...) pools over a group, got "
                             f"group_pool={group_pool!r} with group=None")
        min_fields = check_positive_int(min_fields, "min_fields")
        if group is None and min_fields != 1:
            raise ValueError(f"min_fields: only an equivariant model (group=...) has fields, got "
                             f"min_fields={min_fields} with group=None")
        check_choice(depthwise, "depthwise", DEPTHWISE_MODES)
        if group is None and depthwise != "channel":
            raise ValueError(f"depthwise: only an equivariant model (group=...) has fields to mix, got "
                             f"depthwise={depthwise!r} with group=None")
        if not isinstance(antialias, bool):
            raise ValueError(f"antialias: expected True or False, got {antialias!r}")
        self.min_fields = min_fields
        self.depthwise = depthwise
        self.antialias = antialias
        self.group = group
        self.group_pool = group_pool
        self.input_size = input_size
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.activation = activation
        self.dropout = dropout
        self.inverted_residual_setting = None if inverted_residual_setting is None else [list(row) for row in setting]
        self.norm_layer = norm_layer
        layers = (_PlainLayers(norm_layer, antialias) if group is None
                  else _EquivariantLayers(group, min_fields, norm_layer, depthwise, antialias))
        act = _ACTIVATIONS[activation]

        size = input_size
        stem = layers.width(_make_divisible(STEM_CHANNELS * width_mult))
        features: list[nn.Module] = [
            ConvNormActivation(layers.conv(3, stem, 3, 2, size, lifting=True), layers.norm(stem), act)
        ]
        size = rotconv.equivariant_output_size(size, 3, 2)
        self.sizes = [size]
        in_channels = _make_divisible(STEM_CHANNELS * width_mult)
        for t, c, n, s in setting:
            out_channels = _make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(layers, in_channels, out_channels, stride, t, size, act))
                size = rotconv.equivariant_output_size(size, 3, stride)
                self.sizes.append(size)
                in_channels = out_channels
        last = layers.width(_make_divisible(LAST_CHANNELS * max(1.0, width_mult)))
        features.append(ConvNormActivation(layers.conv(layers.width(in_channels), last, 1, 1, size),
                                           layers.norm(last), act))
        self.features = nn.Sequential(*features)
        self.final_size = size
        self.input_mask = rotconv.CircularMask(input_size)
        self.pool = rotconv.MaskedGlobalAvgPool(size=size)
        self.pool_rotations = layers.pool_rotations(group_pool)
        head_features = last if group is None else self.pool_rotations.out_channels(last)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_features, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation (Kaiming normal, fan-out) for plain convolutions; the rotconv layers keep
        their own default, Kaiming fan-in on the expanded filter. docs/training.md measured both rules for the
        equivariant model: fan-out puts its filters at the conventional scale, but did not validate better
        (C_12 valid loss 0.417 vs 0.403 with fan-in, 2 seeds), so the default stayed fan-in.
        ``SteerableConv2d.reset_parameters(mode="fan_out")`` gives the other rule."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, rotconv.LowpassConv2d)):  # the learned k x k filter
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, rotconv.SteerableConv2d):
                module.reset_parameters(mode="fan_in")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if input_checks_skipped(x):
            return
        expected = (3, self.input_size, self.input_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = shape_of(x)
            hint = " (crop 96x96 PCam patches to 95x95)" if isinstance(x, torch.Tensor) and x.shape[-1] == 96 else ""
            raise ValueError(f"input: expected (B, 3, {self.input_size}, {self.input_size}), got {shape}{hint}")
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return  # values are not known while torch.export / torch.compile trace
        if x.shape[0] == 0:
            raise ValueError("input: an empty batch (0 images)")
        if not self.training and x.is_floating_point():  # not in training: no sync per step
            check_normalised(float(x.detach().abs().amax()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, input_size, input_size) -> (B, num_classes)``; ``torch.jit.script`` works on
        :meth:`export`'s result (and on the conventional model)."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        x = self.features(self.input_mask(x))
        return self.classifier(self.pool_rotations(self.pool(x)))

    def export(self) -> "MobileNetV2":
        """A copy made of plain torch.nn layers (Conv2d, BatchNorm2d, ReLU6/ReLU, mask, pooling) with
        identical outputs; traceable by ``torch.export`` and ``torch.fx``, and the input of :mod:`quant`."""
        if self.group is None:
            return rotconv.export(self)
        example = torch.zeros(1, 3, self.input_size, self.input_size, device=next(self.parameters()).device)
        return rotconv.export(self, example_input=example)

    def arguments(self) -> dict:
        """The :func:`mobilenet_v2` arguments that rebuild this architecture (what :func:`mobilenet.save`
        stores)."""
        group = None if self.group is None else self.group.N if isinstance(self.group, rotconv.CyclicGroup) \
            else str(self.group)
        if self.norm_layer is not None:
            raise ValueError("model: a custom norm_layer cannot be stored as an argument; save the state_dict and "
                             "build the model again with the same norm_layer")
        arguments = {"num_classes": self.num_classes, "group": group,
                     "width_mult": self.width_mult, "input_size": self.input_size, "activation": self.activation,
                     "dropout": self.dropout, "group_pool": self.group_pool, "min_fields": self.min_fields}
        if self.depthwise != "channel":  # files of models built before the option keep their form
            arguments["depthwise"] = self.depthwise
        if self.antialias:  # (likewise)
            arguments["antialias"] = True
        if self.inverted_residual_setting is not None:
            arguments["inverted_residual_setting"] = self.inverted_residual_setting
        return arguments

    def extra_repr(self) -> str:
        group = "conventional" if self.group is None else f"group={self.group!r}"
        text = f"{group}, input_size={self.input_size}, num_classes={self.num_classes}"
        return text + (", antialias=True" if self.antialias else "")


def mobilenet_v2(*, weights: str | None = None, **kwargs) -> MobileNetV2:
    """Build MobileNetV2 for PCam: ``MobileNetV2(**kwargs)`` (every argument is documented there), or with
    ``weights=NAME`` the shipped model of that name trained on real PCam patches (:func:`mobilenet.pretrained`;
    no other argument then)."""
    if weights is not None:
        if kwargs:
            raise ValueError(f"weights: a pretrained model has its own architecture; got also {sorted(kwargs)}")
        from .pretrained_models import pretrained

        return pretrained(weights)
    return MobileNetV2(**kwargs)
