"""quant.to_executorch: the data-free INT8 model as an ExecuTorch/XNNPACK program (optional extra)."""
import builtins
import importlib.util
import operator
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv

if importlib.util.find_spec("executorch") is None:
    pytest.skip("executorch is not installed (optional extra: pip install 'rotconv[deploy]')", allow_module_level=True)


def _random_model(group: str, group_pool: str = "max") -> nn.Module:
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=group, width_mult=0.35, group_pool=group_pool)
    with torch.no_grad():
        model.classifier[1].weight.normal_()
    return rotconv.randomize_batchnorm(model, torch.randn(8, 3, 95, 95)).export().eval()


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    """``(group, group_pool, relu6, per_channel) -> path`` of the random model's program (batch 2), each written
    once (an export takes ~15 s) for every test that reads it."""
    written = {}

    def make(group: str, group_pool: str, relu6: str, per_channel: bool) -> str:
        key = (group, group_pool, relu6, per_channel)
        if key not in written:
            path = str(tmp_path_factory.mktemp("program") / "model.pte")
            written[key] = quant.to_executorch(_random_model(group, group_pool), path, group=group, example_batch=2,
                                               relu6=relu6, per_channel_weights=per_channel)
        return written[key]
    return make


@pytest.mark.parametrize("group, group_pool, relu6, per_channel", [
    ("C4", "max", "replace", False), ("C12", "max", "replace", False), ("C4", "sort", "replace", False),
    ("C12", "max", "keep", False), ("C12", "max", "keep", True), ("C4", "max", "replace", True)])
def test_program_logits_are_bit_exactly_invariant_to_quarter_turns(group, group_pool, relu6, per_channel,
                                                                   program_file):
    # The int8 feature maps of a rotated input are the rotated maps (rot90-exact filters, per-tensor scales);
    # the masked average pool sums them exactly in float32, so even the float head gives identical bits: with
    # ReLU6 kept the pooled map is on the 3/128 grid; with it replaced, these models' pooled maps have ranges
    # off such grids ([0, 9.1] for C_4), and the pool rounds them to integers first.
    # Inputs 3x wider than the declared range saturate the first quantizer: still exact. group_pool="sort"
    # is exported as a min/max sorting network (ExecuTorch has no sort kernel): exact too. relu6="keep":
    # ReLU6 clipped by the top of the int8 range, no equalization: exact too. Per-channel weights: the channels
    # a quarter turn maps onto each other hold the same weights, rotated, hence the same scale: exact too.
    program = quant.load_executorch(program_file(group, group_pool, relu6, per_channel))
    g = rotconv.as_group(group)
    x = torch.randn(3, 3, 95, 95, generator=torch.Generator().manual_seed(1))  # 3 = one full batch + a padded one
    for scale in (1.0, 3.0):
        logits = program(scale * x)
        assert logits.shape == (3, 2)
        for element in g.exact_elements():
            assert torch.equal(program(g.act(scale * x, element, regular=False)), logits), (scale, element)


def _xnnpack_operators(path: str, x: torch.Tensor) -> list[str]:
    """The operators the program at ``path`` ran for one forward, in order (from the runtime's ETDump)."""
    pytest.importorskip("executorch.devtools", reason="ExecuTorch's devtools read the ETDump")
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    module = _load_for_executorch(path, enable_etdump=True)
    module.forward([x])
    dump = path + ".etdump"
    module.write_etdump_result_to_file(dump)
    return [event.name for block in Inspector(etdump_path=dump).event_blocks if block.name == "Execute"
            for event in block.events]


# ExecuTorch's profiling tools (the operator dump below) speak about themselves: a deprecated importlib call and
# "no output buffer" (the dump is asked for operator names only)
@pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning",
                            "ignore:Output Buffer not found:UserWarning")
@pytest.mark.parametrize("group, group_pool, relu6", [("C4", "max", "replace"), ("C4", "sort", "replace"),
                                                      ("C12", "max", "keep")])
