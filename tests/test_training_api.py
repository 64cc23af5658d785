"""The reusable pieces without the CLI: the PCam Dataset (official and torchvision layouts), the trainer on
any dataset or DataLoader with errors that name config fields, model files, prediction."""
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

import mobilenet
import rotconv
from benchmarks import predict
from benchmarks.synthetic import write_synthetic_pcam
from mobilenet.data import split_paths

SIZES = {"train": 16, "valid": 8, "test": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_pcam(str(tmp_path_factory.mktemp("pcam")), SIZES, seed=2)


def test_dataset_items_follow_torchvision_conventions(data):
    normalizer = mobilenet.Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    raw = mobilenet.PCam(data, "train")
    transformed = mobilenet.PCam(data, "train", transform=normalizer)
    assert len(raw) == SIZES["train"]
    image, label = raw[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 95, 95) and label in (0, 1)
    normalized, same_label = transformed[3]
    assert same_label == label and torch.equal(normalized, normalizer(image))
    assert torch.equal(raw[-1][0], raw[len(raw) - 1][0])
    with pytest.raises(IndexError):
        raw[len(raw)]
    with pytest.raises(ValueError, match="split"):
        mobilenet.PCam(data, "training")
    with pytest.raises(mobilenet.PCamError, match="not a directory"):
        mobilenet.PCam(os.path.join(data, "missing"), "train")


def test_torchvision_layout_and_val_split_name(data, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(data, root / "pcam")
    official = mobilenet.PCam(data, "valid")
    torchvision = mobilenet.PCam(str(root), "val")
    assert len(torchvision) == len(official)
    assert torch.equal(torchvision[0][0], official[0][0])
    with pytest.raises(mobilenet.PCamError, match="pcam/ subdirectory"):
        mobilenet.PCam(str(tmp_path), "train")


def _tensor_data(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 15, 15, generator=generator)
    labels = (images[:, 0].mean((1, 2)) > 0).long()  # learnable: the sign of channel 0's mean
    return torch.utils.data.TensorDataset(images, labels)


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2))


@pytest.mark.parametrize("as_loader", [False, True])
def test_trainer_takes_any_dataset_or_loader(tmp_path, as_loader):
    train_data, valid_data = _tensor_data(64, 0), _tensor_data(32, 1)
    if as_loader:
        train_data = torch.utils.data.DataLoader(train_data, batch_size=16, shuffle=True)
        valid_data = torch.utils.data.DataLoader(valid_data, batch_size=16)
    config = mobilenet.TrainConfig(epochs=3, batch_size=16, lr=1e-2, precision="fp32", augment=False)
    model = _small_net()
    before = mobilenet.evaluate_loss(model, valid_data, None, 16, show=False)[0]
    result = mobilenet.train(model, train_data, valid_data, config, str(tmp_path / "run"), log=lambda *a: None)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["best_valid_loss"] < before  # it learned something (the labels are a simple function)
    assert os.path.exists(tmp_path / "run" / "last.pt")
    model.load_state_dict(result["best_state"])
    assert mobilenet.evaluate_loss(model, valid_data, None, 16, show=False)[0] == pytest.approx(
        result["best_valid_loss"]
    )


@pytest.mark.parametrize("change, argument", [
    (dict(batch_size=0), "config.batch_size"), (dict(lr=float("nan")), "config.lr"),
    (dict(optimizer="lion"), "config.optimizer"), (dict(seed=-1), "config.seed"),
    (dict(batch_size=1000), "config.batch_size"), (dict(stain_jitter=1.0), "config.stain_jitter"),
    (dict(stain_jitter=0.05), "config.stain_jitter"),  # float images: nothing to re-stain
    (dict(warmup_steps=-1), "config.warmup_steps"), (dict(warmup_steps=2.5), "config.warmup_steps"),
    (dict(label_smoothing=1.0), "config.label_smoothing"), (dict(label_smoothing=True), "config.label_smoothing"),
    (dict(patience=0), "config.patience"), (dict(patience=True), "config.patience"),
    (dict(patience=1.5), "config.patience"),
])
def test_trainer_errors_name_the_config_field(change, argument):
    config = mobilenet.TrainConfig(epochs=1, precision="fp32", **change)
    with pytest.raises(mobilenet.UsageError) as raised:
        mobilenet.train(_small_net(), _tensor_data(64, 0), _tensor_data(8, 1), config, log=lambda *a: None)
    assert raised.value.argument == argument and str(raised.value).startswith(argument)
    assert "--" not in str(raised.value)  # no command-line options in the library's messages


