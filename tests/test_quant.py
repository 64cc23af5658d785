import copy
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

from int8_engines import available, engine_params, needs_engines
import mobilenet
import quant
import rotconv


def calibrated(model: nn.Module, shape=(16, 3, 95, 95), seed: int = 0) -> nn.Module:
    """Random affine BN parameters, BN statistics measured on random inputs, eval mode."""
    torch.manual_seed(seed)
    return rotconv.randomize_batchnorm(model, torch.randn(*shape), bias=(-0.3, 0.5))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def exported():
    models = {}
    for N in (4, 12):
        model = calibrated(mobilenet.mobilenet_v2(group=rotconv.CyclicGroup(N), width_mult=0.5), seed=N)
        models[N] = model.export()
    return models


@pytest.mark.parametrize("N", [4, 12])
def test_fold_relu_equalize_absorb_preserve_the_function(exported, N):
    # float64, so that only the transformations (not float32 rounding through ~50 layers) can differ
    model = copy.deepcopy(exported[N]).double()
    x = torch.randn(4, 3, 95, 95, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        folded = quant.fold_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert relative(folded(x), reference) < 1e-10
        relu = quant.replace_relu6(folded)
        equalized = quant.equalize(relu, group=N)
        assert relative(equalized(x), relu(x)) < 1e-10
        absorbed = quant.absorb_high_bias(equalized)
        assert relative(absorbed(x), equalized(x)) < 1e-10


def test_equalized_ranges_are_equal(exported):
    equalized = quant.equalize(quant.replace_relu6(quant.fold_batchnorm(exported[4])))
    dfq_steps = quant.transforms
    pairs = quant.graph.conv_pairs(equalized)
    assert len(pairs) > 10
    for pair in pairs:
        r1 = dfq_steps._output_ranges(pair.first)
        r2 = dfq_steps._input_ranges(pair.second)
        assert torch.allclose(r1, r2, rtol=1e-3), (pair.first_name, pair.second_name)


def test_high_bias_absorption_is_exact_above_the_threshold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].bias.fill_(5.0)  # beta - 3 gamma = 2 > 0: that much bias can move to the next layer
    x = 0.01 * torch.randn(2, 3, 9, 9)  # pre-activations stay near beta = 5, above the threshold
    folded = quant.fold_batchnorm(model)
    absorbed = quant.absorb_high_bias(folded)
    first = [m for m in absorbed.modules() if isinstance(m, nn.Conv2d)][0]
    assert torch.all(first.bias < [m for m in folded.modules() if isinstance(m, nn.Conv2d)][0].bias - 1.0)
    with torch.no_grad():
        assert relative(absorbed(x), model(x)) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dfq_rescues_a_network_that_breaks_naive_int8(seed):
    # One channel's weights x100, compensated in the next layer: the FP32 function is unchanged, but
    # per-tensor INT8 ranges are then set by that channel and the others quantize to almost nothing.
    # Measured as the relative logit error (argmax accuracy depends on how varied a random network's
    # predictions happen to be). Seeds 0-4: naive 17-75%, DFQ 0.2-0.8% (the same as on the unscaled network).
    torch.manual_seed(seed)
    model = calibrated(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)), shape=(64, 3, 15, 15), seed=seed)
    folded = quant.replace_relu6(quant.fold_batchnorm(model))
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        convs[0].weight[0] *= 100
        convs[0].bias[0] *= 100
        convs[0].dfq_gamma[0] *= 100
        convs[0].dfq_beta[0] *= 100
        convs[1].weight[:, 0] /= 100
    x = torch.randn(512, 3, 15, 15)
    with torch.no_grad():
        expected = model(x)
        assert relative(folded(x), expected) < 1e-5
        naive = relative(quant.quantize(folded, mode="simulated")(x), expected)
        rescued = relative(quant.dfq(folded, mode="simulated")(x), expected)
        reference = relative(quant.dfq(quant.fold_batchnorm(model), mode="simulated")(x), expected)
    assert rescued < 0.02  # 8-bit per-tensor error of a well-conditioned 2-layer net: ~0.5%
    assert rescued <= 1.5 * reference  # equalization undid the x100 (both nets equalize to the same ranges)
    assert naive > 10 * rescued


