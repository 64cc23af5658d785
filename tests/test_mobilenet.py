import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import mobilenet
import rotconv
from conftest import smooth_masked_input
from mobilenet.model import ConvNormActivation, _EquivariantLayers, _PlainLayers


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
            model.classifier[1].weight.normal_()
        rotconv.randomize_batchnorm(model, [torch.randn(8, 3, 95, 95) for _ in range(2)])
        with torch.no_grad():
            logits = model(torch.randn(8, 3, 95, 95))
        assert logits.std(dim=0).min() > 1e-3 * logits.abs().max(), "degenerate test network"
        built[N] = model
    return built


@pytest.mark.parametrize("N", [4, 8, 12])
def test_logits_invariant_to_quarter_turns(models, N):
    # Exact grid symmetry, so only rounding remains. Checked in float64 (eps 1.1e-16): ~50 layers of sums
    # of up to ~1e4 products, amplified by random BN statistics, stay far below 1e-10 (measured ~1e-14).
    # In float32 the same network measures 2e-6..7e-6, too close to any fixed bound to prove anything.
    group = rotconv.CyclicGroup(N)
    model = copy.deepcopy(models[N]).double()
    x = torch.randn(2, 3, 95, 95, dtype=torch.float64)
    for k in group.exact_elements():
        assert rotconv.equivariance_error(model, group, x, k, output_regular=False) < 1e-10


@pytest.mark.parametrize("group, options", [
    ("C4", dict(group_pool="sort")), ("D4", dict(group_pool="sort")),  # every order statistic of each field
    ("C12", dict(min_fields=3)), ("D4", dict(min_fields=3)),  # the narrow layers widened
    ("C12", dict(depthwise="field")), ("D4", dict(depthwise="field")),  # field-wise spatial convs
    ("C12", dict(antialias=True)), ("D4", dict(antialias=True)),  # low-pass before every stride
])
def test_model_variant_is_invariant_exports_and_round_trips(group, options, tmp_path):
    # Architecture options of an equivariant model: still invariant to float64 rounding under the grid's
    # symmetries (bound as above), the export computes the same function, and mobilenet.save/load rebuilds
    # the variant.
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=group, width_mult=0.35, **options)
    if options.get("group_pool") == "sort":  # the classifier sees every channel, not 1/|G| of them
        assert model.classifier[1].in_features == model.features[-1][0].out_channels
    with torch.no_grad():
        model.classifier[1].weight.normal_()
    rotconv.randomize_batchnorm(model, torch.randn(8, 3, 95, 95))
    model = model.eval().double()
    g = rotconv.as_group(group)
    x = torch.randn(2, 3, 95, 95, dtype=torch.float64)
    for element in g.exact_elements():
        assert rotconv.equivariance_error(model, g, x, element, output_regular=False) < 1e-10, element
    with torch.no_grad():
        assert torch.allclose(model.export()(x), model(x), rtol=0, atol=1e-10)
        mobilenet.save(model.float(), str(tmp_path / "model.pt"))
        loaded = mobilenet.load(str(tmp_path / "model.pt"))
        assert all(getattr(loaded, name) == value for name, value in options.items())
        assert torch.equal(loaded(x.float()), model(x.float()))


@settings(max_examples=10)  # two full-size model builds per example
@given(group=st.sampled_from(["C4", "C12", "D4", "D12"]), min_fields=st.integers(1, 4),
       width_mult=st.sampled_from([0.35, 1.0]))
def test_min_fields_widens_only_the_narrow_layers(group, min_fields, width_mult):
    # Every field count is max(min_fields, what min_fields=1 gives): layers that had at least min_fields fields
    # are untouched, and no layer has fewer. Counted on the batch norms (one per conv, in order).
    def field_counts(model):
        return [m.fields for m in model.modules() if isinstance(m, rotconv.GroupBatchNorm2d)]
    base = field_counts(mobilenet.mobilenet_v2(group=group, width_mult=width_mult))
    wide = mobilenet.mobilenet_v2(group=group, width_mult=width_mult, min_fields=min_fields)
    assert field_counts(wide) == [max(min_fields, fields) for fields in base]
    assert wide.arguments()["min_fields"] == min_fields


def test_conventional_model_is_not_invariant(models):
    group = rotconv.CyclicGroup(4)
    x = torch.randn(2, 3, 95, 95)
    assert rotconv.equivariance_error(models[None], group, x, 1, output_regular=False) > 1e-2