def test_program_keeps_the_last_map_channels_last_through_the_pool(group, group_pool, relu6, program_file):
    # XNNPACK runs convs on NHWC maps. The exact pool's constants are 4-D, so its dequantize, weighting and mean
    # run on the NHWC map the last conv wrote: no transpose between the last conv and the mean (with a 0-d or
    # 2-D constant XNNPACK transposed the int8 map to NCHW and the float map back, 6 % of the C_12 program's
    # time at batch 32). With ReLU6 kept the map is on the 3/128 grid: dequantize, one multiply, the mean; the
    # rounding to integers (three float passes over the map, 3.5 % of the C_12 program's time at batch 32)
    # runs only for these models with ReLU6 replaced, whose pooled range is [0, 9.1] (C_4).
    operators = _xnnpack_operators(program_file(group, group_pool, relu6, False), torch.randn(2, 3, 95, 95))
    convolutions = [i for i, name in enumerate(operators) if name.startswith("Convolution")]
    means = [i for i, name in enumerate(operators) if name.startswith("Mean")]
    assert convolutions and len(means) == 1, operators  # the dump names XNNPACK's ops; the pool's mean ran there
    between = operators[convolutions[-1]:means[0]]
    assert means[0] > convolutions[-1] and not [name for name in between if name.startswith("Transpose")], between
    last_gemm = max(i for i, name in enumerate(operators[:means[0]]) if "QS8" in name)
    rounding = ["Multiply (ND)", "Subtract (ND)", "Subtract (ND)"] if relu6 == "replace" else []
    assert [name.split(" #")[0] for name in operators[last_gemm + 1:means[0]]] == [
        "Convert (NC)", *rounding, "Multiply (ND)"]


def test_pooled_map_is_dequantized_on_the_exact_grid():
    # The plan's ReLU6 range [0, 6] (step 6/255) is narrowed to [0, 765/128] for the map the pool reads, and the
    # quantizer's observer turns that range into exactly the step 3/128 the pool was built for
    pytest.importorskip("torchao")
    graph = quant.executorch.quantize_pt2e(_random_model("C4"), "C4", torch.zeros(1, 3, 95, 95), relu6="keep")
    weighting = [node for node in graph.graph.nodes if node.op == "call_function" and
                 any(getattr(arg, "target", None) == "pool.integer_weights" for arg in node.args)]
    assert len(weighting) == 1
    dequantize = weighting[0].args[0]
    assert "dequantize_per_tensor" in str(dequantize.target) and dequantize.args[1:3] == (3 / 128, -128)


class _Shallow(nn.Module):
    """Two conv-BN-ReLU layers, masked pooling, linear: too shallow to amplify one-step differences."""

    def __init__(self, activation=nn.ReLU):
        super().__init__()
        self.input_size = 15
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), activation())
        self.pool = rotconv.MaskedGlobalAvgPool(size=15)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@pytest.mark.parametrize("relu6", ["replace", "keep"])
def test_program_matches_the_simulation(relu6, tmp_path):
    # The simulated model (8-bit activations and symmetric weights everywhere, as XNNPACK) describes the
    # program: same data-free ranges; only the int32 rounding of biases and the requantization differ, a
    # fraction of a quantization step per layer, so the logits agree to ~1% of their size. With ReLU6 kept
    # (batch norms scaled so that it clips), the program's clip is the saturation of its int8 range.
    torch.manual_seed(0)
    model = rotconv.randomize_batchnorm(_Shallow(nn.ReLU6), torch.randn(64, 3, 15, 15),
                                        **({"weight": (2.0, 5.0), "bias": (1.0, 3.0)} if relu6 == "keep" else
                                           {"bias": (-0.3, 0.5)}))
    path = quant.to_executorch(model, str(tmp_path / "shallow.pte"), example_batch=4, relu6=relu6)
    program = quant.load_executorch(path)
    simulated = quant.dfq(model, mode="simulated", backend="qnnpack", weight_scheme="symmetric", relu6=relu6)
    x = torch.randn(16, 3, 15, 15)
    with torch.no_grad():
        expected = simulated(x)
    actual = program(x)
    assert ((actual - expected).norm() / expected.norm()).item() < 0.02
    assert (actual.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.9


def test_bad_inputs_and_files(tmp_path):
    torch.manual_seed(0)
    model = rotconv.randomize_batchnorm(_Shallow(), torch.randn(16, 3, 15, 15))
    program = quant.load_executorch(quant.to_executorch(model, str(tmp_path / "m.pte")))
    with pytest.raises(ValueError, match="input"):
        program(torch.zeros(1, 3, 17, 17))
    with pytest.raises(ValueError, match="NaN"):
        program(torch.full((1, 3, 15, 15), float("nan")))
    with pytest.raises(ValueError, match="not found"):
        quant.load_executorch(str(tmp_path / "missing.pte"))
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program")
    # the runtime's own reason (logged by its C++ code) is part of the message
    with pytest.raises(ValueError, match=r"junk.pte: not a loadable ExecuTorch program \(\w+: \[\w+\.cpp:\d+\] "):
        quant.load_executorch(str(junk))


def test_loading_a_program_prints_nothing(tmp_path):
    # The runtime's C++ code logs a CPU probe ("[cpuinfo_utils.cpp:87] Failed to open midr file ...") to stderr
    # the first time a process loads a method; load_executorch keeps it out of the user's output. A fresh
    # process, so that this load is its first.
    torch.manual_seed(0)
    model = rotconv.randomize_batchnorm(_Shallow(), torch.randn(16, 3, 15, 15))
    path = quant.to_executorch(model, str(tmp_path / "m.pte"))
    script = ("import sys, torch, quant.executorch as qe; m = qe.load_executorch(sys.argv[1]); "
              "print(tuple(m(torch.zeros(1, 3, 15, 15)).shape))")
    done = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 3)"
    assert "cpp:" not in done.stderr, done.stderr