@pytest.mark.parametrize("N", [4, 12])
def test_field_shared_equalization_keeps_exact_equivariance(exported, N):
    group = rotconv.CyclicGroup(N)
    prepared = quant.replace_relu6(quant.fold_batchnorm(exported[N]))
    x = torch.randn(2, 3, 95, 95)
    shared = quant.equalize(prepared, group=N)
    assert rotconv.equivariance_error(shared, group, x, N // 4, output_regular=False) < 1e-5
    # the scales really are shared: the factor by which each output channel's filter norm changed is the
    # same for the N channels of a field (rows of a field are rotated/permuted copies of each other)
    before = dict(prepared.named_modules())
    checked = 0
    for name, module in shared.named_modules():
        if isinstance(module, nn.Conv2d) and name in before:
            ratio = module.weight.flatten(1).norm(dim=1) / before[name].weight.flatten(1).norm(dim=1)
            ratio = ratio.reshape(-1, N)
            assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4), name
            checked += (ratio.std() > 1e-3).item()
    assert checked > 0  # equalization did rescale something


@pytest.mark.parametrize("N", [4, 12])
def test_dfq_shares_scales_over_the_models_own_group_unless_told(exported, N):
    model = exported[N]
    assert quant.model_group(model) == rotconv.CyclicGroup(N)  # export() keeps the group it was built with
    assert quant.model_group(nn.Sequential(nn.Conv2d(3, 4, 3))) is None
    x = torch.randn(2, 3, 95, 95)
    # relu6="replace": MobileNetV2's pairs are equalized only once its ReLU6s are ReLUs
    default = quant.dfq(model, mode="simulated", relu6="replace")(x)
    for group in (N, f"C{N}", rotconv.CyclicGroup(N)):
        assert torch.equal(quant.dfq(model, group=group, mode="simulated", relu6="replace")(x), default)
    # a network that carries no group gets per-channel scales: for C_12 another quantized function (a field's
    # channels are 30-degree turns of each other, with other ranges), so the default above was the field-shared
    # one; for C_4 the same (a field's channels are exact quarter turns of each other, with equal ranges)
    anonymous = copy.deepcopy(model)
    anonymous.group = None
    assert quant.model_group(anonymous) is None
    assert torch.equal(quant.dfq(anonymous, mode="simulated", relu6="replace")(x), default) == (N == 4)
    for other in (2 if N == 4 else 4, f"D{N}"):
        wanted = rf"group: {rotconv.as_group(other)} given, but the model was built with C{N}"
        for call in (quant.dfq, quant.prepare, quant.equalize):
            with pytest.raises(ValueError, match=wanted):
                call(model, group=other)


@pytest.mark.parametrize("backend", engine_params("x86", "qnnpack"))
def test_int8_conv_stack_is_bit_exactly_equivariant(backend):
    # Integer accumulation is exact and the filters are bit-exact rot90 copies, so the int8 feature maps
    # of a rotated input are exactly the rotated feature maps (no float op in between).
    torch.manual_seed(0)
    group = rotconv.CyclicGroup(8)
    stack = nn.Sequential(rotconv.LiftingConv2d(3, 2, 5, group), rotconv.GroupBatchNorm2d(2, group), nn.ReLU(),
                          rotconv.DepthwiseGroupConv2d(2, 3, group, stride=2), rotconv.GroupBatchNorm2d(2, group),
                          nn.ReLU(), rotconv.GroupConv2d(2, 3, 1, group), rotconv.GroupBatchNorm2d(3, group))
    x = torch.randn(2, 3, 31, 31)
    stack = calibrated(stack, shape=(8, 3, 31, 31))
    int8 = quant.dfq(rotconv.export(stack, x), group=8, mode="int8", backend=backend)
    for k in group.exact_elements():
        assert torch.equal(int8(group.rotate(x, k, regular=False)), group.rotate(int8(x), k))