def test_trainer_errors_name_the_argument(tmp_path):
    config = mobilenet.TrainConfig(epochs=1, batch_size=8, precision="fp32")
    uint8 = torch.utils.data.TensorDataset(torch.zeros(16, 3, 15, 15, dtype=torch.uint8), torch.zeros(16).long())
    cases = [((_tensor_data(16, 0), [1, 2, 3]), "valid_data"), ((uint8, uint8), "preprocess"),
             ((_tensor_data(16, 0), torch.utils.data.TensorDataset(torch.zeros(0, 3))), "valid_data")]
    for (train_data, valid_data), argument in cases:
        with pytest.raises(mobilenet.UsageError) as raised:
            mobilenet.train(_small_net(), train_data, valid_data, config, log=lambda *a: None)
        assert raised.value.argument == argument, str(raised.value)
    run_dir = str(tmp_path / "run")
    mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), config, run_dir, log=lambda *a: None)
    with pytest.raises(mobilenet.UsageError, match=r"run_dir: .*resume=True.*overwrite=True"):
        mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), config, run_dir, log=lambda *a: None)


@pytest.mark.parametrize("group", [None, 4])
def test_model_file_round_trip_and_prediction(data, tmp_path, group):
    torch.manual_seed(0)
    train = mobilenet.PCam(data, "train")
    normalizer = mobilenet.Normalizer.fit(train)
    # statistics of real inputs and a small random classifier: probabilities that differ from patch to patch
    # (an untrained model answers ~0.5 for every patch, and a prediction without the normaliser would pass)
    model = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=group, width_mult=0.25),
                                        normalizer(train.read(np.arange(16))))
    with torch.no_grad():
        model.classifier[-1].weight.normal_(0, 0.1)
    model.eval()
    path = str(tmp_path / "model.pt")
    mobilenet.save(model, path, normalizer, metadata={"note": "test"})
    loaded = mobilenet.load(path)
    assert not loaded.training and loaded.metadata == {"note": "test"} and loaded.arguments() == model.arguments()
    images = train.read(np.arange(4))
    with torch.no_grad():
        expected = torch.softmax(model(normalizer(images)), 1)
        without_normaliser = torch.softmax(model(images.float() / 255), 1)
    assert (expected - without_normaliser).abs().max() > 1e-3  # the comparisons below can fail
    x_path, _ = split_paths(data, "train")
    import h5py
    with h5py.File(x_path, "r") as handle:
        raw = handle["x"][:4]  # uint8 (4, 96, 96, 3), as in PCam's files
    # predict feeds channels_last batches on the CPU, whose kernels round differently from the contiguous forward
    # above: ~1e-5 relative on the logits (measured up to 3e-7 on these probabilities); 1e-5 leaves 30x room
    assert torch.allclose(mobilenet.predict(loaded, raw), expected, atol=1e-5)
    mobilenet.save(loaded, str(tmp_path / "again.pt"))  # the attached normalizer is kept
    assert torch.allclose(mobilenet.predict(mobilenet.load(str(tmp_path / "again.pt")), raw), expected, atol=1e-5)


