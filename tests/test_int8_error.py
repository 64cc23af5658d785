"""benchmarks.int8_error: the weight-rounding variants are what they say, and the command's table and JSON count
class changes against the float model."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import mobilenet
from benchmarks import int8_error
from benchmarks.synthetic import write_synthetic_pcam


@given(out_channels=st.integers(1, 8), in_channels=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5]),
       spread=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_rounded_weights_lie_on_their_grid_within_half_a_step(out_channels, in_channels, kernel, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, kernel)
    with torch.no_grad():  # channels of very different size: where per-channel rounding matters
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64).float()
                          * torch.logspace(0, np.log10(spread), out_channels).reshape(-1, 1, 1, 1))
    weight = conv.weight.detach().double()
    tensor = int8_error.round_weights(nn.Sequential(conv))[0].weight.detach().double()
    channel = int8_error.round_weights(nn.Sequential(conv), per_channel=True)[0].weight.detach().double()
    assert torch.equal(conv.weight.detach().double(), weight)  # the model itself is untouched
    scale = weight.abs().max() / 127
    codes = tensor / scale
    # float32 storage: codes are integers to float32 precision, at most 127 in size
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert ((tensor - weight).abs() <= scale / 2 * (1 + 1e-5)).all()
    channel_scale = weight.abs().reshape(out_channels, -1).amax(1).reshape(-1, 1, 1, 1) / 127
    channel_codes = channel / channel_scale
    assert torch.allclose(channel_codes, channel_codes.round(), atol=1e-4)
    assert ((channel - weight).abs() <= channel_scale / 2 * (1 + 1e-5)).all()
    # each channel's error bound is at most the tensor's
    assert (channel_scale <= scale * (1 + 1e-12)).all()


def test_compare_counts_class_changes_against_the_reference():
    torch.manual_seed(0)
    base = nn.Linear(4, 2)
    flipped = nn.Linear(4, 2)
    with torch.no_grad():
        flipped.weight.copy_(-base.weight)
        flipped.bias.copy_(-base.bias)
    x = torch.randn(50, 4)
    labels = base(x).argmax(1)
    rows = int8_error.compare({"float": base, "same": base, "flipped": flipped}, x, labels, batch_size=7,
                              log=lambda *a, **k: None)
    by_name = {row["variant"]: row for row in rows}
    assert by_name["float"]["changed"] == 0 and by_name["float"]["max_logit_change"] == 0
    assert by_name["same"]["accuracy"] == 1.0 and by_name["same"]["changed"] == 0
    ties = int((base(x)[:, 0] == base(x)[:, 1]).sum())
    assert by_name["flipped"]["changed"] == 50 - ties and by_name["flipped"]["accuracy"] == pytest.approx(ties / 50)
    # the flipped model's logits are the float ones negated: each moves by 2 |l|
    moved = 2 * base(x).detach().abs()
    assert by_name["flipped"]["rms_logit_change"] == pytest.approx(float(moved.square().mean().sqrt()), rel=1e-5)
    assert by_name["flipped"]["max_logit_change"] == pytest.approx(float(moved.max()), rel=1e-6)
    assert by_name["float"]["rms_logit_change"] == 0


def test_command_reports_every_variant(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 4, "valid": 12, "test": 4}, seed=4)
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.25, antialias=True).eval()
    path = str(tmp_path / "model.pt")
    mobilenet.save(model, path, mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.25, 0.2]))
    out = tmp_path / "rows.json"
    assert int8_error.main(["--model", path, "--data", data, "--threads", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    stored = json.loads(out.read_text())
    assert stored["patches"] == 12 and stored["split"] == "valid"
    names = [row["variant"] for row in stored["rows"]]
    assert names == ["float", "dfq float", "weights/tensor + correction", "weights/tensor", "weights/channel",
                     "int8 (simulated)"]
    for row in stored["rows"]:
        assert f"| {row['variant']} |" in table
        assert row["changed"] == round(row["changed_share"] * 12) and 0 <= row["accuracy"] <= 1
    assert stored["rows"][0]["changed"] == 0 and stored["rows"][0]["max_logit_change"] == 0
    assert all(row["max_logit_change"] > 0 for row in stored["rows"][1:])  # every variant moves the logits


@pytest.mark.parametrize("arguments, message", [
    (["--model", "pcam-c13"], "pcam-c13: neither a model file nor a shipped model"),
    (["--model", "pcam-c12", "--patches", "1"], "--patches: expected >= 2"),
    (["--model", "pcam-c12", "--threads", "0"], "--threads: expected >= 1"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, arguments, message):
    assert int8_error.main([*arguments, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_missing_data_directory_exits_2_naming_it(tmp_path, capsys):
    assert int8_error.main(["--model", "pcam-c12", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err


def test_the_programs_are_compared_too(tmp_path, capsys):
    pytest.importorskip("executorch", reason="executorch is not installed (optional extra: rotconv[deploy])")
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 4, "valid": 8, "test": 4}, seed=5)
    torch.manual_seed(1)
    model = mobilenet.mobilenet_v2(width_mult=0.25).eval()
    path = str(tmp_path / "model.pt")
    mobilenet.save(model, path, mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.25, 0.2]))
    out = tmp_path / "rows.json"
    assert int8_error.main(["--model", path, "--data", data, "--threads", "1", "--pte", "--out", str(out)]) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert {".pte, weights/tensor", ".pte, weights/channel"} <= set(rows)
    for name in (".pte, weights/tensor", ".pte, weights/channel"):
        assert rows[name]["max_logit_change"] > 0 and rows[name]["changed"] == round(rows[name]["changed_share"] * 8)