@pytest.mark.parametrize("backend, weight_scheme, relu6", [
    pytest.param(backend, weight_scheme, relu6, marks=needs_engines(backend)) for backend, weight_scheme, relu6 in (
        ("x86", "symmetric", "replace"), ("qnnpack", "asymmetric", "replace"), ("qnnpack", "symmetric", "replace"),
        ("x86", "symmetric", "keep"), ("qnnpack", "symmetric", "keep"))])
@pytest.mark.parametrize("N", [4, 12])
def test_int8_mobilenet_logits_are_bit_exactly_invariant_to_quarter_turns(exported, N, backend, weight_scheme, relu6):
    # int8 feature maps rotate bit-exactly (test above); the masked global pooling then sums the last int8
    # map in integers (order-independent, so exact), group max-pooling and the linear head see identical
    # inputs: the logits are bit for bit the same. Not x86 with asymmetric weights: fbgemm's GEMMs requantize
    # some rows (pixels) of a block differently when the weight zero point is not 0, so a rotated pixel can
    # come out one step apart (found by benchmarks.equivariance on PCam-like patches). relu6="keep" (no
    # equalization, ReLU6 clipped by the top of each range) keeps per-tensor scales and rot90-exact filters too.
    group = rotconv.CyclicGroup(N)
    # inputs 3x wider than the declared input range: activations leave their planned ranges, the int8
    # values use all 8 bits, and sums that could saturate int16 in fbgemm's depthwise kernels would appear
    int8 = quant.dfq(exported[N], group=N, mode="int8", backend=backend, weight_scheme=weight_scheme,
                     input_range=(-1.0, 1.0), relu6=relu6)
    torch.manual_seed(N)
    x = 3 * torch.randn(3, 3, 95, 95)
    logits = int8(x)
    assert logits.abs().max() > 0
    for k in group.exact_elements():
        assert torch.equal(int8(group.rotate(x, k, regular=False)), logits), k


def without_x86_engine(monkeypatch):
    """torch as an ARM build has it: int8 engines qnnpack and onednn, no x86 or fbgemm."""
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "onednn", "none"])


