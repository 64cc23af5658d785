"""quant.to_onnx: the float model and the data-free INT8 model (QDQ) as ONNX files run by onnxruntime; and
benchmarks.pcam with either deployable INT8 backend (ExecuTorch, ONNX)."""
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import mobilenet
import quant
import rotconv

for _module in ("onnx", "onnxscript", "onnxruntime", "executorch"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (optional extra: pip install 'rotconv[deploy]')",
                    allow_module_level=True)


def _random_model(group, group_pool: str = "max") -> nn.Module:
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=group, width_mult=0.25, group_pool=group_pool)
    with torch.no_grad():
        model.classifier[1].weight.normal_()
    return rotconv.randomize_batchnorm(model, torch.randn(8, 3, 95, 95)).export().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    model = _random_model("C4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = quant.to_onnx(model, str(directory / "fp32.onnx"), int8=False)
        int8 = quant.to_onnx(model, str(directory / "int8.onnx"), group="C4")
        reference = quant.executorch.quantize_pt2e(model, "C4", torch.zeros(1, 3, 95, 95))
    return model, fp32, int8, reference


def test_the_float_export_leaves_the_callers_model_in_its_mode(tmp_path):
    model = _random_model("C4").train()  # e.g. exported for a look in the middle of training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = quant.to_onnx(model, str(tmp_path / "fp32.onnx"), int8=False)
    assert model.training
    x = torch.randn(2, 3, 95, 95, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)  # the file holds the network in eval mode (batch norm on running statistics)
    assert torch.allclose(quant.load_onnx(path)(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_fp32_file_matches_the_model_at_any_batch(files):
    model, fp32, _, _ = files
    session = quant.load_onnx(fp32)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 95, 95, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        # float32 with a different summation order (onnxruntime's kernels, folded batch norms): rounding only,
        # relative to the logits' size
        assert torch.allclose(session(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0), batch


def test_int8_file_runs_the_data_free_qdq_model(files):
    # The QDQ graph carries the plan's scales; onnxruntime runs fused integer kernels where it can and
    # requantizes in its own order, so its logits are not torchao's reference decomposition bit for bit.
    # What must hold: its departure from the reference is smaller than the quantization error itself
    # (random networks quantize coarsely, 0.3-0.7 relative L2 from FP32 over 4 seeds; onnxruntime vs
    # reference measured 0.08-0.28), and the two agree on the predicted class. A wrong scale, a missing
    # requantization or a float graph would break one of these.
    model, _, int8, reference = files
    session = quant.load_onnx(int8)
    x = torch.randn(16, 3, 95, 95, generator=torch.Generator().manual_seed(3))
    logits = session(x)
    with torch.no_grad():
        expected = torch.cat([reference(x[i:i + 1]) for i in range(x.shape[0])])
        float_logits = model(x)

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert relative(logits, expected) < relative(expected, float_logits)
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    import onnx

    graph = onnx.load(int8).graph
    kinds = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= kinds  # a QDQ model, not a float one
    # every convolution's weight is stored as uint8 with zero point 128 (exact in any onnxruntime session)
    weights = _weights(onnx.load(int8))
    assert len(weights) >= 50 and all(w.dtype == np.uint8 and (z == 128).all() for w, z in weights)
    # load_onnx gives its session int8 weights on an x86 CPU with AVX-512 VNNI or AVX-VNNI (faster there, and
    # exact), uint8 ones on an x86 CPU without (u8s8 pair sums saturate there); elsewhere the file's own
    vnni = rotconv.hardware.has_vnni() or rotconv.hardware.has_avx_vnni()
    assert session.uint8_weights == (not rotconv.hardware.is_x86() or not vnni)


def _weights(proto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, zero point) of every DequantizeLinear of ``proto`` whose input is a stored constant."""
    from onnx import numpy_helper

    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    stored.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in proto.graph.node
                   if node.op_type == "Constant"})
    return [(stored[node.input[0]], stored[node.input[2]]) for node in proto.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in stored]


def test_onnxruntime_runs_every_convolution_and_add_as_an_integer_kernel(files, tmp_path):
    # The uint8 activation rewrite is what lets onnxruntime (x86) fuse the projection convolutions and the
    # residual adds; without it 17 convolutions and 11 adds stay float (see quant/onnx.py).
    import onnxruntime

    _, _, int8, _ = files
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(int8, options, providers=["CPUExecutionProvider"])
    import onnx

    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert kinds.count("QLinearConv") == 52 and "Conv" not in kinds and "FusedConv" not in kinds
    assert kinds.count("QLinearAdd") == 11 and "Add" not in kinds


@pytest.mark.parametrize("batch", [1, 5])
def test_int8_logits_are_bit_exactly_invariant_to_quarter_turns(files, batch):
    # integer kernels on the feature maps, the exact integer pool: a rotated patch gives the same logits bit
    # for bit, also at a batch size where kernels block the work differently, and 3x beyond the input range
    _, _, int8, _ = files
    session = quant.load_onnx(int8)
    x = 3 * torch.randn(batch, 3, 95, 95, generator=torch.Generator().manual_seed(batch))
    logits = session(x)
    for k in (1, 2, 3):
        assert torch.equal(session(torch.rot90(x, k, (2, 3))), logits), k


def test_int8_weights_as_written_or_as_uint8_are_the_same_model_and_the_default_file_is_exact_as_it_is(files,
                                                                                                       tmp_path):
    # weight_dtype="int8" stores the same real values as int8 (onnxruntime's faster kernels with VNNI). Both files
    # are one model: load_onnx runs them with the same weights here, so the logits are bit-identical. The default
    # file opened by onnxruntime directly (a user's own session) is exact under quarter turns and gives
    # load_onnx's logits: the same integers, whichever exact kernels run. On x86 CPUs without VNNI the int8 file
    # in such a session is not exact (tests/test_isa.py checks both there).
    import onnx
    import onnxruntime

    model, _, default, _ = files
    with pytest.raises(ValueError, match="weight_dtype: expected one of 'uint8', 'int8', got 'int4'"):
        quant.to_onnx(model, str(tmp_path / "x.onnx"), group="C4", weight_dtype="int4")
    assert not (tmp_path / "x.onnx").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signed = quant.to_onnx(model, str(tmp_path / "int8.onnx"), group="C4", weight_dtype="int8")
    pairs = list(zip(_weights(onnx.load(signed)), _weights(onnx.load(default))))
    assert len(pairs) >= 50
    for (w, z), (u, v) in pairs:  # the same real values: q - z equal
        assert w.dtype == np.int8 and (z == 0).all()
        assert np.array_equal(w.astype(np.int16) - z, u.astype(np.int16) - v)
    x = 3 * torch.randn(3, 3, 95, 95, generator=torch.Generator().manual_seed(5))
    logits = quant.load_onnx(default)(x)
    assert torch.equal(quant.load_onnx(signed)(x), logits)
    session = onnxruntime.InferenceSession(default, providers=["CPUExecutionProvider"])
    for k in (0, 1, 2, 3):
        rotated = torch.rot90(x, k, (2, 3)).contiguous().numpy()
        assert torch.equal(torch.from_numpy(session.run(None, {"x": rotated})[0]), logits), k


def test_load_onnx_turns_only_symmetric_uint8_weights_into_int8(files, tmp_path):
    # On x86 with VNNI load_onnx gives its session int8 weights, but only where they are symmetric (zero point
    # 128 as uint8, as to_onnx writes them): a weight with another zero point stays uint8, on every CPU.
    import onnx
    from onnx import numpy_helper

    _, _, default, _ = files
    proto = onnx.load(default)
    node = next(node for node in proto.graph.node if node.op_type == "DequantizeLinear"
                and any(tensor.name == node.input[0] for tensor in proto.graph.initializer))
    tensor = next(tensor for tensor in proto.graph.initializer if tensor.name == node.input[2])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) - np.uint8(1), tensor.name))
    path = tmp_path / "asymmetric.onnx"
    path.write_bytes(proto.SerializeToString())
    session = quant.load_onnx(str(path))
    assert session.uint8_weights
    assert torch.isfinite(session(torch.zeros(1, 3, 95, 95))).all()


def test_sorted_readout_exports_and_stays_bit_exact(tmp_path):
    # group_pool="sort" is traced as a min/max sorting network: the FP32 file matches the model, and the INT8
    # file's logits are bit-identical under quarter turns (min/max are exact, as the pool before them)
    model = _random_model("C4", group_pool="sort")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = quant.load_onnx(quant.to_onnx(model, str(tmp_path / "fp32.onnx"), int8=False))
        int8 = quant.load_onnx(quant.to_onnx(model, str(tmp_path / "int8.onnx"), group="C4"))
    x = torch.randn(2, 3, 95, 95, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(fp32(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)  # rounding only
    logits = int8(x)
    for k in (1, 2, 3):
        assert torch.equal(int8(torch.rot90(x, k, (2, 3))), logits), k


def test_bad_files_and_inputs_are_named(files, tmp_path):
    _, fp32, _, _ = files
    with pytest.raises(ValueError, match="not found"):
        quant.load_onnx(str(tmp_path / "missing.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="garbage.onnx: not a loadable ONNX model"):
        quant.load_onnx(str(garbage))
    session = quant.load_onnx(fp32)
    with pytest.raises(ValueError, match="input: the model expects"):
        session(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        session(torch.full((1, 3, 95, 95), float("nan")))
    with pytest.raises(ValueError, match="int8"):
        quant.to_onnx(nn.Conv2d(3, 3, 1), str(tmp_path / "x.onnx"), int8="yes")


@pytest.mark.parametrize(
    "backend, file_name, wording",
    [
        ("executorch", "model.pte", "an ExecuTorch XNNPACK program"),
        ("onnx", "model.onnx", "an ONNX QDQ file in onnxruntime"),
    ],
)
def test_pcam_benchmark_reports_the_deployed_file(tmp_path, backend, file_name, wording):
    # benchmarks.pcam --int8-backend executorch|onnx: the INT8 figures come from the file kept beside the run,
    # and the C_4 model's INT8 predictions never change under quarter turns.
    import json

    from benchmarks import pcam
    from benchmarks.synthetic import write_synthetic_pcam

    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 16, "valid": 8, "test": 8}, seed=6)
    out = tmp_path / "results.json"
    code = pcam.main(["--data", data, "--models", "equivariant", "--group", "C4", "--epochs", "1", "--width-mult",
                      "0.25", "--batch-size", "8", "--stability-samples", "4", "--threads", "1", "--int8-backend",
                      backend, "--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    run = results["runs"][0]
    assert run["int8_bytes"] == (tmp_path / "runs" / "C4-seed0" / file_name).stat().st_size
    assert run["stability"]["int8"]["90"] == 1.0
    assert wording in results["table"]


def test_predict_takes_the_onnx_file_with_the_float_models_normaliser(files):
    _, fp32, int8, _ = files
    normalizer = mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.25, 0.2])
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    for path in (fp32, int8):
        session = quant.load_onnx(path)
        expected = torch.softmax(session(normalizer(mobilenet.as_images(images, 95))), 1)
        assert expected.log().std(0).max() > 0.1  # answers that differ from patch to patch (in log terms)
        assert torch.equal(mobilenet.predict(session, images, normalizer=normalizer), expected)
        assert session.num_classes == 2  # from the file: an empty input has the model's columns
        assert mobilenet.predict(session, images[:0], normalizer=normalizer).shape == (0, 2)
