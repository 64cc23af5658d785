"""Shipped models (mobilenet.list_pretrained / pretrained) and the builder's torchvision-style hooks."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import mobilenet
import quant
from mobilenet import pretrained_models as shipped


def test_the_shipped_models_load_by_name_and_predict():
    names = mobilenet.list_pretrained()
    assert any("conventional" in name for name in names) and any("c12" in name for name in names), names
    patches = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8))
    for name in names:
        model = mobilenet.pretrained(name)
        assert not model.training and model.normalizer is not None
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert {"trained_on", "test_accuracy", "notice"} <= set(model.metadata), model.metadata
        probabilities = mobilenet.predict(model, patches)
        assert probabilities.shape == (4, 2) and torch.allclose(probabilities.sum(1), torch.ones(4))
        same = mobilenet.mobilenet_v2(weights=name)
        assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="name: expected one of"):
        mobilenet.pretrained("pcam-c13")
    with pytest.raises(ValueError, match="weights: a pretrained model"):
        mobilenet.mobilenet_v2(weights=names[0], group=4)


def test_c12_model_is_invariant_to_quarter_turns_in_fp32_and_int8():
    model = mobilenet.pretrained(next(n for n in mobilenet.list_pretrained() if "c12" in n))
    x = model.normalizer(torch.randint(0, 256, (2, 3, 95, 95), dtype=torch.uint8))
    logits = model(x)
    for k in (1, 2, 3):
        assert torch.allclose(model(torch.rot90(x, k, (2, 3))), logits, atol=1e-4)
    int8 = quant.dfq(model.export(), group=model.group, mode="int8", input_range=model.normalizer.value_range())
    reference = int8(x)
    for k in (1, 2, 3):
        assert torch.equal(int8(torch.rot90(x, k, (2, 3))), reference)


def test_save_pretrained_stores_float16_and_loads_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "WEIGHTS_DIRECTORY", str(tmp_path))
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.25).eval()
    model.normalizer = mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.2, 0.2])
    shipped.save_pretrained(model, str(tmp_path / "tiny-c4.pt"), {"notice": "test"})
    stored = torch.load(tmp_path / "tiny-c4.pt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    assert mobilenet.list_pretrained() == ["tiny-c4"]
    loaded = mobilenet.pretrained("tiny-c4")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype and torch.allclose(a, b, rtol=1e-3, atol=1e-4), name  # half precision


def test_builder_hooks_table_and_norm_layer():
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)]
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.5, inverted_residual_setting=table).eval()
    assert len(model.features) == 1 + 4 + 1 and model.arguments()["inverted_residual_setting"] == [
        list(r) for r in table
    ]
    rebuilt = mobilenet.mobilenet_v2(**model.arguments())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    x = torch.randn(1, 3, 95, 95)
    assert torch.allclose(model(torch.rot90(x, 1, (2, 3))), model(x), atol=1e-4)
    norms = []

    def group_norm(channels):
        norms.append(channels)
        return nn.GroupNorm(1, channels)

    plain = mobilenet.mobilenet_v2(width_mult=0.25, norm_layer=group_norm)
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in plain.modules()) == len(norms)
    with pytest.raises(ValueError, match="custom norm_layer"):
        mobilenet.save(plain, "unused.pt")
    for bad in ([], [(6, 24, 2, 3)], [(6, 24, 2)]):
        with pytest.raises(ValueError, match="inverted_residual_setting"):
            mobilenet.mobilenet_v2(inverted_residual_setting=bad)


def test_the_prediction_command_takes_a_shipped_name(tmp_path, capsys):
    pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")
    from PIL import Image

    from benchmarks import predict
    name = next(n for n in mobilenet.list_pretrained() if "c12" in n)
    patch = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(patch).save(tmp_path / "patch.png")
    assert predict.main([name, str(tmp_path / "patch.png")]) == 0
    line = capsys.readouterr().out.splitlines()[1].split(",")
    expected = mobilenet.predict(mobilenet.pretrained(name), torch.from_numpy(patch)[None])[0, 1]
    assert abs(float(line[2]) - float(expected)) < 1e-6, line  # the CSV keeps 6 decimals
    assert predict.main(["pcam-c13", str(tmp_path / "patch.png")]) == 2
    err = capsys.readouterr().err
    assert "pcam-c13: neither a model file nor a shipped model" in err and name in err, err


def test_load_or_pretrained_takes_a_file_or_a_shipped_name(tmp_path):
    name = mobilenet.list_pretrained()[0]
    shipped = mobilenet.load_or_pretrained(name)
    assert shipped.metadata["name"] == name
    model = mobilenet.mobilenet_v2(width_mult=0.25).eval()
    path = tmp_path / name  # a file of that name wins over the shipped model
    mobilenet.save(model, str(path), mobilenet.Normalizer([0.5] * 3, [0.2] * 3))
    loaded = mobilenet.load_or_pretrained(str(path))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="pcam-c13: neither a model file nor a shipped model"):
        mobilenet.load_or_pretrained("pcam-c13")
    with pytest.raises(ValueError, match="model file not found"):
        mobilenet.load_or_pretrained(str(tmp_path / "missing.pt"))