def test_the_default_int8_backend_is_one_this_torch_has(exported, monkeypatch):
    # x86 builds: the x86 engine; an ARM build has none, and a default of "x86" refused every call there
    assert quant.default_backend() in torch.backends.quantized.supported_engines
    assert quant.default_backend() == ("x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 95, 95)
    implicit = quant.dfq(exported[4], group=4, mode="int8")
    assert implicit.backend == quant.default_backend()
    assert torch.equal(implicit(x), quant.dfq(exported[4], group=4, mode="int8", backend=quant.default_backend())(x))
    without_x86_engine(monkeypatch)
    assert quant.default_backend() == "qnnpack"
    arm = quant.dfq(exported[4], group=4, mode="int8")
    assert arm.backend == "qnnpack"
    assert torch.equal(arm(x), quant.dfq(exported[4], group=4, mode="int8", backend="qnnpack")(x))
    # the simulation follows the same default (qnnpack: full 8-bit activations, no reduced range)
    assert torch.equal(quant.dfq(exported[4], group=4)(x), quant.dfq(exported[4], group=4, backend="qnnpack")(x))


def test_a_bad_backend_is_refused_before_the_work(exported):
    with pytest.raises(ValueError, match="^backend"):
        quant.dfq(exported[4], group=4, mode="int8", backend="arm")


@pytest.mark.parametrize("x86, avx2, because", [(True, False, "need AVX2, which this CPU lacks"),
                                                (False, False, "this torch build does not have it")])
def test_an_engine_torch_does_not_offer_is_refused_saying_why(exported, monkeypatch, x86, avx2, because):
    # An x86 CPU without AVX2 (Sandy Bridge) has no fbgemm, hence no x86 engine; an ARM build has neither. The
    # refusal names the argument, the reason and the engine to use instead.
    without_x86_engine(monkeypatch)
    monkeypatch.setattr(quant.int8, "is_x86", lambda: x86)
    monkeypatch.setattr(quant.int8, "has_avx2", lambda: avx2)
    quant.dfq(exported[4], group=4, backend="x86")  # the simulation needs no engine

    def work(*args, **kwargs):
        raise AssertionError("the work started before the engine was checked")

    monkeypatch.setattr(quant.pipeline, "prepare", work)
    monkeypatch.setattr(quant.pipeline, "plan_quantization", work)
    for backend, call in [(backend, call) for backend in ("x86", "fbgemm") for call in (quant.dfq, quant.quantize)]:
        with pytest.raises(ValueError) as raised:
            call(exported[4], mode="int8", backend=backend)
        message = str(raised.value)
        assert message.startswith(f"backend: the {backend!r} int8 engine is not available here"), message
        assert because in message and "torch offers qnnpack, onednn)" in message, message
        assert "use backend='qnnpack'" in message, message


@needs_engines("x86")
def test_an_x86_int8_file_on_a_torch_without_the_x86_engine_says_so(exported, tmp_path, monkeypatch):
    path = quant.save_int8(quant.dfq(exported[4], group=4, mode="int8", backend="x86"), str(tmp_path / "int8.pt"),
                           torch.zeros(1, 3, 95, 95))
    without_x86_engine(monkeypatch)
    with pytest.raises(ValueError) as raised:
        quant.load_int8(path)
    message = str(raised.value)
    assert message.startswith(path) and "'x86' int8 engine" in message and "backend='qnnpack'" in message


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.a(x)
        return y + self.b(y)


@pytest.mark.parametrize("backend", engine_params("x86", "qnnpack"))
def test_int8_matches_simulation(backend):
    # Same plan (scales, zero points) in both; remaining differences are the int32 bias rounding and the
    # kernels' requantization rounding: one quantization step here and there, < 1% relative.
    model = calibrated(_Residual(), shape=(16, 3, 9, 9))
    x = torch.randn(2, 3, 9, 9)
    folded = quant.fold_batchnorm(model)
    simulated = quant.quantize(folded, mode="simulated", backend=backend, calibration=[x])
    int8 = quant.quantize(folded, mode="int8", backend=backend, calibration=[x])
    with torch.no_grad():
        assert relative(int8(x), simulated(x)) < 0.01
        assert relative(simulated(x), folded(x)) < 0.1  # and both are close to FP32


def test_int8_model_is_four_times_smaller(exported):
    model = exported[12]
    int8 = quant.dfq(model, group=12, mode="int8", backend="qnnpack")
    sizes = []
    for network in (model, int8):
        buffer = io.BytesIO()
        torch.save(network.state_dict(), buffer)
        sizes.append(len(buffer.getvalue()))
    assert 3.3 < sizes[0] / sizes[1] < 4.5


@pytest.mark.parametrize("call, name", [
    (lambda m: quant.quantize(m, mode="fp16"), "mode"),
    (lambda m: quant.quantize(m, backend="onednn"), "backend"),
    (lambda m: quant.quantize(m, weight_bits=1), "weight_bits"),
    (lambda m: quant.equalize(m, group=0), "group"),
    (lambda m: quant.dfq(m, weight_scheme="per-channel"), "weight_scheme"),
    (lambda m: quant.dfq(m, relu6="clip"), "relu6"),
    (lambda m: quant.quantize(m), "fold the batch norms"),
])
def test_bad_arguments(exported, call, name):
    with pytest.raises(ValueError, match=name):
        call(exported[4])


@pytest.mark.parametrize("make", [
    lambda: mobilenet.mobilenet_v2(group=rotconv.CyclicGroup(4), width_mult=0.35),
    lambda: mobilenet.mobilenet_v2(width_mult=0.35, antialias=True),  # only LowpassConv2d to convert
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), rotconv.GroupBatchNorm2d(2, rotconv.CyclicGroup(4)), nn.ReLU()),
], ids=["steerable", "lowpass", "group-norm"])
def test_unexported_model_is_rejected(make):
    model = make().eval()
    exported = rotconv.export(model, torch.zeros(1, 3, 95, 95))
    assert rotconv.needs_export(model) and not rotconv.needs_export(exported)
    with pytest.raises(ValueError, match="export the network to plain torch.nn first"):
        quant.fold_batchnorm(model)
    quant.fold_batchnorm(exported)  # the exported copy is accepted


