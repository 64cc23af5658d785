import io

import pytest
import torch
from hypothesis import given, strategies as st

import mobilenet
import rotconv
from conftest import smooth_masked_input


@pytest.fixture(scope="module")
def models():
    built = {}
    for N in (None, 4, 8, 12):
        torch.manual_seed(N or 0)
        group = None if N is None else rotconv.CyclicGroup(N)
        model = mobilenet.mobilenet_v2(group=group)
        # Random affine BN parameters and BN statistics measured on random inputs, so that in eval mode the
        # network is a generic, input-dependent function (not saturated to a constant, which would be
        # trivially invariant).
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
                    module.momentum = None  # cumulative average
            model.classifier[1].weight.normal_()
            model.train()
            for _ in range(2):
                model(torch.randn(8, 3, 95, 95))
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(8, 3, 95, 95))
        assert logits.std(dim=0).min() > 1e-3 * logits.abs().max(), "degenerate test network"
        built[N] = model
    return built


@pytest.mark.parametrize("N", [4, 8, 12])
def test_logits_invariant_to_quarter_turns(models, N):
    # float32 through ~50 layers: rounding only (different summation order after rotation), < 1e-5.
    group = rotconv.CyclicGroup(N)
    x = torch.randn(2, 3, 95, 95)
    for k in group.exact_elements():
        assert rotconv.equivariance_error(models[N], group, x, k, out_fields=False) < 1e-5


def test_conventional_model_is_not_invariant(models):
    group = rotconv.CyclicGroup(4)
    x = torch.randn(2, 3, 95, 95)
    assert rotconv.equivariance_error(models[None], group, x, 1, out_fields=False) > 1e-2


def test_thirty_degree_error_is_bounded_on_smooth_masked_inputs(models):
    # 30 degrees is not a grid symmetry: interpolation of the input (~1% at 2 px smoothing) and filter
    # aliasing (about 3% for a 3-layer stack, docs/theory.md) compound over ~50 layers of a random network.
    # Measured on random weights: 12-14% (default init), 27% (this fixture's random BN affines); the
    # conventional network: 40-110%. Bound: 35%, and at most half the conventional model's error.
    group = rotconv.CyclicGroup(12)
    x = smooth_masked_input(4, 3, 95, sigma=2.0, seed=0, dtype=torch.float32)
    equivariant = rotconv.equivariance_error(models[12], group, x, 1, out_fields=False)
    conventional = rotconv.equivariance_error(models[None], group, x, 1, out_fields=False)
    assert equivariant < 0.35
    assert equivariant < conventional / 2


@pytest.mark.parametrize("N", [None, 12])
def test_export_matches_model_and_is_plain(models, N):
    model = models[N]
    plain = model.export()
    kinds = {type(m) for m in plain.modules()}
    assert not any(issubclass(k, (rotconv.SteerableConv2d, rotconv.GroupBatchNorm2d)) for k in kinds)
    x = torch.randn(2, 3, 95, 95)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5, rtol=1e-4)
    exported_program = torch.export.export(plain, (x,))
    with torch.no_grad():
        assert torch.allclose(exported_program.module()(x), model(x), atol=1e-5, rtol=1e-4)


def test_macs_match_and_params_shrink(models):
    conventional = mobilenet.summary(models[None])
    equivariant = mobilenet.summary(models[12])
    assert abs(equivariant.macs / conventional.macs - 1) < 0.02
    assert equivariant.params < conventional.params / 5  # shared, steerable filters
    assert abs(equivariant.exported_params / conventional.exported_params - 1) < 0.05


@pytest.mark.parametrize("N", [None, 12])
def test_state_dict_round_trip(models, N):
    buffer = io.BytesIO()
    torch.save(models[N].state_dict(), buffer)
    buffer.seek(0)
    fresh = mobilenet.mobilenet_v2(group=None if N is None else rotconv.CyclicGroup(N)).eval()
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 3, 95, 95)
    with torch.no_grad():
        assert torch.equal(fresh(x), models[N](x))


@pytest.mark.parametrize("N", [None, 4])
def test_training_steps_lower_the_loss(N):
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=None if N is None else rotconv.CyclicGroup(N), width_mult=0.5, dropout=0.0)
    x, y = torch.randn(8, 3, 95, 95), torch.tensor([0, 1] * 4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 96, 96), "crop 96x96"),
    ((1, 3, 93, 93), r"expected \(B, 3, 95, 95\)"),
    ((1, 1, 95, 95), r"expected \(B, 3, 95, 95\)"),
    ((3, 95, 95), r"expected \(B, 3, 95, 95\)"),
])
def test_wrong_inputs_raise(models, shape, message):
    with pytest.raises(ValueError, match=message):
        models[12](torch.randn(*shape))


@pytest.mark.parametrize("kwargs, name", [
    (dict(input_size=96), "input_size"), (dict(num_classes=0), "num_classes"),
    (dict(activation="gelu"), "activation"), (dict(group=12), "group"), (dict(width_mult=0), "width_mult"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mobilenet.mobilenet_v2(**kwargs)


@given(N=st.sampled_from([4, 12]), input_size=st.sampled_from([31, 47, 63]))
def test_other_odd_input_sizes_stay_invariant(N, input_size):
    torch.manual_seed(input_size)
    group = rotconv.CyclicGroup(N)
    model = mobilenet.mobilenet_v2(group=group, input_size=input_size, width_mult=0.35).eval()
    x = torch.randn(1, 3, input_size, input_size)
    assert rotconv.equivariance_error(model, group, x, N // 4, out_fields=False) < 1e-5
