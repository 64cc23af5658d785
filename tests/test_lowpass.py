"""Anti-aliased strided convs (rotconv.lowpass) and the MobileNetV2 built with them (antialias=True)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mobilenet
import quant
import rotconv


def blur_then_conv(x: torch.Tensor, conv: rotconv.LowpassConv2d) -> torch.Tensor:
    """The definition, computed the long way: zero-extend the input, blur it with the binomial filter ('valid'),
    then the k x k conv with the learned weight, the stride and no further padding."""
    channels = x.shape[1]
    padded = F.pad(x, (conv.padding + 1,) * 4)
    kernel = rotconv.binomial_filter(x.dtype).expand(channels, 1, 3, 3)
    blurred = F.conv2d(padded, kernel, groups=channels)
    return F.conv2d(blurred, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)


def test_binomial_filter_is_a_normalised_d4_symmetric_low_pass():
    b = rotconv.binomial_filter()
    assert b.sum() == 1.0
    for k in range(4):
        assert torch.equal(torch.rot90(b, k), b)
    assert torch.equal(b.flip(-1), b)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert (b * signs).sum() == 0 and (b * signs[:, None]).sum() == 0  # no response at the Nyquist frequency


@settings(max_examples=25, deadline=None)
@given(in_per_group=st.integers(1, 3), out_per_group=st.integers(1, 3), groups=st.integers(1, 3),
       kernel_size=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), padding=st.integers(0, 2),
       size=st.integers(7, 16), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lowpass_conv_is_blur_then_conv_and_exports_exactly(in_per_group, out_per_group, groups, kernel_size, stride,
                                                            padding, size, bias, seed):
    # float64: the two computations sum the same products in different orders; ~25 k^2 C terms of size ~1
    # stay within 1e-12 of each other.
    torch.manual_seed(seed)
    conv = rotconv.LowpassConv2d(in_per_group * groups, out_per_group * groups, kernel_size, stride, padding, groups,
                                 bias=bias).double()
    x = torch.randn(2, in_per_group * groups, size, size, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
        reference = nn.Conv2d(in_per_group * groups, out_per_group * groups, kernel_size, stride, padding,
                              groups=groups).double()(x)
        assert y.shape == reference.shape  # the output size of the k x k conv
        assert torch.allclose(y, blur_then_conv(x, conv), rtol=0, atol=1e-12)
        plain = conv.export()
        assert type(plain) is nn.Conv2d and plain.kernel_size == (kernel_size + 2,) * 2
        assert torch.equal(plain(x), y)


def test_lowpass_conv_removes_the_nyquist_pattern_and_learns():
    # Whatever the weights, a column-alternating pattern (the frequency a stride of 2 aliases onto the constant)
    # gives zero away from the border; a plain conv's response to it is of the order of the input.
    torch.manual_seed(0)
    conv = rotconv.LowpassConv2d(2, 4, 3, padding=1).double()
    stripes = (-1.0) ** torch.arange(12, dtype=torch.float64)
    x = stripes.expand(1, 2, 12, 12).clone()
    with torch.no_grad():
        y = conv(x) - conv.bias.view(1, -1, 1, 1)
    assert y[..., 2:-2, 2:-2].abs().max() < 1e-12
    loss = conv(torch.randn(1, 2, 8, 8, dtype=torch.float64)).square().sum()
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_lowpass_conv_checks_its_arguments():
    with pytest.raises(ValueError, match="groups"):
        rotconv.LowpassConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="padding"):
        rotconv.LowpassConv2d(4, 4, 3, padding=-1)
    with pytest.raises(ValueError, match="basis"):
        rotconv.lowpass_basis("3x3")


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_lowpass_basis_blurs_and_commutes_with_its_rotations(kernel_size):
    # Rotating the blurred basis in coefficient space is blurring the rotated basis (both are linear maps of
    # the same coefficients); a quarter turn is still rot90 of the sampled functions (b is D4-symmetric).
    basis = rotconv.steerable_basis(kernel_size)
    blurred = rotconv.lowpass_basis(basis)
    assert blurred is rotconv.lowpass_basis(basis)  # cached: layers share one rotated basis
    assert blurred.kernel_size == kernel_size + 2 and blurred.size == basis.size
    b = rotconv.binomial_filter().numpy()
    for function, original in zip(blurred.functions, basis.functions):
        expected = sum(b[i, j] * np.pad(original, ((i, 2 - i), (j, 2 - j))) for i in range(3) for j in range(3))
        assert np.allclose(function, expected, rtol=0, atol=1e-15)
    for angle in (0.3, math.pi / 6, 2.0):
        rotated = torch.from_numpy(basis.rotated(angle))
        blurred_rotated = rotconv.lowpass_basis(basis).rotated(angle)
        reference = torch.nn.functional.conv2d(rotated[:, None], rotconv.binomial_filter().view(1, 1, 3, 3),
                                               padding=2)[:, 0]
        assert np.allclose(blurred_rotated, reference.numpy(), rtol=0, atol=1e-14)
    quarter = blurred.rotated(math.pi / 2)
    assert np.allclose(quarter, np.rot90(blurred.functions, 1, axes=(-2, -1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", [None, "C4", "C12", "D4"])
def test_antialiased_mobilenet_blurs_exactly_its_strided_layers(group):
    # The strided layers (stem, first block of the 24- and 32-channel stages) become 5x5, with the parameters
    # of the plain model; the MACs grow by 16/9 of theirs; nothing else changes.
    kwargs = {} if group is None else {"group": group}
    torch.manual_seed(0)
    plain = mobilenet.mobilenet_v2(width_mult=0.5, **kwargs)
    blurred = mobilenet.mobilenet_v2(width_mult=0.5, antialias=True, **kwargs)
    assert blurred.arguments()["antialias"] is True and "antialias" not in plain.arguments()
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    convs = (nn.Conv2d, rotconv.SteerableConv2d, rotconv.LowpassConv2d)
    pairs = [(a, b) for a, b in zip(plain.modules(), blurred.modules()) if isinstance(a, convs)]
    strided = [(a, b) for a, b in pairs if a.stride in (2, (2, 2))]
    assert len(strided) == 3
    for a, b in pairs:
        k = a.kernel_size if isinstance(a.kernel_size, int) else a.kernel_size[0]
        if (a, b) in strided:
            assert isinstance(b, rotconv.LowpassConv2d if group is None else rotconv.SteerableConv2d)
            assert (b.kernel_size + (2 if group is None else 0)) == k + 2
        else:
            assert type(b) is type(a) and b.kernel_size == a.kernel_size
    added = 0
    for a, b in strided:
        outputs = {}
        hook = a.register_forward_hook(lambda m, i, o: outputs.update(n=o.numel()))
        plain.eval()(torch.zeros(1, 3, 95, 95))
        hook.remove()
        added += outputs["n"] * a.in_channels // a.groups * (25 - 9)
    assert rotconv.summary(blurred).macs - rotconv.summary(plain).macs == added


@pytest.mark.parametrize("N, backend", [(4, "qnnpack"), (12, "qnnpack"), (12, None)])
def test_antialiased_int8_logits_are_bit_exactly_invariant_to_quarter_turns(N, backend):
    # The blurred filter banks keep the exact rot90 structure, so the INT8 argument of the plain model holds
    # (tests/test_quant.py): identical integer feature maps up to rotation, identical logits. backend None:
    # the library's default for this CPU, which promises exactness.
    torch.manual_seed(N)
    model = mobilenet.mobilenet_v2(group=N, width_mult=0.5, antialias=True)
    model = rotconv.randomize_batchnorm(model, torch.randn(16, 3, 95, 95), bias=(-0.3, 0.5))
    options = {} if backend is None else {"backend": backend}
    int8 = quant.dfq(model.export(), group=N, mode="int8", input_range=(-1.0, 1.0), **options)
    x = 3 * torch.randn(3, 3, 95, 95)
    logits = int8(x)
    assert logits.abs().max() > 0
    group = rotconv.CyclicGroup(N)
    for k in group.exact_elements():
        assert torch.equal(int8(group.rotate(x, k, regular=False)), logits), k


def test_quantization_asks_for_the_export_of_an_antialiased_model():
    model = mobilenet.mobilenet_v2(antialias=True).eval()
    with pytest.raises(ValueError, match="export"):
        quant.dfq(model, mode="int8")
    assert not any(isinstance(m, rotconv.LowpassConv2d) for m in model.export().modules())