@settings(max_examples=30)
@given(in_channels=st.integers(1, 6), out_channels=st.integers(1, 8), kernel=st.sampled_from([1, 3, 5]),
       depthwise=st.booleans(), activation=st.sampled_from([None, nn.ReLU, nn.ReLU6]), stride=st.integers(1, 2),
       size=st.integers(5, 13),
       backend=st.sampled_from(available("x86", "qnnpack")), weight_scheme=st.sampled_from(["asymmetric", "symmetric"]),
       seed=st.integers(0, 2**16))
def test_int8_layer_is_within_one_step_of_the_simulation(in_channels, out_channels, kernel, depthwise, activation,
                                                          stride, size, backend, weight_scheme, seed):
    # On the same quantized input, simulated and int8 arithmetic differ only in the int32 rounding of the bias
    # (< half a step of the accumulator, scale_in * scale_w) and the requantization multiplier's float
    # rounding: far below one output step, so a rounded output moves by at most one step (qnnpack). The x86
    # engine hands some shapes to oneDNN, whose requantization rounds once more in between (found by this
    # test: up to two steps, for a small fraction of the outputs). A ReLU6 is fused like a ReLU, its clip at 6
    # being the top of the output range: the BN scale is raised so that it clips, and no output passes 6.
    torch.manual_seed(seed)
    if depthwise:
        out_channels = in_channels
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=in_channels if depthwise else 1)
    layers = [conv, nn.BatchNorm2d(out_channels)] + ([activation()] if activation else [])
    model = calibrated(nn.Sequential(*layers), shape=(8, in_channels, size, size), seed=seed)
    if activation is nn.ReLU6:
        with torch.no_grad():
            model[1].weight.mul_(8.0)
    x = torch.randn(3, in_channels, size, size)
    folded = quant.fold_batchnorm(model)
    simulated = quant.quantize(folded, mode="simulated", backend=backend, calibration=[x], weight_scheme=weight_scheme)
    int8 = quant.quantize(folded, mode="int8", backend=backend, calibration=[x], weight_scheme=weight_scheme)
    (quantized_conv,) = [m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    with torch.no_grad():
        steps = (int8(x) - simulated(x)).abs() / quantized_conv.scale
    assert steps.max().item() <= (1.0 if backend == "qnnpack" else 2.0) + 1e-3
    assert (steps > 1.5).float().mean().item() <= 0.05
    if activation is nn.ReLU6:
        assert int8(x).max().item() <= 6.0 + 1e-6


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([3, 5, 11, 23, 47, 95, 301]), channels=st.integers(1, 5), batch=st.integers(1, 3),
       scale=st.floats(1e-3, 1.0), zero_point=st.integers(0, 255), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_integer_pool_sums_exactly(size, channels, batch, scale, zero_point, channels_last, seed):
    # The limb-split float32 matmul must give the exact integer sum sum_p q_p w_p, so the pooled value equals
    # the float64 reference (integers below 2**53 are exact there) bit for bit, for every map size: 301x301
    # (90,601 pixels) exercises the float64 fallback (a one-bit limb would overflow float32's 2**24).
    from quant.int8 import IntegerMaskedGlobalAvgPool
    generator = torch.Generator().manual_seed(seed)
    pool = IntegerMaskedGlobalAvgPool(rotconv.MaskedGlobalAvgPool(size=size))
    q = torch.randint(0, 256, (batch, channels, size, size), generator=generator, dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(q, scale, zero_point)
    if channels_last:  # the layout the int8 convs write, which the pool reads without a copy
        x = x.contiguous(memory_format=torch.channels_last)
    integer = torch.round(rotconv.MaskedGlobalAvgPool(size=size).pool_weights.double() * 2**pool.WEIGHT_BITS)
    exact = (q.flatten(2).double() @ integer.flatten() - zero_point * integer.sum()) * (scale / 2**pool.WEIGHT_BITS)
    assert torch.equal(pool(x), exact.float())
    # and it is the masked average up to the weights' rounding: each weight moves by at most 2**-25, each
    # |q - z| <= 255, so the pooled value by at most pixels * 255 * scale * 2**-25 (plus float32 rounding)
    reference = rotconv.MaskedGlobalAvgPool(size=size)(x.dequantize())
    bound = size * size * 255 * scale * 2**-25
    assert torch.allclose(pool(x), reference, rtol=1e-5, atol=bound)


@needs_engines("x86")
def test_int8_x86_is_bit_exactly_invariant_where_onednn_was_not():
    # A found case (this random-BN C_12 network, the fifth-patch batch below, 270 degrees): with its dense
    # convs packed for oneDNN, as torch's x86 engine chooses for symmetric weights, a 1x1 projection conv
    # requantized two pixels one step differently from their rotated twins and the logits moved by 0.14.
    # quant.int8 packs dense convs for fbgemm on x86 (position-independent with symmetric weights).
    # Fails on the oneDNN packing; the random draws reproduce the case exactly (seeded, same order).
    from benchmarks.common import untrained_but_generic
    torch.manual_seed(0)
    network = untrained_but_generic(mobilenet.mobilenet_v2(group="C12"), torch.randn(8, 3, 95, 95)).export().eval()
    int8 = quant.dfq(network, group=12, mode="int8", backend="x86", weight_scheme="symmetric")
    torch.randn(1, 3, 95, 95), torch.randn(2, 3, 95, 95)  # the draws before the failing batch
    x = 1.5 * torch.randn(5, 3, 95, 95)
    group = rotconv.CyclicGroup(12)
    logits = int8(x)
    for k in (3, 6, 9):
        assert torch.equal(int8(group.rotate(x, k, regular=False)), logits), k


@needs_engines("x86", "onednn")
@pytest.mark.parametrize("weight_scheme", ["symmetric", "asymmetric"])
def test_int8_x86_packs_each_conv_for_the_library_that_runs_it_fast_and_exact(weight_scheme, monkeypatch):
    # Which library a packed conv runs on is fixed when it is packed. On the x86 engine: dense convs on fbgemm
    # (exact, above); grouped/depthwise convs with symmetric weights on oneDNN on every CPU. Left to the engine,
    # CPUs without VNNI (AVX2) pack them for fbgemm, whose depthwise kernel has no fast path for C_12's channel
    # counts that are not multiples of 8 (a 36-channel 3x3 depthwise conv at batch 32 took 180x oneDNN's time;
    # docs/experiments.md). oneDNN takes no asymmetric weights: those stay on fbgemm.
    packed_on = {}  # conv -> (groups, engine) of its last packing (the first is the constructor's)
    set_weight_bias = torch.ao.nn.quantized.Conv2d.set_weight_bias

    def recording(self, weight, bias):
        packed_on[id(self)] = (self.groups, int(weight.q_zero_point()), torch.backends.quantized.engine)
        return set_weight_bias(self, weight, bias)

    monkeypatch.setattr(torch.ao.nn.quantized.Conv2d, "set_weight_bias", recording)
    torch.manual_seed(0)
    network = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=12, width_mult=0.5),
                                          torch.randn(4, 3, 95, 95)).export().eval()
    quant.dfq(network, group=12, mode="int8", backend="x86", weight_scheme=weight_scheme)
    dense = {engine for groups, _, engine in packed_on.values() if groups == 1}
    grouped = {(zero_point == 0, engine) for groups, zero_point, engine in packed_on.values() if groups > 1}
    assert dense == {"fbgemm"}, packed_on
    # (this seeded asymmetric network has grouped convs with and without a zero weight zero point)
    assert grouped == ({(True, "onednn")} if weight_scheme == "symmetric" else {(True, "onednn"), (False, "fbgemm")}), \
        packed_on