def test_missing_extra_is_named(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError("No module named 'executorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(ImportError, match=r"rotconv\[deploy\]"):
        quant.to_executorch(nn.Sequential(), str(tmp_path / "m.pte"))


def test_rounding_by_offset_is_round_half_to_even():
    # The exact pool rounds with two float32 subtractions (so XNNPACK runs them); it must equal torch.round
    # (half to even) for every |y| < 2**22: integers, exact ties, and values just beside them.
    from quant.executorch import ROUNDING_OFFSET, _round_small
    generator = torch.Generator().manual_seed(0)
    whole = torch.randint(-2**22 + 1, 2**22, (4096,), generator=generator).float()
    y = torch.cat([whole, whole + 0.5, torch.nextafter(whole + 0.5, whole), torch.nextafter(whole + 0.5, whole + 1),
                   (torch.rand(100_000, generator=generator) - 0.5) * 600, torch.tensor([0.5, -0.5, 1.5, -2.5, 0.0])])
    y = y[y.abs() < 2**22]
    assert torch.equal(_round_small(y), torch.round(y))
    # as the exact pool calls it: the offsets as (1, 1, 1, 1) tensors, on a (1, 1, 1, n) map
    offsets = (torch.full((1, 1, 1, 1), -ROUNDING_OFFSET), torch.full((1, 1, 1, 1), ROUNDING_OFFSET))
    assert torch.equal(_round_small(y.view(1, 1, 1, -1), *offsets), torch.round(y).view(1, 1, 1, -1))


def test_per_channel_weights_in_the_program_are_the_ones_bias_correction_assumed():
    # The convs' dequantized weights in the PT2E graph are exactly fake_quantize_weight(per_channel=True) of the
    # DFQ-prepared weights (what correct_bias subtracts the error of); per tensor there is no per-channel op.
    torch.manual_seed(0)
    model = rotconv.randomize_batchnorm(_Shallow(), torch.randn(32, 3, 15, 15)).eval()
    with torch.no_grad():
        model.features[1].weight[:4] *= 30.0  # folded: output channels far apart (equalization narrows it)
    example = torch.zeros(1, 3, 15, 15)
    per_tensor = quant.executorch.quantize_pt2e(model, None, example)
    assert not any("per_channel" in str(node.target) for node in per_tensor.graph.nodes)
    graph = quant.executorch.quantize_pt2e(model, None, example, per_channel_weights=True)
    prepared = quant.prepare(model, None, weight_scheme="symmetric", per_channel_weights=True)
    expected = [quant.fake_quantize_weight(m.weight.detach(), 8, "symmetric", per_channel=True)
                for m in prepared.modules() if isinstance(m, nn.Conv2d)]
    found = []
    for node in graph.graph.nodes:
        if "dequantize_per_channel" in str(node.target) and node.args[0].op == "get_attr":
            codes, scales = (operator.attrgetter(arg.target)(graph) for arg in node.args[:2])
            assert codes.dtype == torch.int8 and scales.shape == (codes.shape[0],)
            found.append(codes.float() * scales.reshape(-1, 1, 1, 1))
    assert len(found) == len(expected) == 2
    for weights, reference in zip(found, expected):
        assert torch.equal(weights, reference.float())
    peaks = [w.abs().amax(dim=(1, 2, 3)) for w in expected]
    assert all(p.max() > 2 * p.min() for p in peaks)  # channel grids that one per-tensor grid could not give


def test_predict_takes_a_program_with_the_float_models_normaliser(program_file):
    # the program holds no normaliser: mobilenet.predict takes the float model's, and the input size from the file
    program = quant.load_executorch(program_file("C4", "max", "replace", False))
    normalizer = mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.25, 0.2])
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)  # 3 program batches of 2
    expected = torch.softmax(program(normalizer(mobilenet.as_images(images, 95))), 1)
    assert expected.log().std(0).max() > 0.1  # answers that differ from patch to patch (in log terms)
    assert torch.equal(mobilenet.predict(program, images, normalizer=normalizer), expected)
    assert program.num_classes == 2  # from the file: an empty input has the model's columns
    assert mobilenet.predict(program, images[:0], normalizer=normalizer).shape == (0, 2)
    with pytest.raises(ValueError, match="normalizer="):
        mobilenet.predict(program, images)