@pytest.mark.parametrize("group", [None, 4])
def test_predict_feeds_channels_last_batches_and_leaves_the_model_as_it_is(group):
    torch.manual_seed(0)
    images = torch.randn(5, 3, 95, 95)
    # batch-norm statistics of the inputs and a small random classifier: probabilities that differ from image
    # to image (an untrained model answers ~0.5 for every one), so the comparison at the end can fail
    model = rotconv.randomize_batchnorm(mobilenet.mobilenet_v2(group=group, width_mult=0.25), images).train()
    with torch.no_grad():
        model.classifier[-1].weight.normal_(0, 0.1)
    seen = []
    model.features[0].register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    probabilities = mobilenet.predict(model, images, batch_size=2)
    assert seen == [True, True, True]  # three batches (2, 2, 1), each channels_last
    assert all(p.is_contiguous() for p in model.parameters())  # the model's own layout is untouched
    assert model.training  # and its mode (a new model is in training mode; predict ran it in eval mode)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(images), 1)  # contiguous forward: equal up to float rounding
    assert expected[:, 1].max() - expected[:, 1].min() > 1e-3
    assert torch.allclose(probabilities, expected, atol=1e-5)


def test_model_file_errors_name_the_file(tmp_path):
    model = mobilenet.mobilenet_v2(group=4, width_mult=0.25)
    with pytest.raises(ValueError, match="exported"):
        mobilenet.save(model.export(), str(tmp_path / "m.pt"))
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}}, checkpoint)
    with pytest.raises(ValueError, match=f"{checkpoint}: not a model file"):
        mobilenet.load(str(checkpoint))
    with pytest.raises(ValueError, match="not found"):
        mobilenet.load(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="images"):
        mobilenet.predict(model, torch.zeros(2, 95, 95))


