"""quant.prepare(relu6="keep"): DFQ that keeps ReLU6 (no equalization across it; its clip at 6 is the top of the
quantization range) instead of replacing it by ReLU."""
import copy
import math

import pytest
import scipy.integrate
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv
from quant.transforms import _expected_relu


def _clipping_model(seed: int, group: str | None = "C4") -> nn.Module:
    """A small exported MobileNetV2 whose batch-norm outputs are ~N(2, 3.5^2): many activations pass 6."""
    torch.manual_seed(seed)
    model = mobilenet.mobilenet_v2(group=group, width_mult=0.35)
    model = rotconv.randomize_batchnorm(model, torch.randn(8, 3, 95, 95), weight=(2.0, 5.0), bias=(1.0, 3.0))
    return model.export().eval() if group is not None else model.eval()


@pytest.mark.parametrize("group", ["C4", None])
def test_keeping_relu6_leaves_the_float_function_unchanged(group):
    # float64: only the transformations, not rounding, can differ. Without bias correction (which adapts the
    # biases to quantized weights) "keep" is the original function; "replace" is not, on this model whose
    # activations pass 6 -- which shows the test can fail.
    model = copy.deepcopy(_clipping_model(0, group)).double()
    x = torch.randn(2, 3, 95, 95, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        kept = quant.prepare(model, group, bias_correction=False, relu6="keep")
        replaced = quant.prepare(model, group, bias_correction=False, relu6="replace")
        assert any(isinstance(m, nn.ReLU6) for m in kept.modules())
        assert not any(isinstance(m, nn.ReLU6) for m in replaced.modules())
        assert ((kept(x) - reference).norm() / reference.norm()).item() < 1e-10
        assert ((replaced(x) - reference).norm() / reference.norm()).item() > 1e-3


def test_plan_ranges_end_at_the_clip():
    prepared = quant.prepare(_clipping_model(1), "C4", relu6="keep")
    plan = quant.plan_quantization(prepared)
    tops = [plan.points[name] for name in plan.fused.values()]  # every fused activation here is a ReLU6
    assert len(tops) > 10 and all(high <= 6.0 for _, high in tops)
    assert sum(high == 6.0 for _, high in tops) > len(tops) // 2  # the data-free range would have passed 6


@settings(max_examples=60, deadline=None)
@given(beta=st.floats(-4.0, 10.0), gamma=st.floats(0.1, 5.0))
def test_expected_clipped_input_matches_numerical_integration(beta, gamma):
    # bias correction behind a ReLU6 uses E[clip(z, 0, 6)] = E[relu(z)] - E[relu(z - 6)] for z ~ N(beta, gamma^2).
    # The reference integrates clip(z, 0, 6) against the normal density (breaks at the kinks 0 and 6, +-40 sigma:
    # the tails beyond weigh < 1e-300). A Monte Carlo mean is no reference here: where nearly every sample is
    # clipped (beta = 6.5, gamma = 0.1) its sample standard error is far below its true error.
    def integrand(z: float) -> float:
        return min(max(z, 0.0), 6.0) * math.exp(-0.5 * ((z - beta) / gamma) ** 2) / (gamma * math.sqrt(2 * math.pi))

    low, high = beta - 40 * gamma, beta + 40 * gamma
    reference, error = scipy.integrate.quad(integrand, low, high, points=[p for p in (0.0, 6.0) if low < p < high],
                                            epsabs=1e-13, epsrel=1e-12, limit=200)
    b, g = torch.tensor([beta], dtype=torch.float64), torch.tensor([gamma], dtype=torch.float64)
    expected = (_expected_relu(b, g) - _expected_relu(b - 6.0, g)).item()
    assert error < 1e-10
    # the closed form in float64 and quad agreed to 4e-14 at worst over 3,000 random (beta, gamma) of this range
    assert abs(expected - reference) <= 1e-12, (expected, reference)


def test_high_bias_is_not_absorbed_across_a_relu6():
    model = _clipping_model(2, None).double()
    folded = quant.fold_batchnorm(model)
    absorbed = quant.absorb_high_bias(folded)
    x = torch.randn(2, 3, 95, 95, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(absorbed(x), folded(x), rtol=1e-10, atol=1e-10)
    for before, after in zip(quant.graph.conv_pairs(folded), quant.graph.conv_pairs(absorbed)):
        assert torch.equal(before.first.bias, after.first.bias)


def test_equalize_leaves_relu6_pairs_and_equalizes_relu_pairs():
    # equalize(keep_relu6=True) equalizes the ReLU pairs of a mixed network and leaves the ReLU6 pairs alone
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([1.0, 10.0, 0.1, 3.0]).reshape(-1, 1, 1, 1))
        net[2].weight.mul_(torch.tensor([5.0, 0.2, 1.0, 7.0]).reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="replace_relu6"):
        quant.equalize(net)
    equalized = quant.equalize(net, keep_relu6=True)
    assert not torch.equal(equalized.get_submodule("0").weight, net[0].weight)  # ReLU pair: equalized
    assert torch.equal(equalized.get_submodule("4").weight, net[4].weight)  # behind the ReLU6: untouched
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(equalized(x), net(x), rtol=1e-5, atol=1e-6)