def test_thirty_degree_error_is_bounded_on_smooth_masked_inputs(models):
    # 30 degrees is not a grid symmetry: interpolation of the input (~1% at 2 px smoothing) and filter
    # aliasing (about 3% for a 3-layer stack, docs/theory.md) compound over ~50 layers of a random network.
    # Measured on random networks (rotconv.randomize_batchnorm, seeds 0-3): 10-32% for C_12. Bound: 35%.
    # (The conventional network is no reference here: an untrained one with a disc-masked average pool
    # gives 11-43% on the same inputs, so no ordering between the two holds for every random draw.)
    group = rotconv.CyclicGroup(12)
    x = smooth_masked_input(4, 3, 95, sigma=2.0, seed=0, dtype=torch.float32)
    assert rotconv.equivariance_error(models[12], group, x, 1, output_regular=False) < 0.35


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
    (dict(activation="gelu"), "activation"), (dict(group="P4M"), "group"), (dict(group=0), "group"),
    (dict(width_mult=0), "width_mult"), (dict(group=4, group_pool="median"), "group_pool"),
    (dict(group_pool="sort"), "group_pool"),  # the conventional model has no group to pool over
    (dict(group=12, min_fields=0), "min_fields"), (dict(group=12, min_fields=1.5), "min_fields"),
    (dict(min_fields=2), "min_fields"),  # the conventional model has no fields
    (dict(group=4, depthwise="full"), "depthwise"), (dict(depthwise="field"), "depthwise"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mobilenet.mobilenet_v2(**kwargs)


def test_group_may_be_given_as_its_order():
    torch.manual_seed(0)
    by_order = mobilenet.mobilenet_v2(group=4, width_mult=0.35)
    torch.manual_seed(0)
    by_object = mobilenet.mobilenet_v2(group=rotconv.CyclicGroup(4), width_mult=0.35)
    assert by_order.group == rotconv.CyclicGroup(4)
    for (name, a), (_, b) in zip(by_order.state_dict().items(), by_object.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("N", [None, 12])
def test_exported_model_is_scriptable(models, N):
    # torch.jit.script compiles the exported network (no torch.fx checks on the scripted path); the scripted
    # module computes the same logits bit for bit (same kernels, same order) and saves/loads.
    plain = models[N].export().eval()
    scripted = torch.jit.script(plain)
    x = torch.randn(2, 3, 95, 95)
    with torch.no_grad():
        assert torch.equal(scripted(x), plain(x))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's deprecation notice
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


@pytest.mark.parametrize("N, exported", [(None, False), (None, True), (4, True), (12, True)])
def test_traced_model_records_no_tracer_notes_from_the_input_checks(models, N, exported):
    # torch.jit.trace freezes the input shape into the trace, so the modules' input checks are skipped while it
    # records (they would only print TracerWarnings, one per shape comparison); the traced module computes the
    # same logits, and the model itself still checks its input afterwards.
    model = (models[N].export() if exported else copy.deepcopy(models[N])).eval()
    x = torch.randn(2, 3, 95, 95)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
            and any(f"{package}{os.sep}" in w.filename for package in ("rotconv", "mobilenet"))]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    with pytest.raises(ValueError, match="input: expected"):
        model(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("N", [4, 12])
def test_eager_equivariant_model_traces_with_its_filter_expansion(models, N):
    # In eval mode the eager model expands its filters once and caches them; a trace records the expansion
    # instead (else torch.jit.trace's checking second trace finds a different graph and refuses), so the traced
    # module follows its coefficients: changed after tracing, its logits change like the model's. (The trace
    # freezes the input size, and says so for the size-dependent padding; export() is the deployable form.)
    model = copy.deepcopy(models[N]).eval()
    x = torch.randn(2, 3, 95, 95)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
        before = model(x)
        assert torch.equal(traced(x), before)
        conv = next(m for m in model.modules() if isinstance(m, rotconv.SteerableConv2d))
        conv.weight.mul_(1.5)
        changed = model(x)
        assert not torch.equal(changed, before)
        assert torch.equal(traced(x), changed)


@given(N=st.sampled_from([4, 12]), input_size=st.sampled_from([31, 47, 63]))
def test_other_odd_input_sizes_stay_invariant(N, input_size):
    torch.manual_seed(input_size)
    group = rotconv.CyclicGroup(N)
    model = mobilenet.mobilenet_v2(group=group, input_size=input_size, width_mult=0.35).eval()
    x = torch.randn(1, 3, input_size, input_size)
    assert rotconv.equivariance_error(model, group, x, N // 4, output_regular=False) < 1e-5


@pytest.mark.parametrize("group", [None, "C12", "D4"])
def test_strided_depthwise_blocks_and_only_they_train_in_float32_under_cpu_autocast(group):
    """The builder marks exactly the strided depthwise blocks (conventional and equivariant alike)."""
    model = mobilenet.mobilenet_v2(group=group) if group else mobilenet.mobilenet_v2()
    blocks = [m for m in model.modules() if isinstance(m, ConvNormActivation)]
    marked = [m for m in blocks if m.float32_under_cpu_autocast]
    for block in blocks:
        conv = block[0]
        depthwise = isinstance(conv, rotconv.DepthwiseGroupConv2d) or (isinstance(conv, nn.Conv2d) and conv.groups > 1)
        stride = conv.stride if isinstance(conv.stride, int) else conv.stride[0]
        assert block.float32_under_cpu_autocast == (depthwise and stride > 1), block
    assert len(marked) == 2  # 95x95: the depthwise convs of the first 24- and 32-channel blocks have stride 2
    exported = model.export() if group else model
    assert sum(getattr(m, "float32_under_cpu_autocast", False) for m in exported.modules()) == len(marked)


@settings(max_examples=6, deadline=None)
@given(group=st.sampled_from([None, "C4", "D4"]), size=st.sampled_from([15, 23]), seed=st.integers(0, 2**16))
def test_float32_block_under_autocast_is_the_float32_block(group, size, seed):
    """Under CPU bf16 autocast a marked block computes in float32: bit-identical to its float32 forward on the
    same (float32) input, float32 output and gradients; other blocks give bf16 as autocast decides."""
    torch.manual_seed(seed)
    layers = _PlainLayers() if group is None else _EquivariantLayers(rotconv.as_group(group))
    channels = layers.width(8)
    block = ConvNormActivation(layers.depthwise(channels, 3, 2, size), layers.norm(channels), nn.ReLU6,
                               float32_under_cpu_autocast=True).train()
    plain = ConvNormActivation(layers.depthwise(channels, 3, 2, size), layers.norm(channels), nn.ReLU6).train()
    x = torch.randn(3, channels, size, size, requires_grad=True)
    reference = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        assert plain(x).dtype == torch.bfloat16  # unmarked: autocast's bf16 conv
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    out.square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_field_wise_depthwise_mixes_each_field_and_costs_order_times_the_macs(group):
    # depthwise="field": every block's spatial conv is a GroupConv2d with groups=fields (a field's channels
    # mixed by one regular-to-regular filter, no field seeing another), order x the depthwise conv's MACs;
    # every other layer is the same as in the channel-wise model.
    g = rotconv.as_group(group)
    channel = mobilenet.mobilenet_v2(group=group, width_mult=0.35)
    field = mobilenet.mobilenet_v2(group=group, width_mult=0.35, depthwise="field")
    spatial = [m for m in field.modules() if isinstance(m, rotconv.GroupConv2d) and m.kernel_size == 3]
    assert spatial and all(m.groups == m.in_fields == m.out_fields for m in spatial)
    assert not any(isinstance(m, rotconv.DepthwiseGroupConv2d) for m in field.modules())
    depthwise_macs, field_macs = _spatial_macs(channel), _spatial_macs(field)
    assert field_macs == g.order * depthwise_macs
    assert rotconv.summary(field, 95).macs - field_macs == rotconv.summary(channel, 95).macs - depthwise_macs


def _spatial_macs(model):
    """MACs of the blocks' 3x3 convs on one 95x95 input: outputs x (input channels per group) x 9."""
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, out: macs.append(out.numel() * m.in_channels // m.groups * 9))
             for m in model.modules()
             if isinstance(m, (rotconv.GroupConv2d, rotconv.DepthwiseGroupConv2d)) and m.kernel_size == 3]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 95, 95))
    for hook in hooks:
        hook.remove()
    assert len(macs) == len(hooks) > 0
    return sum(macs)