def test_predict_command_names_bad_inputs(data, tmp_path, capsys):
    torch.manual_seed(0)
    path = str(tmp_path / "model.pt")
    mobilenet.save(mobilenet.mobilenet_v2(width_mult=0.25), path, mobilenet.Normalizer([0.5] * 3, [0.2] * 3))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for bad, message in ((str(text), "unknown kind"), (str(tmp_path / "none.h5"), "not found"),
                         (split_paths(data, "train")[1], "expected a dataset named 'x'")):
        assert predict.main([path, bad]) == 2
        assert message in capsys.readouterr().err
    np.save(tmp_path / "patches.npy", np.zeros((3, 96, 96, 3), np.uint8))
    assert predict.main([path, str(tmp_path / "patches.npy")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "source,index,probability_tumour,predicted" and len(out) == 4


from hypothesis import given, settings as hypothesis_settings, strategies as st  # noqa: E402

from mobilenet.training.loop import _epoch_plan  # noqa: E402


@hypothesis_settings(max_examples=30)
@given(size=st.integers(1, 50), steps=st.integers(1, 7), batch=st.integers(1, 9), epochs=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_fixed_step_epochs_stream_through_whole_passes(size, steps, batch, epochs, seed):
    # With steps_per_epoch every epoch has exactly steps * batch samples, and the epochs together are a stream
    # of complete shuffled passes: each aligned window of `size` samples is a permutation of the data.
    config = mobilenet.TrainConfig(batch_size=batch, steps_per_epoch=steps, seed=seed)
    orders = [_epoch_plan(config, epoch, size)[0] for epoch in range(1, epochs + 1)]
    assert all(order.size == steps * batch for order in orders)
    stream = np.concatenate(orders)
    for start in range(0, stream.size - size + 1, size):
        assert sorted(stream[start:start + size].tolist()) == list(range(size))
    assert np.array_equal(orders[-1], _epoch_plan(config, epochs, size)[0])  # a function of (seed, epoch)


from mobilenet.data import stain_jitter  # noqa: E402


@hypothesis_settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), size=st.integers(1, 9), sigma=st.floats(0.0, 0.5))
def test_stain_jitter_is_a_per_pixel_colour_map(seed, batch, size, sigma):
    # Identity factors give the image back (0 is read as 1 so that the optical density stays finite); any
    # factors act on each pixel's colour alone, so the map commutes with quarter turns and flips up to the
    # final rounding to uint8 (a float result within rounding of .5 may round either way: 1 level).
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    same = stain_jitter(images, torch.ones(batch, 3), torch.zeros(batch, 3))
    assert torch.equal(same, images.clamp(min=1))
    scales = 1 + sigma * (2 * torch.rand(batch, 3, generator=generator) - 1)
    shifts = sigma * (2 * torch.rand(batch, 3, generator=generator) - 1)
    jittered = stain_jitter(images, scales, shifts)
    for transform in (lambda t: torch.rot90(t, 1, (-2, -1)), lambda t: torch.flip(t, (-1,))):
        moved = stain_jitter(transform(images).contiguous(), scales, shifts)
        assert (moved.int() - transform(jittered).int()).abs().max() <= 1


def test_more_haematoxylin_turns_white_blue_purple_and_bad_shapes_are_named():
    # Haematoxylin absorbs red and green more than blue (stain vector 0.65, 0.70, 0.29): adding it to a white
    # patch must leave blue the brightest channel; eosin (0.07, 0.99, 0.11) mostly removes green.
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    haematoxylin = stain_jitter(white, torch.ones(1, 3), torch.tensor([[0.5, 0.0, 0.0]]))[0, :, 0, 0].tolist()
    eosin = stain_jitter(white, torch.ones(1, 3), torch.tensor([[0.0, 0.5, 0.0]]))[0, :, 0, 0].tolist()
    assert haematoxylin[2] > haematoxylin[0] and haematoxylin[2] > haematoxylin[1]
    assert eosin[1] < eosin[0] and eosin[1] < eosin[2]
    with pytest.raises(ValueError, match="batch"):
        stain_jitter(white.float(), torch.ones(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="scales"):
        stain_jitter(white, torch.ones(2, 3), torch.zeros(1, 3))


def test_stain_jitter_in_the_trainer_is_seeded_and_old_checkpoints_still_resume(data, tmp_path):
    # The plan's stain factors lie in their ranges, depend on (seed, epoch) alone, and leave the order and D4
    # choices of plans without stain jitter unchanged; a run trains on PCam's uint8 patches with it; a checkpoint
    # written before the field existed (no "stain_jitter" in its config) resumes when the field is at its default.
    plain = mobilenet.TrainConfig(batch_size=4, seed=3)
    jittered = mobilenet.TrainConfig(batch_size=4, seed=3, stain_jitter=0.1)
    first, second = _epoch_plan(jittered, 2, 16), _epoch_plan(jittered, 2, 16)
    reference = _epoch_plan(plain, 2, 16)
    assert all(np.array_equal(a, b) for a, b in zip(first[:3], reference[:3])) and reference[3] is None
    assert np.array_equal(first[3], second[3]) and first[3].shape == (16, 2, 3)
    assert np.all(np.abs(first[3][:, 0] - 1) <= 0.1) and np.all(np.abs(first[3][:, 1]) <= 0.1)
    train, valid = mobilenet.PCam(data, "train"), mobilenet.PCam(data, "valid")
    normalizer = mobilenet.Normalizer.fit(train)
    config = mobilenet.TrainConfig(epochs=1, batch_size=8, precision="fp32", stain_jitter=0.05)
    model = mobilenet.mobilenet_v2(width_mult=0.25)
    result = mobilenet.train(model, train, valid, config, str(tmp_path / "stain"), preprocess=normalizer,
                             log=lambda *a: None)
    assert np.isfinite(result["best_valid_loss"])
    run_dir = str(tmp_path / "old")
    old = mobilenet.TrainConfig(epochs=1, batch_size=8, precision="fp32")
    mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), old, run_dir, log=lambda *a: None)
    path = os.path.join(run_dir, "last.pt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["identity"]["config"]["stain_jitter"]
    torch.save(checkpoint, path)
    resumed = mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), old, run_dir, resume=True,
                              log=lambda *a: None)
    assert [h["epoch"] for h in resumed["history"]] == [1]
    with pytest.raises(mobilenet.UsageError, match="another run.*stain_jitter"):  # a real change still is one
        mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), replace(old, stain_jitter=0.1),
                        run_dir, resume=True, log=lambda *a: None)


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_gets_its_share_of_the_augmented_global_batch(data, processes):
    # The per-process batches of a distributed step, put together, are the one-process batch: the same
    # patches with the same quarter turns, flips and stain factors (the epoch plan is indexed by position).
    from mobilenet.data import open_pcam
    from mobilenet.training import TrainConfig
    from mobilenet.training.loop import _TrainSteps
    train = open_pcam(data)["train"]
    config = TrainConfig(epochs=1, batch_size=16, stain_jitter=0.1, seed=3)
    whole = _TrainSteps(train.batch, config, 16, 0, 16, 1)[0, 0]
    local = 16 // processes
    shares = [_TrainSteps(train.batch, config, 16, rank, local, 1)[0, 0] for rank in range(processes)]
    assert torch.equal(torch.cat([images for images, _ in shares]), whole[0])
    assert torch.equal(torch.cat([labels for _, labels in shares]), whole[1])


