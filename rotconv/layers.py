"""C_N- and D_N-equivariant convolutions on regular feature fields, parametrised by rotated steerable filters.

``N`` is the number of rotations; ``order`` the number of group elements (N for C_N, 2N for D_N). All layers
take and return plain tensors. A regular feature tensor has shape ``(B, F*order, H, W)``; channel
``f*order + i`` is group element ``i`` of field ``f`` (see :mod:`rotconv.group`).

The kernel constraint for regular representations, ``K(g x) = rho(g) K(x) rho(g)^-1``, is solved by
*rotated filters*: the filter from input rotation ``j`` to output rotation ``i`` is a free steerable filter
``Psi_{j-i}`` rotated by the angle of ``i``. Rotating a steerable filter is an exact linear map on its
coefficients, so the expanded filter is equivariant to float precision for rotations that are exact on the
grid (multiples of 90 degrees) and band-limited-approximately for the others. When 4 divides N, only the
first quarter of the rotations is computed from coefficients; the rest are exact ``torch.rot90`` copies, so
the expanded filter bank is bit-exactly symmetric (what makes INT8 models bit-exactly invariant).

Expansion is two ops per layer: one contraction of the coefficients with the rotated basis (skipped for
``kernel_size=1``, whose basis is the constant 1) and one gather with a precomputed index that places every
entry of the full bank (quarter completion, cyclic offsets, and the memory layout: contiguous or
channels_last, following the input). Each conv expands its filter on every forward in training mode
(gradients flow to the coefficients) and caches it in eval mode when no gradient is needed; the cache is
checked against the coefficients' values on every call, so it never goes stale (under ``torch.jit.trace`` the
expansion is recorded instead). ``export()`` returns a plain :class:`torch.nn.Conv2d`.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import SteerableBasis, group_basis, steerable_basis
from .grid import equivariant_padding
from .group import Group, as_group
from .validation import check_choice, check_positive_int, input_checks_skipped, shape_of

__all__ = ["SteerableConv2d", "LiftingConv2d", "GroupConv2d", "DepthwiseGroupConv2d"]

Padding = Union[str, int]
Device = Union[torch.device, str, None]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _FilterCache:
    """An expanded filter and bias with the coefficient values they were computed from."""

    def __init__(self, parameters: tuple[torch.Tensor | None, ...], memory_format: torch.memory_format,
                 filter: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.snapshot = tuple(None if p is None else p.detach().clone() for p in parameters)
        self.memory_format = memory_format
        self.inference = torch.is_inference_mode_enabled()
        self.filter, self.bias = filter, bias

    def matches(self, parameters: tuple[torch.Tensor | None, ...], memory_format: torch.memory_format) -> bool:
        """True when the coefficients still hold the values the cache was built from (whatever way they were
        changed: optimizer steps, ``.data`` edits, ``load_state_dict``) and the cached tensors may be used
        here (an inference tensor cannot enter a later autograd graph)."""
        if memory_format != self.memory_format or (self.inference and not torch.is_inference_mode_enabled()):
            return False
        for current, kept in zip(parameters, self.snapshot):
            if (current is None) != (kept is None):
                return False
            if current is not None and (current.dtype != kept.dtype or current.device != kept.device
                                        or not torch.equal(current, kept)):
                return False
        return True


class SteerableConv2d(nn.Module):
    """Base class of the convs whose filter bank is expanded from steerable coefficients
    (:class:`LiftingConv2d`, :class:`GroupConv2d`, :class:`DepthwiseGroupConv2d`).

    Shared machinery: argument checks, the odd-grid padding policy, filter expansion (one contraction of the
    coefficients with the rotated basis, one index gather), the eval-mode filter cache, export.

    Attributes:
        weight: the steerable coefficients ``(*coefficient_shape, basis_size)``.
        bias: one bias per output field, or None.
        in_channels, out_channels, out_fields, groups, kernel_size, stride, padding, padding_mode, group:
            as their names say; ``out_channels = out_fields * order``.
    """

    weight: nn.Parameter

    def __init__(
        self,
        in_channels: int,
        out_fields: int,
        kernel_size: int,
        group: Group,
        stride: int,
        padding: Padding,
        padding_mode: str,
        bias: bool,
        groups: int,
        basis: SteerableBasis | None,
    ) -> None:
        super().__init__()
        self.group = as_group(group)
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")
        if padding == "equivariant":
            if kernel_size % 2 == 0:
                raise ValueError(f"kernel_size: padding='equivariant' needs an odd kernel size, got {kernel_size}")
        elif isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:  # a str is not an int
            raise ValueError(f"padding: expected 'equivariant' or an integer >= 0, got {padding!r}")
        check_choice(padding_mode, "padding_mode", _PADDING_MODES)
        if basis is None:
            basis = steerable_basis(kernel_size)
        elif not isinstance(basis, SteerableBasis) or basis.kernel_size != kernel_size:
            raise ValueError(f"basis: expected a SteerableBasis with kernel_size={kernel_size}")
        self.padding = padding
        self.padding_mode = padding_mode
        self.basis = basis
        self.in_channels = in_channels
        self.out_fields = out_fields
        self.out_channels = out_fields * self.group.order
        self.groups = groups
        rotated = group_basis(basis, self.group.N)  # (Q, B, k, k): the rotations computed by interpolation
        self.register_buffer("rotated_basis", rotated, persistent=False)
        # A constant basis (kernel_size 1) is exactly 1 for every rotation: the coefficients are the filter.
        self._constant_basis = bool(basis.size == 1 and kernel_size == 1 and torch.all(rotated == 1.0))
        basis_matrix = None if self._constant_basis else rotated.permute(1, 0, 2, 3).reshape(basis.size, -1)
        self.register_buffer("_basis_matrix", basis_matrix, persistent=False)  # (B, Q*k*k)
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        self._cache: _FilterCache | None = None

    def _create_weight(self, shape: tuple[int, ...], device: Device, dtype: torch.dtype | None) -> None:
        """The coefficient parameter, the expansion index, He initialisation; then everything on ``device``
        in ``dtype`` (torch's factory arguments)."""
        self.weight = nn.Parameter(torch.empty(shape))
        self._build_expansion_index()
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # -- filters -------------------------------------------------------------------------------------
    @property
    def basis_size(self) -> int:
        return self.basis.size

    def _fan_in(self) -> int:
        return self.in_channels // self.groups

    def reset_parameters(self, mode: str = "fan_in") -> None:
        """He (Kaiming normal) initialisation of the expanded filter ``(out_channels, in_channels // groups, k, k)``:
        Var(filter entry) = 2 / fan with torch's fans of a weight of that shape, ``fan_in = in_channels // groups
        * k * k`` or ``fan_out = out_channels * k * k`` (as ``nn.init.kaiming_normal_(mode=...)``, which takes no
        account of ``groups``). The basis functions have unit norm over the k x k grid, so a coefficient std of
        ``sqrt(2 k^2 / (fan * basis_size))`` gives that variance on average over the grid.

        The scale matters beyond the forward pass even where a batch norm follows: Adam moves every coefficient
        by about ``lr`` per step, so the filter's relative change per step is inversely proportional to its
        scale. ``mobilenet_v2`` keeps ``mode="fan_in"`` for its rotconv layers (``mode="fan_out"``, torchvision's
        rule for the conventional model, validated worse on PCam: docs/training.md section 2)."""
        check_choice(mode, "mode", ("fan_in", "fan_out"))
        channels = self._fan_in() if mode == "fan_in" else self.out_channels
        std = math.sqrt(2.0 / (channels * self.basis_size))
        with torch.no_grad():
            self.weight.normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()
        self._cache = None

    def _place(self, ids: torch.Tensor) -> torch.Tensor:
        """Where every entry of the full bank comes from: given the positions ``ids`` of the contracted
        coefficients, laid out ``(*coefficient_shape, Q, k, k)`` (Q: the rotations computed by
        interpolation), return ``(out_channels, in_channels // groups, k, k)`` positions."""
        raise NotImplementedError

    def _build_expansion_index(self) -> None:
        """Precompute the gather index of :meth:`expand_filter` (called once the weight exists)."""
        coefficients = tuple(self.weight.shape[:-1])
        quarter, k = self.rotated_basis.shape[0], self.kernel_size
        computed = 1 if self._constant_basis else quarter
        ids = torch.arange(math.prod(coefficients) * computed * k * k).view(*coefficients, computed, k, k)
        full = self._place(ids.expand(*coefficients, quarter, k, k))
        dtype = torch.int32 if full.numel() < 2**31 else torch.int64
        identity = torch.equal(full.reshape(-1), torch.arange(full.numel()))
        self.register_buffer("_index", None if identity else full.reshape(-1).to(dtype), persistent=False)
        channels_last = full.permute(0, 2, 3, 1).reshape(-1).to(dtype) if k > 1 else None
        self.register_buffer("_index_channels_last", channels_last, persistent=False)

    def _element_positions(self, computed: torch.Tensor) -> torch.Tensor:
        """``T_e Psi`` for every group element ``e``: from positions ``(..., Q, k, k)`` of a filter rotated by
        the Q computed rotations, positions ``(..., order, k, k)``. When 4 divides N the other rotations are
        exact ``rot90`` copies of the first quarter; a reflection ``R_k F`` is the mirror of ``R_{-k}``
        (``F R_{-k} = R_k F``), also exact. Applied once, to positions, when the index is built."""
        N = self.group.N
        # element q*N/4 + r (r < N/4) is rot90^q of the computed rotation r
        rotations = torch.cat([torch.rot90(computed, q, dims=(-2, -1)) for q in range(4)], dim=-3) \
            if N % 4 == 0 else computed
        if not self.group.has_reflections:
            return rotations
        mirrored = torch.flip(rotations[..., [(-k) % N for k in range(N)], :, :], dims=(-1,))
        return torch.cat([rotations, mirrored], dim=-3)

    def expand_filter(self, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """The full filter bank ``(out_channels, in_channels // groups, k, k)`` (differentiable), laid out
        contiguously or ``torch.channels_last``."""
        weight = self.weight
        if self._constant_basis:
            contracted = weight.reshape(-1)
        else:
            contracted = (weight.reshape(-1, self.basis_size) @ self._basis_matrix.to(weight.dtype)).reshape(-1)
        k = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, k, k)
        if memory_format == torch.channels_last and self._index_channels_last is not None:
            gathered = contracted.index_select(0, self._index_channels_last)
            return gathered.view(shape[0], k, k, shape[1]).permute(0, 3, 1, 2)
        if self._index is None:
            return contracted.view(shape)
        return contracted.index_select(0, self._index).view(shape)

    def expanded_bias(self) -> torch.Tensor | None:
        """``(out_channels,)``: the field bias repeated over the field's ``order`` channels, or None."""
        if self.bias is None:
            return None
        return self.bias.repeat_interleave(self.group.order)

    def filter(self, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """The expanded filter; cached in eval mode when no gradient to the coefficients is needed."""
        return self._filter_and_bias(memory_format)[0]

    def _filter_and_bias(self, memory_format: torch.memory_format = torch.contiguous_format
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expanded filter and bias; in eval mode without gradients to the coefficients both come from a
        cache that is rebuilt whenever the coefficients' values differ from those it was built from."""
        parameters = (self.weight, self.bias)
        needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in parameters)
        if self.training or needs_grad or torch.jit.is_tracing():  # a trace records the expansion, not a cache
            if self._cache is not None:  # (nn.Module.__setattr__ costs microseconds on every training step)
                self._cache = None
            return self.expand_filter(memory_format), self.expanded_bias()
        cache = self._cache
        if cache is None or not cache.matches(parameters, memory_format):
            with torch.no_grad():
                cache = _FilterCache(parameters, memory_format, self.expand_filter(memory_format),
                                     self.expanded_bias())
            self._cache = cache
        return cache.filter, cache.bias

    def train(self, mode: bool = True) -> "SteerableConv2d":
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._cache = None  # .to(), .half(), .cuda(): the cached tensors belong to the old ones
        result = super()._apply(fn, recurse)
        # The coefficients are not an image: .to(memory_format=torch.channels_last) would give the 4-D ones a
        # strided layout that makes every expansion copy them and the optimizer's updates slow.
        if not self.weight.is_contiguous():
            self.weight.data = self.weight.data.contiguous()
        return result

    # -- padding -------------------------------------------------------------------------------------
    def output_size(self, input_size: int) -> int:
        """Spatial output size for a square input of side ``input_size``."""
        pad = self._padding_for(input_size, "input_size")
        return (input_size + 2 * pad - self.kernel_size) // self.stride + 1

    def _padding_for(self, size: int, name: str) -> int:
        if self.padding == "equivariant":
            return equivariant_padding(size, self.kernel_size, self.stride, name)
        return int(self.padding)

    def _check_input(self, x: torch.Tensor) -> None:
        if input_checks_skipped(x):  # tracing: shapes unknown or frozen
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input: {type(self).__name__} expects (B, C, H, W), got {shape_of(x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input: {type(self).__name__} expects {self._channel_description()}, got {x.shape[1]}")

    def _channel_description(self) -> str:
        return f"{self.in_channels} channels"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W) -> (B, out_fields * order, H', W')``."""
        self._check_input(x)
        pad_h = self._padding_for(x.shape[-2], "input height")
        pad_w = self._padding_for(x.shape[-1], "input width")
        if pad_h < 0 or pad_w < 0:  # crop so the sampled centres are symmetric
            crop_h, crop_w = max(-pad_h, 0), max(-pad_w, 0)
            x = x[..., crop_h : x.shape[-2] - crop_h, crop_w : x.shape[-1] - crop_w]
            pad_h, pad_w = max(pad_h, 0), max(pad_w, 0)
        if self.padding_mode != "zeros" and (pad_h or pad_w):
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=self.padding_mode)
            pad_h = pad_w = 0
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        weight, bias = self._filter_and_bias(torch.channels_last if channels_last else torch.contiguous_format)
        return F.conv2d(x, weight, bias, self.stride, (pad_h, pad_w), 1, self.groups)

    # -- export --------------------------------------------------------------------------------------
    def export(self, input_size: int | tuple[int, int] | None = None) -> nn.Module:
        """A plain ``nn.Conv2d`` (preceded by ``nn.ZeroPad2d`` cropping when the policy crops) with the
        same outputs. ``input_size`` (H or (H, W)) is needed only for strided layers with
        ``padding='equivariant'``, whose padding depends on the input size."""
        if self.padding == "equivariant" and self.stride > 1:
            if input_size is None:
                raise ValueError(
                    "input_size: a strided layer with padding='equivariant' needs the input size to export"
                )
            height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
            pad_h = self._padding_for(height, "input_size")
            pad_w = self._padding_for(width, "input_size")
        else:
            pad_h = pad_w = self._padding_for(1, "input_size")
        weight = self.weight
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=(max(pad_h, 0), max(pad_w, 0)),
            padding_mode=self.padding_mode,
            groups=self.groups,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.expand_filter())
            if self.bias is not None:
                conv.bias.copy_(self.expanded_bias())
        if pad_h < 0 or pad_w < 0:
            return nn.Sequential(nn.ZeroPad2d((min(pad_w, 0),) * 2 + (min(pad_h, 0),) * 2), conv)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self._in_repr()}, out_fields={self.out_fields}, kernel_size={self.kernel_size}, "
            f"group={self.group!r}, stride={self.stride}, padding={self.padding!r}, basis_size={self.basis_size}"
        )
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            text += ", bias=False"
        return text

    def _in_repr(self) -> str:
        return f"in_channels={self.in_channels}"


class LiftingConv2d(SteerableConv2d):
    """Scalar channels -> regular fields (the first layer of a C_N- or D_N-equivariant network).

    Output element ``i`` of field ``f`` correlates the input with the field's filters transformed by element
    ``i`` (for C_N the rotation by ``2*pi*i/N``). Shapes: ``(B, in_channels, H, W) -> (B, out_fields*order, H',
    W')``. Group action: input
    channels are scalars (rotate spatially only); output fields are regular. Parameters: ``out_fields x
    in_channels x B`` coefficients (``B`` = basis size) and one bias per output field.

    Args:
        in_channels: scalar input channels (e.g. 3 for RGB).
        out_fields: regular output fields (``out_fields * order`` channels).
        kernel_size: odd filter size.
        group: :class:`~rotconv.CyclicGroup` or :class:`~rotconv.DihedralGroup`, its name (``"D12"``) or N, the
            number of rotations of C_N.
        stride, padding, padding_mode, bias: as :class:`torch.nn.Conv2d`; ``padding='equivariant'`` (default)
            applies the odd-grid stride policy of :mod:`rotconv.grid`.
        basis: a :class:`~rotconv.SteerableBasis` to use instead of the default one.
        device, dtype: where and in which floating type parameters and buffers are made (as torch's layers).
    """

    def __init__(self, in_channels: int, out_fields: int, kernel_size: int, group: Group | int | str, stride: int = 1,
                 padding: Padding = "equivariant", bias: bool = True, padding_mode: str = "zeros",
                 basis: SteerableBasis | None = None, device: Device = None, dtype: torch.dtype | None = None) -> None:
        in_channels = check_positive_int(in_channels, "in_channels")
        out_fields = check_positive_int(out_fields, "out_fields")
        super().__init__(in_channels, out_fields, kernel_size, group, stride, padding, padding_mode, bias, 1, basis)
        self._create_weight((out_fields, in_channels, self.basis_size), device, dtype)

    def _place(self, ids: torch.Tensor) -> torch.Tensor:
        # (F, C, Q, k, k) -> T_g Psi for every element g: (F, C, order, k, k) -> (F*order, C, k, k)
        full = self._element_positions(ids).permute(0, 2, 1, 3, 4)
        return full.reshape(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

class GroupConv2d(SteerableConv2d):
    """Regular fields -> regular fields (group convolution on C_N or D_N).

    The filter from input element ``h`` to output element ``g`` is ``T_g Psi_{g^-1 h}`` with ``order`` free
    steerable filters ``Psi_d`` per field pair (for C_N: ``rotate_i(Psi_{(j-i) mod N})``); ``kernel_size=1``
    gives the block-circulant pointwise conv. Shapes: ``(B, in_fields*order, H, W) -> (B, out_fields*order, H',
    W')``. Group action: both sides regular (spatial transformation + permutation inside every field).
    Parameters: ``out_fields x (in_fields / groups) x order x B`` coefficients and one bias per output field.

    ``groups`` splits the fields into that many consecutive sets, each mapped to its own share of the output
    fields (as :class:`torch.nn.Conv2d`'s ``groups``, counted in fields, so every set holds whole fields and
    the layer stays equivariant). ``groups=fields`` with ``in_fields == out_fields`` is a *field-wise*
    depthwise conv: each field's ``order`` channels mixed by a regular-to-regular filter, ``order`` times the
    MACs and free filters of :class:`DepthwiseGroupConv2d`.

    Args:
        in_fields, out_fields: regular fields on each side (both divisible by ``groups``).
        kernel_size, group, stride, padding, bias, padding_mode, basis, device, dtype: as :class:`LiftingConv2d`.
        groups: independent sets of fields (default 1: every output field sees every input field).
    """

    def __init__(self, in_fields: int, out_fields: int, kernel_size: int, group: Group | int | str, stride: int = 1,
                 padding: Padding = "equivariant", bias: bool = True, padding_mode: str = "zeros",
                 basis: SteerableBasis | None = None, device: Device = None, dtype: torch.dtype | None = None,
                 groups: int = 1) -> None:
        in_fields = check_positive_int(in_fields, "in_fields")
        out_fields = check_positive_int(out_fields, "out_fields")
        groups = check_positive_int(groups, "groups")
        if in_fields % groups or out_fields % groups:
            raise ValueError(f"groups: in_fields ({in_fields}) and out_fields ({out_fields}) must both be divisible "
                             f"by groups, got groups={groups}")
        group = as_group(group)
        super().__init__(in_fields * group.order, out_fields, kernel_size, group, stride, padding, padding_mode, bias,
                         groups, basis)
        self.in_fields = in_fields
        self._create_weight((out_fields, in_fields // groups, group.order, self.basis_size), device, dtype)

    def _place(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (Fo, Fi, D, Q, k, k): free filter Psi_d (d a group element) rotated by the computed rotations.
        # Output element g, input element h take T_g Psi_{g^-1 h}.
        order = self.group.order
        elements = self._element_positions(ids)  # (Fo, Fi, D, order, k, k): T_e Psi_d
        g = torch.arange(order).view(-1, 1).expand(order, order)
        d = torch.stack([self.group.permutation(int(element)) for element in range(order)])  # d[g, h] = g^-1 h
        full = elements[:, :, d, g]  # (Fo, Fi / groups, g, h, k, k)
        return full.permute(0, 2, 1, 3, 4, 5).reshape(self.out_channels, self.in_channels // self.groups,
                                                      self.kernel_size, self.kernel_size)

    def _channel_description(self) -> str:
        return f"{self.in_channels} channels (in_fields={self.in_fields} x {self.group.order})"

    def _in_repr(self) -> str:
        return f"in_fields={self.in_fields}"

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", groups={self.groups}" if self.groups != 1 else "")


class DepthwiseGroupConv2d(SteerableConv2d):
    """Equivariant depthwise conv: each channel filtered on its own, with exactly the FLOPs of
    ``nn.Conv2d(F*order, F*order, k, groups=F*order)``.

    Channel ``i`` of field ``f`` is correlated with the field's single filter transformed by element ``i``
    (for C_N the rotation by ``2*pi*i/N``). Shapes: ``(B, fields*order, H, W) -> (B, fields*order, H', W')``.
    Group action: regular on both sides.
    Parameters: ``fields x B`` coefficients and one bias per field.

    Args:
        fields: regular fields in and out.
        kernel_size, group, stride, padding, bias, padding_mode, basis, device, dtype: as :class:`LiftingConv2d`.
    """

    def __init__(self, fields: int, kernel_size: int, group: Group | int | str, stride: int = 1,
                 padding: Padding = "equivariant", bias: bool = True, padding_mode: str = "zeros",
                 basis: SteerableBasis | None = None, device: Device = None, dtype: torch.dtype | None = None) -> None:
        fields = check_positive_int(fields, "fields")
        group = as_group(group)
        channels = fields * group.order
        super().__init__(channels, fields, kernel_size, group, stride, padding, padding_mode, bias, channels, basis)
        self.fields = fields
        self.in_fields = fields
        self._create_weight((fields, self.basis_size), device, dtype)

    def _place(self, ids: torch.Tensor) -> torch.Tensor:
        full = self._element_positions(ids)  # (F, Q, k, k) -> (F, order, k, k)
        return full.reshape(self.out_channels, 1, self.kernel_size, self.kernel_size)

    def _channel_description(self) -> str:
        return f"{self.in_channels} channels (fields={self.fields} x {self.group.order})"

    def _in_repr(self) -> str:
        return f"fields={self.fields}"
