"""benchmarks.rotation: random-angle inputs (seeded, disc field of view) and the per-run figures."""
import json
import os

import torch

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


def test_runs_get_upright_and_rotated_accuracy(tmp_path):
    data = write_synthetic_pcam(str(tmp_path / "data"), {"train": 8, "valid": 8, "test": 12}, seed=2)
    run_dir, results = tmp_path / "runs" / "size8-C4-seed0", tmp_path / "results"
    run_dir.mkdir(parents=True)
    results.mkdir()
    torch.manual_seed(0)
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.25).eval()
    mobilenet.save(model, str(run_dir / "model.pt"), mobilenet.Normalizer([0.7, 0.5, 0.7], [0.2, 0.2, 0.2]))
    (results / "size8-C4-seed0.json").write_text(json.dumps({"size": 8, "seed": 0, "model": "C4"}))
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "runs"), "--results", str(results)]) == 0
    figures = json.loads((run_dir / "rotation.json").read_text())
    assert figures["patches"] == 12 and set(figures) >= {"fp32", "seed"}
    for key in ("upright", "rotated"):
        assert figures["fp32"][key] * 12 == round(figures["fp32"][key] * 12) and 0 <= figures["fp32"][key] <= 1
    assert figures["fp32"]["drop"] == figures["fp32"]["upright"] - figures["fp32"]["rotated"]
    assert json.loads((results / "size8-C4-seed0.json").read_text())["random_rotation"] == figures
    assert rotation.main(["--data", data, "--runs", str(tmp_path / "nowhere")]) == 2


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
    for stale in ({"seed": 1, "patches": 10}, {"seed": 0, "patches": 9}):
        assert rotation.current_figures(str(run_dir), stale["seed"], stale["patches"]) is None
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