@given(lr=st.floats(1e-4, 1.0), warmup=st.integers(0, 50), total=st.integers(1, 400),
       schedule=st.sampled_from(["cosine", "constant"]))
def test_learning_rate_warms_up_linearly_then_follows_the_schedule(lr, warmup, total, schedule):
    # Rises by lr / warmup per step to exactly lr at the last warm-up step; never above lr; the cosine part
    # starts at lr and falls monotonically to ~0 (lr/2 (1 + cos(pi t/T)) at t = T - 1 is < lr * (pi/T)^2 / 4);
    # without warm-up it is the schedule alone.
    from mobilenet.training import learning_rate
    config = mobilenet.TrainConfig(lr=lr, warmup_steps=warmup, schedule=schedule)
    total = total + warmup
    rates = [learning_rate(config, step, total) for step in range(total)]
    assert all(0 <= rate <= lr * (1 + 1e-12) for rate in rates)
    for step in range(warmup):
        assert rates[step] == pytest.approx(lr * (step + 1) / warmup)
    after = rates[warmup:]
    if schedule == "constant":
        assert all(rate == lr for rate in after)
    else:
        assert after[0] == pytest.approx(lr)
        assert all(a >= b for a, b in zip(after, after[1:]))
        rest = total - warmup
        assert after[-1] <= lr * (math.pi / rest) ** 2 / 4 + 1e-12


def test_label_smoothing_changes_the_training_loss_not_the_selection_loss():
    # One step from the same state: smoothed cross-entropy equals (1 - e) CE + e * mean over classes of
    # -log p, the value F.cross_entropy documents (checked by hand here); validation loss stays plain CE.
    from mobilenet.training import training_step
    torch.manual_seed(0)
    net = _small_net()
    inputs, labels = torch.randn(8, 3, 9, 9), torch.randint(0, 2, (8,))
    with torch.no_grad():
        log_p = torch.log_softmax(net(inputs), 1)
    expected = (0.9 * -log_p.gather(1, labels[:, None]).mean() + 0.1 * -log_p.mean(1).mean()).item()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    loss, _ = training_step(net, optimizer, inputs, labels, "fp32", label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    plain, _ = training_step(net, optimizer, inputs, labels, "fp32")
    assert plain.item() == pytest.approx(-log_p.gather(1, labels[:, None]).mean().item(), rel=1e-6)
    assert abs(plain.item() - loss.item()) > 1e-4


@hypothesis_settings(max_examples=60)
@given(losses=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=12), patience=st.integers(1, 5))
def test_patience_is_spent_exactly_when_the_best_is_patience_epochs_old(losses, patience):
    # Replays a run epoch by epoch: the best is the first epoch with the lowest loss so far (a tie does not
    # improve); the rule fires at the first epoch that many epochs after the best, and never with None.
    best_epoch, best, fired = 0, math.inf, None
    for epoch, loss in enumerate(losses, 1):
        if loss < best:
            best_epoch, best = epoch, loss
        history = [{"epoch": e} for e in range(1, epoch + 1)]
        assert not mobilenet.training.patience_spent(history, best_epoch, None)
        if mobilenet.training.patience_spent(history, best_epoch, patience):
            fired = epoch
            break
    assert fired == (best_epoch + patience if best_epoch + patience <= len(losses) else None)
    assert not mobilenet.training.patience_spent([], 0, patience)