@pytest.mark.parametrize("backend", engine_params("qnnpack", "x86"))
def test_simulation_adds_biases_as_the_backend_does(backend):
    # qnnpack (like XNNPACK and ONNX QLinearConv) adds a conv's bias as an int32 multiple of
    # input scale * weight scale; fbgemm/oneDNN (x86) add it in float. The simulation must do the same, or it
    # misplaces outputs whose real value lies near a rounding boundary. Measured on these convs (large biases,
    # 55,296 outputs): qnnpack 19 mismatches with float biases, 2 with int32 ones (the requantization's float
    # rounding); x86 21 with int32 biases, 0 with float ones. Require the backend's own arithmetic to be at
    # least 4x closer.
    counts = {True: 0, False: 0}
    for seed in range(6):
        torch.manual_seed(seed)
        conv = nn.Conv2d(16, 16, 3, padding=1)
        with torch.no_grad():
            conv.bias.mul_(3)
        x = torch.randn(4, 16, 12, 12)
        int8 = quant.quantize(nn.Sequential(conv), mode="int8", backend=backend, calibration=[x],
                              weight_scheme="symmetric")
        for integer_bias in (True, False):
            plan = quant.plan_quantization(nn.Sequential(conv), calibration=[x], weight_scheme="symmetric",
                                           reduce_range=backend == "x86", integer_bias=integer_bias)
            with torch.no_grad():
                counts[integer_bias] += (quant.simulate(plan)(x) != int8(x)).sum().item()
    own, other = counts[backend == "qnnpack"], counts[backend != "qnnpack"]
    assert 4 * own <= other and other > 0, counts
    # and quant.quantize chooses the backend's arithmetic
    plan_kind = quant.quantize(nn.Sequential(conv), mode="simulated", backend=backend, calibration=[x],
                               weight_scheme="symmetric")
    (simulated_conv,) = [m for m in plan_kind.modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(simulated_conv.bias, conv.bias) == (backend == "x86")


@settings(max_examples=20)
@given(channels=st.integers(1, 6), spread=st.floats(1.0, 1000.0), bits=st.integers(3, 8), seed=st.integers(0, 2**16))
def test_per_channel_weights_lie_on_their_channel_grids(channels, spread, bits, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, 3, 3, generator=generator) * torch.logspace(
        0, float(torch.log10(torch.tensor(spread))), channels).reshape(-1, 1, 1, 1)
    rounded = quant.fake_quantize_weight(weight, bits, "symmetric", per_channel=True)
    qmax = 2 ** (bits - 1) - 1
    scale = (weight.abs().amax(dim=(1, 2, 3)) / qmax).reshape(-1, 1, 1, 1)
    codes = rounded / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= qmax + 1e-3
    assert ((rounded - weight).abs() <= scale / 2 * (1 + 1e-5)).all()  # each channel within half its step
    assert torch.allclose(rounded.abs().amax(dim=(1, 2, 3)), weight.abs().amax(dim=(1, 2, 3)))  # peaks exact
    with pytest.raises(ValueError, match="per-channel weights are symmetric"):
        quant.fake_quantize_weight(weight, bits, "asymmetric", per_channel=True)


def test_bias_correction_per_channel_subtracts_the_per_channel_rounding_error():
    # conv -> BN -> ReLU -> conv: the second conv's bias moves by (Q(W) - W) E[relu(N(beta, gamma^2))], with Q
    # the per-channel rounding when asked for, which differs from the per-tensor one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))
    model = rotconv.randomize_batchnorm(model, torch.randn(16, 3, 11, 11)).eval()
    with torch.no_grad():
        model[4].weight[:2] *= 20.0
    options = {"weight_scheme": "symmetric", "relu6": "keep"}
    plain = quant.prepare(model, bias_correction=False, **options)
    shifts = {}
    for per_channel in (False, True):
        corrected = quant.prepare(model, per_channel_weights=per_channel, **options)
        convs = [m for m in corrected.modules() if isinstance(m, nn.Conv2d)]
        shifts[per_channel] = convs[1].bias - [m for m in plain.modules() if isinstance(m, nn.Conv2d)][1].bias
        first, second = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
        beta, gamma = first.dfq_beta.double(), first.dfq_gamma.double()
        normal = torch.distributions.Normal(0.0, 1.0)
        ratio = beta / gamma
        expected_input = beta * normal.cdf(ratio) + gamma * normal.log_prob(ratio).exp()
        error = quant.fake_quantize_weight(second.weight, 8, "symmetric", per_channel=per_channel) - second.weight
        expected = -(error.double().sum(dim=(2, 3)) @ expected_input)
        assert torch.allclose(shifts[per_channel].double(), expected, rtol=1e-4, atol=1e-6), per_channel
    assert not torch.allclose(shifts[False], shifts[True])


def test_the_input_range_comes_from_the_models_normaliser_unless_given(monkeypatch):
    # mobilenet.load and mobilenet.pretrained attach the normaliser, and export() keeps it: the data-free range
    # of the network input is then the normaliser's, as the shipped programs were made, not a guess of +-3
    torch.manual_seed(0)
    model = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=4, width_mult=0.25), torch.randn(4, 3, 95, 95))
    model.normalizer = mobilenet.Normalizer([0.7, 0.54, 0.69], [0.24, 0.28, 0.22])
    plain = model.eval().export()
    low, high = model.normalizer.value_range()
    assert quant.input_range_of(plain) == (low, high) and high < 2  # far from +-3
    assert quant.input_range_of(plain, (-1.0, 1.0)) == (-1.0, 1.0)
    assert quant.input_range_of(nn.Conv2d(3, 3, 1)) == quant.DEFAULT_INPUT_RANGE == (-3.0, 3.0)
    with pytest.raises(ValueError, match="input_range: expected"):
        quant.input_range_of(plain, (2.0, 1.0))
    x = model.normalizer(torch.randint(0, 256, (4, 3, 95, 95), dtype=torch.uint8))
    with torch.no_grad():
        by_default = quant.dfq(plain, group=4, mode="int8")(x)
        assert torch.equal(by_default, quant.dfq(plain, group=4, mode="int8", input_range=(low, high))(x))
        assert not torch.equal(by_default, quant.dfq(plain, group=4, mode="int8", input_range=(-3.0, 3.0))(x))
    # the file exports resolve it the same way (what they hand to the PT2E quantizer)
    class Planned(Exception):
        pass

    def plan(*args, **kwargs):
        raise Planned(args[4])  # the range handed on; nothing is exported

    monkeypatch.setattr(quant.executorch, "plan_quantization", plan)
    pytest.importorskip("executorch", reason="the .pte export is the optional deploy extra")
    with pytest.raises(Planned) as planned:
        quant.executorch.quantize_pt2e(plain, 4, torch.zeros(1, 3, 95, 95))
    assert planned.value.args[0] == (low, high)
