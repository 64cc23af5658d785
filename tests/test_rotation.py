"""benchmarks.rotation: random-angle inputs (seeded, disc field of view) and the per-run figures."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mobilenet
import rotconv
from benchmarks import rotation
from benchmarks.synthetic import write_synthetic_pcam


def test_rotated_inputs_are_seeded_masked_and_rotated():
    normalizer = mobilenet.Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images = torch.randint(0, 256, (6, 3, 33, 33), dtype=torch.uint8)
    first, again = rotation.rotated_inputs(images, normalizer, 3), rotation.rotated_inputs(images, normalizer, 3)
    assert torch.equal(first, again)  # the same angles for every model
    assert not torch.equal(first, rotation.rotated_inputs(images, normalizer, 4))
    outside = rotconv.disc_mask(33, 33, edge_width=0) == 0
    assert (first[..., outside] == 0).all()
    upright = rotation.rotated_inputs(images, normalizer, 3, rotate=False)
    assert torch.equal(upright, normalizer(images) * (~outside))
    assert not torch.allclose(first, upright)  # rotated: random angles are almost never multiples of 90
    # a uniform patch is the same at any angle, away from the disc's edge (interpolation of a constant)
    flat = torch.full((2, 3, 33, 33), 180, dtype=torch.uint8)
    inner = rotconv.disc_mask(33, 33, radius=13, edge_width=0) == 1
    assert torch.allclose(rotation.rotated_inputs(flat, normalizer, 5)[..., inner],
                          rotation.rotated_inputs(flat, normalizer, 5, rotate=False)[..., inner], atol=1e-5)


def test_angle_sets_are_independent_and_the_first_is_the_single_angle_draw():
    normalizer = mobilenet.Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images = torch.randint(0, 256, (5, 3, 21, 21), dtype=torch.uint8)
    first = rotation.rotated_inputs(images, normalizer, 7)
    assert torch.equal(first, rotation.rotated_inputs(images, normalizer, 7, draw=0))
    second = rotation.rotated_inputs(images, normalizer, 7, draw=1)
    assert not torch.allclose(first, second)
    # draw 1 of N patches continues the seed's sequence: it is draw 0's angles for the patches N..2N-1
    doubled = rotation.rotated_inputs(torch.cat([images, images]), normalizer, 7)
    assert torch.equal(doubled[5:], second)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_rotation_figures_match_a_per_patch_count(patches, angles, classes, seed):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, classes, patches))
    upright = torch.from_numpy(rng.integers(0, classes, patches))
    # some angle sets copy the upright answers, so that "same class at every angle" is not always 0
    rotated = [upright.clone() if rng.random() < 0.5 else torch.from_numpy(rng.integers(0, classes, patches))
               for _ in range(angles)]
    figures = rotation.rotation_figures(upright, rotated, labels)
    correct_upright = sum(int(upright[i] == labels[i]) for i in range(patches))
    correct_rotated = sum(int(r[i] == labels[i]) for r in rotated for i in range(patches))
    same = sum(all(int(r[i]) == int(upright[i]) for r in rotated) for i in range(patches))
    assert figures["upright"] == pytest.approx(correct_upright / patches)
    assert figures["rotated"] == pytest.approx(correct_rotated / (patches * angles))
    assert figures["drop"] == pytest.approx(figures["upright"] - figures["rotated"])
    assert figures["consistent"] == pytest.approx(same / patches)
    among = sum(all(int(r[i]) == int(rotated[0][i]) for r in rotated) for i in range(patches))
    assert figures["consistent_across_angles"] == (pytest.approx(among / patches) if angles > 1 else None)
    per_set = [sum(int(r[i] == labels[i]) for i in range(patches)) / patches for r in rotated]
    assert figures["rotated_per_angle_set"] == pytest.approx(per_set)
    alike = [sum(int(r[i] == upright[i]) for i in range(patches)) / patches for r in rotated]
    assert figures["same_class_per_angle_set"] == pytest.approx(alike)


def test_control_inputs_are_what_they_say():
    normalizer = mobilenet.Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images = torch.randint(0, 256, (4, 3, 25, 25), dtype=torch.uint8)
    controls = rotation.control_inputs(images, normalizer, 6)
    disc = rotconv.disc_mask(25, 25, edge_width=0)
    assert torch.equal(controls["shift_1px"], torch.roll(normalizer(images), 1, dims=-1) * disc)
    # the first angle + 90 degrees is the first angle's input turned a quarter (the same resampling, turned)
    first = rotation.rotated_inputs(images, normalizer, 6)
    assert torch.allclose(controls["turn_plus_90"], torch.rot90(first, 1, (-2, -1)), atol=1e-5)
    upright = rotation.rotated_inputs(images, normalizer, 6, rotate=False)
    for name in ("turn_2deg", "turned_back"):  # resampled: near the upright input, not equal to it
        assert not torch.allclose(controls[name], upright)
        assert (controls[name] - upright).abs().mean() < (first - upright).abs().mean()
    # a uniform patch is unchanged by every control away from the disc's edge
    flat = torch.full((2, 3, 25, 25), 90, dtype=torch.uint8)
    inner = rotconv.disc_mask(25, 25, radius=9, edge_width=0) == 1
    reference = rotation.rotated_inputs(flat, normalizer, 6, rotate=False)[..., inner]
    for x in rotation.control_inputs(flat, normalizer, 6).values():
        assert torch.allclose(x[..., inner], reference, atol=1e-5)


def test_runs_get_upright_and_rotated_accuracy(tmp_path, capsys):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 8, "valid": 8, "test": 12}, seed=2)
    run_dir, results = tmp_path / "runs" / "size8-C4-seed0", tmp_path / "results"
    run_dir.mkdir(parents=True)
    results.mkdir()
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.25).eval()
    mobilenet.save(model, str(run_dir / "model.pt"), mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.2, 0.2]))
    (results / "size8-C4-seed0.json").write_text(json.dumps({"size": 8, "seed": 0, "model": "C4"}))
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--results", str(results),
                          "--angles", "3"]) == 0
    figures = json.loads((run_dir / "rotation.json").read_text())
    assert figures["patches"] == 12 and figures["angles"] == 3 and set(figures) >= {"fp32", "seed"}
    counts = {"upright": 12, "rotated": 36, "consistent": 12}  # accuracies are counts over patches (x angles)
    for key, count in counts.items():
        value = figures["fp32"][key]
        assert value * count == pytest.approx(round(value * count)) and 0 <= value <= 1
    assert figures["fp32"]["drop"] == figures["fp32"]["upright"] - figures["fp32"]["rotated"]
    assert json.loads((results / "size8-C4-seed0.json").read_text())["random_rotation"] == figures
    # a result file of the same name from another run (here another step budget) is left alone, and said so
    (run_dir / "result.json").write_text(json.dumps({"size": 8, "seed": 0, "model": "C4", "steps": 300}))
    other = {"size": 8, "seed": 0, "model": "C4", "steps": 2400}
    (results / "size8-C4-seed0.json").write_text(json.dumps(other))
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--results", str(results),
                          "--angles", "3"]) == 0
    assert json.loads((results / "size8-C4-seed0.json").read_text()) == other
    assert "another run of the same name (steps 2400 there, 300 in" in capsys.readouterr().out
    (run_dir / "result.json").write_text(json.dumps(other))
    # what the run directory's file leaves out is not compared
    assert rotation.other_run(str(run_dir), dict(other, fp32_accuracy=0.5)) is None
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--results", str(results),
                          "--angles", "3"]) == 0
    assert json.loads((results / "size8-C4-seed0.json").read_text())["random_rotation"] == figures
    (run_dir / "result.json").unlink()
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "nowhere")]) == 2
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--angles", "0"]) == 2
    # validation patches with the controls: their own file, result files untouched, shares are patch counts
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--split", "valid", "--controls",
                          "--results", str(results)]) == 2
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--split", "valid", "--controls"]) == 0
    on_valid = json.loads((run_dir / "rotation-valid.json").read_text())
    assert on_valid["patches"] == 8 and json.loads((run_dir / "rotation.json").read_text()) == figures
    assert set(on_valid["fp32"]["controls"]) == {"shift_1px", "turn_2deg", "turned_back", "turn_plus_90"}
    for share in on_valid["fp32"]["controls"].values():
        assert 0 <= share <= 1 and share * 8 == pytest.approx(round(share * 8))
    # the C_4 model is invariant to quarter turns: a turn by 90 degrees more changes no class
    assert on_valid["fp32"]["controls"]["turn_plus_90"] == 1.0
    assert json.loads((results / "size8-C4-seed0.json").read_text())["random_rotation"] == figures
    assert rotation.current_figures(str(run_dir), 0, 12, angles=3) == figures
    assert rotation.current_figures(str(run_dir), 0, 12, angles=3, controls=True) is None  # asked, not there
    assert rotation.current_figures(str(run_dir), 0, 8, split="valid", controls=True) == on_valid


def test_up_to_date_figures_are_kept_and_stale_ones_evaluated_again(tmp_path):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 8, "valid": 8, "test": 10}, seed=3)
    runs, results = tmp_path / "runs", tmp_path / "results"
    run_dir = runs / "size8-conventional-seed0"
    run_dir.mkdir(parents=True)
    results.mkdir()
    torch.manual_seed(1)
    model = mobilenet.mobilenet_v2(group=None, width_mult=0.25).eval()
    mobilenet.save(model, str(run_dir / "model.pt"), mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.2, 0.2]))
    record = results / "size8-conventional-seed0.json"
    record.write_text(json.dumps({"size": 8, "seed": 0}))
    arguments = ["--data", data, "--runs", str(runs), "--results", str(results)]
    assert rotation.main(arguments) == 0
    figures = json.loads((run_dir / "rotation.json").read_text())
    # a marker no evaluation can produce (accuracies lie in [0, 1]) shows which figures were used
    marked = dict(figures, fp32=dict(figures["fp32"], upright=7.0))
    (run_dir / "rotation.json").write_text(json.dumps(marked))
    assert rotation.current_figures(str(run_dir), 0, 10) == marked
    assert rotation.main(arguments) == 0
    assert json.loads(record.read_text())["random_rotation"]["fp32"]["upright"] == 7.0  # kept, not evaluated
    for stale in ({"seed": 1, "patches": 10}, {"seed": 0, "patches": 9}, {"seed": 0, "patches": 10, "angles": 2}):
        assert rotation.current_figures(str(run_dir), **stale) is None
    # a file from before the choice of angles is a one-angle evaluation: kept for --angles 1 only
    single = {key: value for key, value in marked.items() if key != "angles"}
    (run_dir / "rotation.json").write_text(json.dumps(single))
    assert rotation.current_figures(str(run_dir), 0, 10) is None
    assert rotation.current_figures(str(run_dir), 0, 10, angles=1) == single
    assert rotation.main(arguments + ["--again"]) == 0
    assert json.loads(record.read_text())["random_rotation"] == figures  # evaluated again: the true figures
    (run_dir / "rotation.json").write_text(json.dumps(marked))
    later = (run_dir / "rotation.json").stat().st_mtime + 10
    os.utime(run_dir / "model.pt", (later, later))  # a retrained model makes the figures stale
    assert rotation.current_figures(str(run_dir), 0, 10) is None
    assert rotation.main(arguments) == 0
    assert json.loads((run_dir / "rotation.json").read_text()) == figures
    (run_dir / "rotation.json").write_text("{not json")
    assert rotation.current_figures(str(run_dir), 0, 10) is None