def test_early_stopping_ends_the_run_and_a_stopped_run_stays_stopped_on_resume(tmp_path):
    # Validation labels are the training labels flipped: once the first epoch has fitted the (learnable) labels,
    # further training raises the validation loss, so patience must end the run before its last epoch. The run
    # stops at the first epoch the rule allows; resuming with the same patience trains nothing more, without
    # patience (not part of the run's identity) it continues to the planned end.
    train_data = _tensor_data(64, 0)
    images, labels = _tensor_data(32, 1).tensors
    valid_data = torch.utils.data.TensorDataset(images, 1 - labels)
    config = mobilenet.TrainConfig(epochs=8, batch_size=16, lr=2e-2, precision="fp32", augment=False, patience=2)
    run_dir = str(tmp_path / "run")
    result = mobilenet.train(_small_net(), train_data, valid_data, config, run_dir, log=lambda *a: None)
    epochs = [h["epoch"] for h in result["history"]]
    stopped = result["stopped_epoch"]
    assert stopped is not None and stopped < config.epochs and epochs == list(range(1, stopped + 1))
    assert stopped == result["best_epoch"] + config.patience
    for last in range(1, stopped):  # the rule did not fire earlier
        history = result["history"][:last]
        best = min(history, key=lambda h: (h["valid_loss"], h["epoch"]))["epoch"]
        assert not mobilenet.training.patience_spent(history, best, config.patience)
    assert result["best_valid_loss"] == min(h["valid_loss"] for h in result["history"])
    lines = []
    again = mobilenet.train(_small_net(), train_data, valid_data, config, run_dir, resume=True, log=lines.append)
    assert again["stopped_epoch"] == stopped and len(again["history"]) == stopped
    assert any(line.startswith(f"early stop after epoch {stopped}") for line in lines)
    longer = mobilenet.train(_small_net(), train_data, valid_data, replace(config, patience=None), run_dir,
                             resume=True, log=lambda *a: None)
    assert longer["stopped_epoch"] is None and [h["epoch"] for h in longer["history"]] == list(range(1, 9))


def test_evaluation_and_prediction_give_the_model_back_in_its_mode():
    data = _tensor_data(32, 2)
    model = _small_net().train()
    running_mean = model[1].running_mean.clone()
    loss_in_training = mobilenet.evaluate_loss(model, data, None, 16, show=False)
    assert model.training  # a custom training loop that validates goes on training batch norm
    assert torch.equal(model[1].running_mean, running_mean)  # evaluated on running statistics, not updated
    assert mobilenet.evaluate_loss(model.eval(), data, None, 16, show=False) == loss_in_training
    assert not model.training
    result = mobilenet.train(model.train(), data, data, mobilenet.TrainConfig(epochs=1, batch_size=16,
                             precision="fp32", augment=False), log=lambda *a: None)
    assert not model.training and result["history"]  # train() returns the model in eval mode, as documented

    net = mobilenet.mobilenet_v2(group=4, width_mult=0.25).train()
    images = torch.rand(3, 96, 96, 3)  # float in [0, 1]; without a normalizer taken as normalised
    first = mobilenet.predict(net, images)
    assert net.training
    assert torch.equal(mobilenet.predict(net.eval(), images), first)


def test_normalizer_fits_uint8_rgb_images_and_refuses_what_it_would_misread():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 9, 9), dtype=torch.uint8, generator=generator)
    images[:, 1] //= 2  # a darker green channel
    labels = torch.zeros(64, dtype=torch.long)
    fitted = mobilenet.Normalizer.fit(torch.utils.data.TensorDataset(images, labels), samples=64)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(fitted.mean.flatten().double(), pixels.mean(1), atol=1e-6)
    assert torch.allclose(fitted.std.flatten().double(), pixels.std(1), atol=1e-6)
    # float images in [0, 1] (torchvision's ToTensor) would fit a mean near 0.002: refused, with what to do
    floats = torch.utils.data.TensorDataset(images.float() / 255, labels)
    with pytest.raises(ValueError, match=r"dataset: Normalizer.fit expects uint8 images \(0-255\), got torch.float32"):
        mobilenet.Normalizer.fit(floats)
    # (H, W, 3) items, as the PCam HDF5 files store them, would mix rows into channels: refused
    channels_last = torch.utils.data.TensorDataset(images.permute(0, 2, 3, 1), labels)
    with pytest.raises(ValueError, match=r"dataset: Normalizer.fit expects \(3, H, W\) images, got \(9, 9, 3\)"):
        mobilenet.Normalizer.fit(channels_last)


def _pixels_dataset(count: int, scale: float, classes: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 95, 95), generator=generator).float() * scale
    return torch.utils.data.TensorDataset(images, torch.randint(0, classes, (count,), generator=generator))


@pytest.mark.parametrize("which", ["train_data", "valid_data"])
@pytest.mark.parametrize("case, message", [
    ("raw pixels", r"the model refuses its items 0, 31: input: values up to 25\d"),
    ("labels", r"item \d+ holds label 2, not a class of the model's 2 outputs \(0-1\)"),
])
def test_data_the_model_cannot_take_is_refused_before_the_first_step(which, case, message):
    good = _pixels_dataset(32, 1 / 255 / 0.3)  # normalised enough for the model's check
    bad = _pixels_dataset(32, 1.0) if case == "raw pixels" else _pixels_dataset(32, 1 / 255 / 0.3, classes=3, seed=5)
    if case == "labels":  # the first and the last item hold a label beyond the model's classes
        bad.tensors[1][0], bad.tensors[1][-1] = 2, 2
    data = {"train_data": good, "valid_data": good, which: bad}
    model = mobilenet.mobilenet_v2(group=None, width_mult=0.25)
    lines = []
    with pytest.raises(mobilenet.UsageError, match=f"{which}: {message}"):
        mobilenet.train(model, data["train_data"], data["valid_data"], mobilenet.TrainConfig(epochs=1),
                        log=lines.append)
    assert not any("epoch 1" in str(line) for line in lines)  # before any training step
    assert model.training  # and the model is left in its mode


class _Relabelled(torch.utils.data.Dataset):
    """``data`` with the label of item ``position`` replaced by ``label``."""

    def __init__(self, data, position: int, label) -> None:
        self.data, self.position, self.label = data, position, label

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, label = self.data[index]
        return image, self.label if index == self.position else label


@pytest.mark.parametrize("which", ["train_data", "valid_data"])
@pytest.mark.parametrize("form", ["dataset", "loader"])
@pytest.mark.parametrize("label, message", [
    (2, r"(epoch 1, )?batch \d+ holds label 2, not a class of the model's 2 outputs \(0-1\)"),
    (-1, r"(epoch 1, )?batch \d+ holds label -1, not a class"),
    (0.5, r"labels must be integer class indices, got torch.float\d+ value 0.5"),
    (torch.tensor([0, 1]), r"labels of shape \((2,|8, 2)\) for (1|8) image"),
])
def test_labels_that_are_not_class_indices_are_refused_wherever_they_are(which, form, label, message):
    # an item in the middle of the data (the up-front check reads the first and last only): torch's
    # cross-entropy would raise IndexError (out of range), truncate 0.5 to class 0 or read floats as
    # probabilities; refused naming the argument and the batch
    good = _tensor_data(32, 0)
    bad = _Relabelled(good, 13, label)
    if form == "loader":  # the labels as a tensor of the label's kind: (32,) int64 or float, or (32, 2)
        images, labels = good.tensors
        labels = labels[:, None].repeat(1, 2) if torch.is_tensor(label) else labels.to(torch.as_tensor(label).dtype,
                                                                                       copy=True)
        labels[13] = label
        bad = torch.utils.data.TensorDataset(images, labels)
        good, bad = (torch.utils.data.DataLoader(data, batch_size=8) for data in (good, bad))
    data = {"train_data": good, "valid_data": good, which: bad}
    with pytest.raises(mobilenet.UsageError, match=f"{which}: .*{message}"):
        mobilenet.train(_small_net(), data["train_data"], data["valid_data"],
                        mobilenet.TrainConfig(epochs=1, batch_size=8, precision="fp32", augment=False),
                        log=lambda *a: None)


def test_labels_in_any_shape_of_one_per_image_and_whole_floats_are_class_indices():
    # PCam's label files hold (N, 1, 1, 1); a loader of them, or of whole-number floats, trains as int64
    data = _tensor_data(32, 0)
    images, labels = data.tensors
    config = mobilenet.TrainConfig(epochs=1, batch_size=8, precision="fp32", augment=False)
    results = []
    for form in (labels, labels.reshape(-1, 1, 1, 1).to(torch.uint8), labels.double()):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, form), batch_size=8)
        torch.manual_seed(0)
        results.append(mobilenet.train(_small_net(), loader, loader, config, log=lambda *a: None)["history"])
    assert results[1] == results[0] and results[2] == results[0]  # the same training, whatever the form


def test_numpy_and_torch_integers_are_taken_and_stored_as_plain_ints(tmp_path):
    # integers from np.arange or a numpy-read config: taken like Python ints, and stored as Python ints, so a
    # model file and a checkpoint still load with torch.load(weights_only=True)
    model = mobilenet.mobilenet_v2(group=np.int64(4), width_mult=0.25, min_fields=np.int32(2),
                                   num_classes=torch.tensor(2), input_size=np.int64(95))
    arguments = model.arguments()
    assert all(type(arguments[k]) is int for k in ("group", "min_fields", "num_classes", "input_size"))
    assert arguments["group"] == 4 and arguments["min_fields"] == 2
    path = str(tmp_path / "model.pt")
    mobilenet.save(model, path)
    assert mobilenet.load(path).arguments() == arguments
    config = mobilenet.TrainConfig(epochs=np.int64(1), batch_size=np.int64(8), seed=np.int64(3),
                                   steps_per_epoch=torch.tensor(1), patience=np.uint8(2), warmup_steps=np.int16(0))
    config.validate()
    assert all(type(getattr(config, k)) is int for k in ("epochs", "batch_size", "seed", "steps_per_epoch",
                                                         "patience", "warmup_steps"))
    mobilenet.train(_small_net(), _tensor_data(16, 0), _tensor_data(8, 1), config, str(tmp_path / "run"),
                    log=lambda *a: None)
    torch.load(str(tmp_path / "run" / "last.pt"), weights_only=True)  # no numpy scalar inside
    for bad in (np.True_, np.float64(1.0), torch.tensor([1, 2])):
        with pytest.raises(mobilenet.UsageError, match="config.epochs: expected an integer >= 1"):
            mobilenet.TrainConfig(epochs=bad).validate()
