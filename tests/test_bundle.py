"""Every config of bundles/openkbp_dose run for real on a few OpenKBP patients, on the CPU, with a tiny network."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from monai_dose import DosePredictor
from monai_dose.checkpoints import latest_checkpoint, load_weights, network_weights
from monai_dose.cli import main
from monai_dose.data import patient_folder_datalist
from monai_dose.engines import ResumableCheckpointSaver
from monai_dose.inference import load_patient
from monai_dose.networks import DCNN
from monai_dose.transforms import input_channel_names
from monai_dose.utils import new_run_dir

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "openkbp_dose"
TINY = ["--network_def#channels", "[4,8,16]", "--network_def#dilations", "[2,3]"]
SMALL_DATA = ["--num_train", "2", "--num_val", "2", "--batch_size", "1", "--num_slices", "4"]
SMALL_RUN = ["--num_workers", "0", "--cache_workers", "0", "--val_interval", "1"]


def epochs_done(checkpoint: Path) -> int:
    """Epochs completed according to the trainer state in a training checkpoint."""
    trainer = torch.load(checkpoint, weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def bundle_run(
    *args: str, config: str | list[str] = "train.json", runner=(sys.executable,), timeout=600, check=True, **kw
):
    """Run ``python -m monai.bundle run`` and return the completed process (output captured), checked to succeed
    unless ``check`` is false."""
    files = [str(BUNDLE / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    config_file = files[0] if len(files) == 1 else str(files)
    cmd = [*runner, "-m", "monai.bundle", *args, "--config_file", config_file, "--logging_file", "False"]
    cmd += ["--meta_file", str(BUNDLE / "configs" / "metadata.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, openkbp_dir) -> Path:
    """The run folder of the training command (2 epochs on 2 patients) in a bundle root holding the shipped weights."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    shutil.copy2(BUNDLE / "models" / "model.pt", root / "models" / "model.pt")
    bundle_run(
        "run", "training", "--bundle_root", str(root), "--dataset_dir", str(openkbp_dir), "--epochs", "2",
        *SMALL_DATA, *SMALL_RUN, *TINY,
    )  # fmt: skip
    (run,) = (root / "runs").iterdir()
    return run


def test_training_writes_its_own_run_folder(trained):
    """Training writes into a new folder ``runs/<date-time>`` beside the bundle's ``models``: the shipped weights
    change only by an explicit copy."""
    root = trained.parent.parent
    assert re.fullmatch(r"\d{8}-\d{6}", trained.name)
    assert sorted(p.name for p in root.iterdir()) == ["models", "runs"]
    assert [p.name for p in (root / "models").iterdir()] == ["model.pt"]
    assert (root / "models" / "model.pt").read_bytes() == (BUNDLE / "models" / "model.pt").read_bytes()
    assert sorted(p.name for p in trained.iterdir()) == ["logs", "models"]


def test_training_writes_best_model_and_logs(trained):
    models = trained / "models"
    assert (models / "model.pt").is_file()
    state = torch.load(models / "model.pt", weights_only=True)
    net = DCNN(2, 45, 1, channels=(4, 8, 16), dilations=(2, 3))  # target_proximity: 15 channels x 3 slices
    net.load_state_dict(state)  # the best checkpoint holds the bare network's weights
    assert epochs_done(models / "checkpoint_last.pt") == 2
    assert any((trained / "logs").iterdir())  # TensorBoard events


@pytest.mark.slow
def test_fine_tune_starts_from_pretrained_weights(trained, tmp_path, openkbp_dir):
    """``--pretrained_ckpt`` loads the network weights (not the optimizer or epoch) before training."""
    pretrained = trained / "models" / "model.pt"
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--pretrained_ckpt", str(pretrained), "--learning_rate", "0.0", "--weight_decay", "0.0",
        *SMALL_DATA, *SMALL_RUN, *TINY,
    )  # fmt: skip
    before, after = (
        torch.load(pretrained, weights_only=True),
        torch.load(tmp_path / "models" / "model.pt", weights_only=True),
    )
    assert epochs_done(tmp_path / "models" / "checkpoint_last.pt") == 1
    for key, value in before.items():
        if value.is_floating_point() and "running" not in key:  # batch-norm statistics still move
            torch.testing.assert_close(after[key], value, msg=key)


def assert_first_layer_carried_over(pretrained: Path, trained_file: Path, old_set: str, new_set: str) -> None:
    """Trained with learning rate 0 from ``pretrained`` (of ``old_set``), the first layer of ``new_set`` holds each
    shared channel's weights (matched by name) and zeros for the new channels."""
    key = "encoders.0.0.conv.weight"
    before = torch.load(pretrained, weights_only=True)[key]
    after = torch.load(trained_file, weights_only=True)[key]
    old, new = input_channel_names(old_set, 1), input_channel_names(new_set, 1)
    assert after.shape[1] == len(new)
    for channel, name in enumerate(new):
        expected = before[:, old.index(name)] if name in old else torch.zeros_like(after[:, channel])
        torch.testing.assert_close(after[:, channel], expected, msg=name)


@pytest.mark.slow
def test_fine_tune_into_target_proximity_input(trained, tmp_path, openkbp_dir):
    """A checkpoint of the reference input set fine-tunes with the target-proximity input: the first layer keeps
    each channel's weights it had (matched by name) and starts the new channels at zero."""
    pretrained = tmp_path / "reference.pt"  # the trained target-proximity network without its proximity channels
    reference = DCNN(2, 36, 1, channels=(4, 8, 16), dilations=(2, 3))
    load_weights(reference, trained / "models" / "model.pt", "reference", 1, "target_proximity")
    torch.save(reference.state_dict(), pretrained)
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--input_set", "target_proximity", "--pretrained_ckpt", str(pretrained), "--pretrained_input_set",
        "reference", "--learning_rate", "0.0", "--weight_decay", "0.0", *SMALL_DATA, *SMALL_RUN, *TINY,
    )  # fmt: skip
    assert_first_layer_carried_over(pretrained, tmp_path / "models" / "model.pt", "reference", "target_proximity")


@pytest.mark.slow
def test_fine_tune_into_beam_prior_input_with_dvh_loss(trained, tmp_path, openkbp_dir):
    """The target-proximity network fine-tunes with the beam-prior input (the prior cached, sampled and augmented
    with the other volumes; its channels start at zero) under the DVH-aware loss (the label carries the masks)."""
    pretrained = trained / "models" / "model.pt"
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--input_set", "beam_prior", "--pretrained_ckpt", str(pretrained), "--pretrained_input_set",
        "target_proximity", "--dvh_weight", "0.5", "--learning_rate", "0.0", "--weight_decay", "0.0",
        *SMALL_DATA, *SMALL_RUN, *TINY,
    )  # fmt: skip
    assert_first_layer_carried_over(pretrained, tmp_path / "models" / "model.pt", "target_proximity", "beam_prior")


@pytest.mark.slow
def test_training_and_validation_in_a_frame(tmp_path, openkbp_dir):
    """``--frame [96,128]``: training crops its volumes to the frame and validation runs the network in it."""
    proc = bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--frame", "[96,128]", *SMALL_DATA, *SMALL_RUN, *TINY,
    )  # fmt: skip
    assert (tmp_path / "models" / "model.pt").is_file()
    assert re.search(r"Key metric: val_dose_score best value: \d+\.\d+ at epoch: 1", proc.stdout + proc.stderr)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    parser.update({"dataset_dir": str(openkbp_dir), "frame": [96, 128], "device": "cpu"})
    assert parser.get_parsed_content("validate#network").network.frame == [96, 128]


@pytest.mark.slow
def test_ema_is_validated_and_saved(trained, tmp_path, openkbp_dir):
    """``--ema_momentum m``: an exponential moving average of the weights, started from the pretrained weights,
    is what validation scores and ``model.pt`` holds; the epoch checkpoint keeps both for resuming."""
    pretrained, momentum = trained / "models" / "model.pt", 0.25
    # one volume and one slice batch: a single step, so a single EMA update
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--pretrained_ckpt", str(pretrained), "--ema_momentum", str(momentum), "--learning_rate", "0.01",
        *SMALL_DATA, *SMALL_RUN, *TINY, "--num_train", "1",
    )  # fmt: skip
    before = torch.load(pretrained, weights_only=True)
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)
    online, saved = checkpoint["model"], torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    ema = network_weights(f"{tmp_path / 'models' / 'checkpoint_last.pt'}#ema_model")
    assert saved.keys() == ema.keys() == before.keys()
    moved = 0
    for key, value in before.items():
        torch.testing.assert_close(saved[key], ema[key], msg=key)
        if value.is_floating_point():
            torch.testing.assert_close(ema[key], (1 - momentum) * value + momentum * online[key], msg=key)
            moved += not torch.equal(online[key], value)
    assert moved  # the step changed the online weights, so the average differs from both


@pytest.mark.slow
def test_swa_averages_epochs_from_start(trained, tmp_path, openkbp_dir):
    """``--swa_start 2``: the uniform average of the weights at the end of epochs 2 and 3 (not 1) is what the
    epoch-3 validation scores and ``model.pt`` holds; the epoch checkpoint keeps it for resuming."""
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "3",
        "--pretrained_ckpt", str(trained / "models" / "model.pt"), "--swa_start", "2", "--learning_rate", "0.01",
        *SMALL_DATA, *SMALL_RUN, *TINY, "--num_train", "1", "--val_interval", "3",
    )  # fmt: skip
    models = tmp_path / "models"
    epoch2, epoch3 = (torch.load(models / f"checkpoint_epoch={e}.pt", weights_only=True) for e in (2, 3))
    saved = torch.load(models / "model.pt", weights_only=True)
    assert epoch3["swa_model"]["n_averaged"] == 2
    swa = network_weights(f"{models / 'checkpoint_epoch=3.pt'}#swa_model")
    assert swa.keys() == saved.keys()
    moved = 0
    for key, value in saved.items():
        torch.testing.assert_close(swa[key], value, msg=key)
        if value.is_floating_point():
            torch.testing.assert_close(value, (epoch2["model"][key] + epoch3["model"][key]) / 2, msg=key)
            moved += not torch.equal(epoch2["model"][key], epoch3["model"][key])
    assert moved  # epoch 3 changed the weights, so the average differs from both epochs


def test_average_weights_command(trained, tmp_path, capsys):
    """``python -m monai_dose average-weights``: the uniform average of checkpoints of one network, which loads
    into it; another network or an unknown average is refused, naming the file, and nothing is written."""
    models = trained / "models"
    epochs = [models / f"checkpoint_epoch={e}.pt" for e in (1, 2)]
    first, last = (torch.load(e, weights_only=True)["model"] for e in epochs)
    out = tmp_path / "soup.pt"
    assert main(["average-weights", str(out), *map(str, epochs)]) == 0
    soup = torch.load(out, weights_only=True)
    DCNN(2, 45, 1, channels=(4, 8, 16), dilations=(2, 3)).load_state_dict(soup)
    moved = 0
    for key, value in soup.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (first[key] + last[key]) / 2, msg=key)
            moved += not torch.equal(first[key], last[key])
    assert moved

    other = tmp_path / "other.pt"
    torch.save(DCNN(2, 45, 1, channels=(4, 8, 8), dilations=(2, 3)).state_dict(), other)
    bad = tmp_path / "bad.pt"
    assert main(["average-weights", str(bad), str(models / "model.pt"), str(other)]) == 1
    assert f"{other}: not the network of" in capsys.readouterr().err
    assert main(["average-weights", str(bad), f"{models / 'model.pt'}#ema_model"]) == 1
    assert "holds no 'ema_model'" in capsys.readouterr().err
    assert main(["average-weights", str(bad), f"{models / 'checkpoint_last.pt'}#best"]) == 1
    assert "'#best' is not one of #ema_model, #swa_model" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.parametrize("input_set", ["reference", "target_proximity", "beam_prior"])
def test_training_cache_holds_the_deterministic_preprocessing(input_set, openkbp_dir):
    """The cache of the training set holds each volume loaded, cropped in-plane to the training frame around its
    possible-dose mask (the whole mask kept, plus the neighbour slices at its ends), its masks packed, its target
    proximity computed, slice-major (each axial slice contiguous, as the slice sampler reads them): only slice
    sampling and augmentation are left for every epoch."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    parser.update({"dataset_dir": str(openkbp_dir), "num_train": 1, "cache_workers": 0, "input_set": input_set})
    parser["frame"] = [96, 128]
    dataset = parser.get_parsed_content("train#dataset")
    cached = dataset._cache[0]
    mask = np.asarray(nib.load(dataset.data[0]["possible_dose_mask"]).dataobj) > 0
    slices = np.flatnonzero(mask.any((0, 1)))
    depth = min(slices[-1] + 1, mask.shape[2] - 1) - max(slices[0] - 1, 0) + 1  # mask slices and 1 neighbour
    assert cached["possible_dose_mask"].shape == (1, 96, 128, depth)
    assert cached["possible_dose_mask"].sum() == mask.sum()  # all of the mask inside the frame
    assert cached["structures"].shape[0] == 1 and cached["structures"].dtype == torch.int16  # packed
    assert ("target_proximity" in cached) == (input_set != "reference")
    assert ("beam_prior" in cached) == (input_set == "beam_prior")
    for key, volume in cached.items():
        if isinstance(volume, torch.Tensor):
            assert volume.movedim(-1, 0).is_contiguous(), key
            assert volume.shape[1:] == (96, 128, depth), key
    if input_set != "reference":
        assert cached["target_proximity"].shape[0] == 3 and cached["target_proximity"].max() == 1
    if input_set == "beam_prior":
        assert cached["beam_prior"].shape[0] == 1 and 0.5 < cached["beam_prior"].max() <= 1


def test_training_frame_by_default(openkbp_dir):
    """By default training crops each volume to the 128 x 128 frame around its possible-dose mask, which keeps an
    OpenKBP grid as it is in-plane, and to the mask's slices and their neighbours; ``frame: null`` trains on the
    whole grid."""
    from monai.bundle import ConfigParser

    cached = {}
    for frame in ("default", None):
        parser = ConfigParser()
        parser.read_config(BUNDLE / "configs" / "train.json")
        parser.update({"dataset_dir": str(openkbp_dir), "num_train": 1, "cache_workers": 0})
        if frame is None:
            parser["frame"] = None
        cached[frame] = parser.get_parsed_content("train#dataset")._cache[0]
    whole = cached[None]["ct"]
    assert whole.shape == (1, 128, 128, 128)
    slices = torch.nonzero(cached[None]["possible_dose_mask"][0].any(0).any(0)).flatten()
    first, last = max(int(slices[0]) - 1, 0), min(int(slices[-1]) + 2, 128)  # one neighbour on each side
    torch.testing.assert_close(torch.as_tensor(cached["default"]["ct"]), torch.as_tensor(whole[..., first:last]))


def test_adapted_weights_predict_as_before(tmp_path, openkbp_dir):
    """Zero weights for the new proximity channels: the adapted network predicts what the original did."""
    torch.manual_seed(0)
    original = DCNN(2, 36, 1, channels=(4, 8), dilations=(2,))
    torch.save(original.state_dict(), tmp_path / "reference.pt")
    adapted = load_weights(
        DCNN(2, 45, 1, channels=(4, 8), dilations=(2,)), tmp_path / "reference.pt", "target_proximity", 1, "reference"
    )
    patient = load_patient(patient_folder_datalist(openkbp_dir / "validation" / "pt_201")[0])
    inputs = (patient["ct"], patient["structures"], patient["possible_dose_mask"])
    doses = [
        DosePredictor(net, input_set=s, neighbours=1, device="cpu", amp=False)(*inputs)
        for net, s in ((original, "reference"), (adapted, "target_proximity"))
    ]
    np.testing.assert_allclose(doses[1], doses[0], atol=1e-4)
    with pytest.raises(ValueError, match="voxel spacing"):  # plain arrays carry no spacing
        DosePredictor(adapted, input_set="target_proximity", neighbours=1, device="cpu")(
            *(np.asarray(a) for a in inputs)
        )
    with pytest.raises(ValueError, match="takes 36 channels, not the 30"):
        load_weights(
            DCNN(2, 45, 1, channels=(4, 8), dilations=(2,)),
            tmp_path / "reference.pt",
            "target_proximity",
            1,
            "merged_targets",
        )


@pytest.mark.slow
def test_resume_after_kill(tmp_path, openkbp_dir):
    """Kill a run in its second epoch; the next run continues from the last epoch checkpoint."""
    args = ["--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), *SMALL_DATA, *TINY]
    args += ["--num_workers", "0", "--cache_workers", "0", "--val_interval", "1000", "--log_every", "1"]
    files = str([str(BUNDLE / "configs" / "train.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files, "--logging_file", "False"]
    proc = subprocess.Popen(
        [*cmd, *args, "--epochs", "1000"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    models = tmp_path / "models"
    deadline = time.time() + 300
    while not latest_checkpoint(models, "checkpoint_epoch=*.pt") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = latest_checkpoint(models, "checkpoint_epoch=*.pt")  # the kill may have cut the newest one short
    epoch_done = epochs_done(Path(saved))
    assert 1 <= epoch_done < 1000
    out = bundle_run("run", "training", *args, "--epochs", str(epoch_done + 2))
    assert f"Epoch [{epoch_done + 1}/{epoch_done + 2}]" in out.stderr  # continued, not restarted
    assert f"Epoch [1/{epoch_done + 2}]" not in out.stderr
    assert epochs_done(models / "checkpoint_last.pt") == epoch_done + 2


def test_latest_checkpoint_skips_a_truncated_one(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "checkpoint_epoch=1.pt")
    newest = tmp_path / "checkpoint_epoch=2.pt"
    newest.write_bytes((tmp_path / "checkpoint_epoch=1.pt").read_bytes()[:100])  # killed while saving
    os.utime(newest, (time.time() + 10, time.time() + 10))
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=1.pt")
    assert latest_checkpoint(tmp_path / "none") == ""


def test_new_run_dir_is_a_new_folder(tmp_path):
    first = Path(new_run_dir(tmp_path))
    first.mkdir()
    second = Path(new_run_dir(tmp_path))  # the same second: "-2" appended
    assert second.parent == first.parent == tmp_path and not second.exists()
    assert re.fullmatch(r"\d{8}-\d{6}(-2)?", second.name)


@pytest.mark.slow
def test_resume_keeps_the_best_model(tmp_path, openkbp_dir):
    """Fine-tuned from the shipped weights for 2 epochs, then resumed with a learning rate that wrecks the network:
    the resumed validation is compared with the best score before the stop, so no new best is claimed and
    ``model.pt`` keeps that epoch's weights; the epoch checkpoints from before the stop count towards the two kept."""
    args = ["--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), *SMALL_DATA, *SMALL_RUN]
    args += ["--pretrained_ckpt", str(BUNDLE / "models" / "model.pt"), "--num_train", "1", "--num_val", "1"]
    best_line = r"val_dose_score best value: (\S+) at epoch: (\d+)"
    stopped = re.findall(best_line, bundle_run("run", "training", *args, "--epochs", "2").stdout)[-1]
    models = tmp_path / "models"
    best = torch.load(models / "model.pt", weights_only=True)
    checkpoint = torch.load(models / "checkpoint_last.pt", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["lr"] = 1.0  # a resumed run takes its learning rate from the optimizer state
    torch.save(checkpoint, models / "checkpoint_last.pt")
    out = bundle_run("run", "training", *args, "--epochs", "3").stdout
    (score,) = re.findall(r"Epoch\[3\] Metrics -- val_dose_score: (\S+)", out)
    assert float(score) > float(stopped[0])  # worse than the best before the stop
    assert re.findall(best_line, out) == [stopped]  # still the best, from the same epoch
    for key, value in torch.load(models / "model.pt", weights_only=True).items():
        assert torch.equal(value, best[key]), key
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == [
        "checkpoint_epoch=2.pt",
        "checkpoint_epoch=3.pt",
    ]


def test_epoch_checkpoints_of_a_killed_run_count_towards_n_saved(tmp_path):
    """Resumed after epoch 1 (epoch 2's checkpoint cut short by a kill), the saver rewrites epoch 2 and removes
    the earlier run's checkpoints as new ones come, keeping the last two."""
    for epoch in (1, 2):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    trainer = Engine(lambda engine, batch: None)
    save_dict = {"model": torch.nn.Linear(1, 1), "trainer": trainer}
    ResumableCheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=2).attach(trainer)
    trainer.load_state_dict({"epoch": 1, "max_epochs": 4, "epoch_length": 1})
    trainer.run([0], max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]


@pytest.mark.slow
def test_evaluate_writes_and_prints_scores(trained, openkbp_dir, tmp_path):
    """Evaluation of a trained run's model (``--ckpt_path``) writes the predictions and scores and prints where,
    with the scores."""
    out_dir = tmp_path / "eval"
    out = bundle_run(
        "run", "--ckpt_path", str(trained / "models" / "model.pt"), "--dataset_dir", str(openkbp_dir),
        "--output_dir", str(out_dir), *SMALL_DATA, *TINY, config=["train.json", "evaluate.json"],
    ).stdout  # fmt: skip
    scores = json.loads((out_dir / "scores.json").read_text())
    assert set(scores["dose_error_per_patient"]) == {"pt_201", "pt_202"}
    assert np.isfinite(scores["dose_score"]) and np.isfinite(scores["dvh_score"])
    assert (out_dir / "scores_per_patient.csv").is_file() and (out_dir / "dvh" / "pt_201.png").is_file()
    assert f"predicted 2 of 2 patients into {out_dir / 'predictions'}" in out
    assert f"dose score {scores['dose_score']:.4f} Gy, DVH score {scores['dvh_score']:.4f} Gy -> {out_dir}" in out


@pytest.fixture
def new_patients(tmp_path, openkbp_dir) -> Path:
    """Two validation patients without their dose files."""
    root = tmp_path / "patients"
    for pid in ("pt_201", "pt_202"):
        shutil.copytree(openkbp_dir / "validation" / pid, root / pid, ignore=shutil.ignore_patterns("dose.nii.gz"))
    return root


def test_inference_on_new_patients(trained, new_patients, tmp_path, openkbp_dir):
    out_dir = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in new_patients.rglob("*.nii.gz")}
    out = bundle_run(
        "run", "--dataset_dir", str(new_patients), "--output_dir", str(out_dir),
        "--ckpt_path", str(trained / "models" / "model.pt"), *TINY, config="inference.json",
    ).stdout  # fmt: skip
    assert f"predicted 2 of 2 patients into {out_dir}" in out
    for pid in ("pt_201", "pt_202"):
        written = nib.load(out_dir / pid / "dose.nii.gz")
        ct = nib.load(new_patients / pid / "ct.nii.gz")
        mask = np.asanyarray(nib.load(new_patients / pid / "possible_dose_mask.nii.gz").dataobj)
        dose = np.asanyarray(written.dataobj)
        assert written.get_data_dtype() == np.float32 and dose.shape == (128, 128, 128)
        np.testing.assert_allclose(written.affine, ct.affine)
        np.testing.assert_allclose(written.affine, nib.load(openkbp_dir / "validation" / pid / "dose.nii.gz").affine)
        assert dose.min() >= 0 and not dose[mask == 0].any()
    assert {p: p.stat().st_mtime_ns for p in new_patients.rglob("*.nii.gz")} == before  # inputs untouched
    assert not list(out_dir.rglob(".tmp*"))


def test_load_patient_matches_monai_loader(new_patients):
    """Same values, types and affines as MONAI's LoadImaged."""
    from monai.transforms import LoadImaged

    from monai_dose.data import IMAGE_KEYS, patient_folder_datalist
    from monai_dose.inference import load_patient

    item = patient_folder_datalist(new_patients)[0]
    loaded = load_patient(item)
    reference = LoadImaged(list(IMAGE_KEYS), dtype=None, image_only=True)(item)
    for key in IMAGE_KEYS:
        assert loaded[key].dtype == reference[key].dtype
        assert torch.equal(loaded[key].as_tensor(), reference[key].as_tensor())
        torch.testing.assert_close(loaded[key].affine, reference[key].affine)


def test_load_patient_of_a_folder(tmp_path):
    """A patient folder loads as its datalist item does, into just the three inputs (``DosePredictor``'s
    arguments); a missing file is named."""
    from monai_dose.data import IMAGE_KEYS

    folder = REPO / "examples" / "pt_201"
    loaded, from_item = load_patient(folder), load_patient(patient_folder_datalist(folder)[0])
    assert list(loaded) == list(IMAGE_KEYS)
    for key in IMAGE_KEYS:
        assert torch.equal(loaded[key].as_tensor(), from_item[key].as_tensor())
        torch.testing.assert_close(loaded[key].affine, from_item[key].affine)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'ct.nii.gz'}: no such file"):
        load_patient(str(tmp_path))


def _break(patient: Path, problem: str) -> None:
    """Corrupt one input of ``patient`` in the way named by ``problem``."""

    def rewrite(name: str, array: np.ndarray, affine: np.ndarray | None = None) -> None:
        image = nib.load(patient / name)
        nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), patient / name)

    ct = np.asanyarray(nib.load(patient / "ct.nii.gz").dataobj)
    if problem == "missing file":
        (patient / "structures.nii.gz").unlink()
    elif problem == "different grids":
        rewrite("possible_dose_mask.nii.gz", np.zeros((128, 128, 100), np.uint8))
    elif problem == "different affine":
        rewrite("structures.nii.gz", np.asanyarray(nib.load(patient / "structures.nii.gz").dataobj), np.eye(4) * 2)
    elif problem == "NaN in CT":
        ct = ct.astype(np.float32)
        ct[60, 60, 60] = np.nan
        rewrite("ct.nii.gz", ct)
    elif problem == "structure channels":
        rewrite("structures.nii.gz", np.asanyarray(nib.load(patient / "structures.nii.gz").dataobj)[..., :9])
    elif problem == "empty mask":
        rewrite("possible_dose_mask.nii.gz", np.zeros((128, 128, 128), np.uint8))
    elif problem == "truncated file":
        data = (patient / "structures.nii.gz").read_bytes()
        (patient / "structures.nii.gz").write_bytes(data[: len(data) // 2])


PROBLEMS = {
    "missing file": "structures.nii.gz: no such file",
    "different grids": "differs from the CT grid",
    "different affine": "affine differs",
    "NaN in CT": "NaN",
    "structure channels": "expected 10 structure channels",
    "empty mask": "possible-dose mask is empty",
    "truncated file": "structures.nii.gz: not a readable NIfTI file",
}


@pytest.fixture(scope="module")
def tiny_predictor() -> DosePredictor:
    torch.manual_seed(0)
    return DosePredictor(DCNN(2, 36, 1, channels=(4, 8), dilations=(2,)), neighbours=1, device="cpu")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bad_patient_named_and_others_still_written(problem, new_patients, tmp_path, tiny_predictor, caplog):
    from monai_dose.data import patient_folder_datalist
    from monai_dose.inference import predict_patients

    _break(new_patients / "pt_202", problem)
    with pytest.raises(RuntimeError, match=r"1 of 2 patients failed \(pt_202: .*") as err:
        predict_patients(tiny_predictor, patient_folder_datalist(new_patients), tmp_path / "out")
    assert PROBLEMS[problem] in str(err.value)
    assert (tmp_path / "out" / "pt_201" / "dose.nii.gz").is_file()
    assert not (tmp_path / "out" / "pt_202").exists()
    assert any("pt_202" in r.getMessage() and PROBLEMS[problem] in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_bundle_inference_reports_bad_patient(trained, new_patients, tmp_path):
    """Through the bundle command: the run fails naming the patient, after writing the good one."""
    _break(new_patients / "pt_202", "empty mask")
    proc = bundle_run(
        "run", "--dataset_dir", str(new_patients), "--output_dir", str(tmp_path / "out"),
        "--ckpt_path", str(trained / "models" / "model.pt"), *TINY, config="inference.json", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    failure = r"pt_202: \S*possible_dose_mask.nii.gz: the possible-dose mask is empty"
    assert re.fullmatch(rf"RuntimeError: 1 of 2 patients failed \({failure}\)", proc.stderr.splitlines()[-1])
    assert (tmp_path / "out" / "pt_201" / "dose.nii.gz").is_file()


FAILED_RUNS = {  # the arguments after `python -m monai.bundle`, the configs, pt_201's problem, the last line
    "inference": (
        ["run"],
        ["inference.json"],
        "different affine",
        r"RuntimeError: 1 of 1 patients failed \(pt_201: \S+/pt_201/structures.nii.gz: affine differs from the CT "
        r"affine\)",
    ),
    "training": (
        ["run", "training"],
        ["train.json"],
        "missing file",
        r"FileNotFoundError: \S*pt_201/structures.nii.gz: no such file",
    ),
    "evaluation": (
        ["run"],
        ["train.json", "evaluate.json"],
        "missing file",
        r"FileNotFoundError: \S*pt_201/structures.nii.gz: no such file",
    ),
}


@pytest.mark.parametrize(
    "workflow", [w if w == "inference" else pytest.param(w, marks=pytest.mark.slow) for w in FAILED_RUNS]
)
def test_bundle_run_ends_with_the_patient_and_problem(workflow, tmp_path):
    """A bad input ends a bundle run with one line naming the file, so the patient, and the problem, not MONAI's
    ``Failed to evaluate ConfigExpression``; exit status 1. Inference reports it after predicting the other patients,
    training and evaluation when they load it. On examples/pt_201 (no dose) as training and validation patient."""
    args, configs, problem, last_line = FAILED_RUNS[workflow]
    data = tmp_path / "data"
    shutil.copytree(REPO / "examples" / "pt_201", data / "pt_201")
    item = {"id": "pt_201", **{k: f"pt_201/{k}.nii.gz" for k in ("ct", "structures", "possible_dose_mask", "dose")}}
    (data / "dataset.json").write_text(json.dumps({"training": [item], "validation": [item]}))
    _break(data / "pt_201", problem)
    proc = bundle_run(
        *args, "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--run_dir", str(tmp_path / "run"),
        config=configs, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert re.fullmatch(last_line, proc.stderr.splitlines()[-1]), proc.stderr[-3000:]


@pytest.mark.slow
def test_predictor_from_bundle_matches_bundle_inference(trained, new_patients, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    shutil.copytree(trained / "models", bundle / "models")
    overrides = {"network_def#channels": [4, 8, 16], "network_def#dilations": [2, 3]}
    predictor = DosePredictor.from_bundle(bundle, device="cpu", **overrides)
    patient = new_patients / "pt_201"
    arrays = [
        np.asanyarray(nib.load(patient / f"{k}.nii.gz").dataobj) for k in ("ct", "structures", "possible_dose_mask")
    ]
    dose = predictor(*arrays, voxel_spacing=nib.load(patient / "ct.nii.gz").header.get_zooms()[:3])
    assert dose.shape == (128, 128, 128) and dose.dtype == np.float32 and dose.min() >= 0
    bundle_run(
        "run", "--dataset_dir", str(patient), "--output_dir", str(tmp_path / "out"),
        "--ckpt_path", str(trained / "models" / "model.pt"), *TINY, config="inference.json",
    )  # fmt: skip
    np.testing.assert_allclose(np.asanyarray(nib.load(tmp_path / "out" / "pt_201" / "dose.nii.gz").dataobj), dose)


@pytest.mark.slow
@pytest.mark.parametrize("averaging", [[], ["--ema_momentum", "0.5"], ["--swa_start", "1"]], ids=["-", "ema", "swa"])
def test_two_process_ddp_training_on_cpu(averaging, tmp_path, openkbp_dir):
    runner = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        *SMALL_DATA, *SMALL_RUN, *TINY, *averaging, config=["train.json", "multi_gpu_train.json"], runner=runner,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    DCNN(2, 45, 1, channels=(4, 8, 16), dilations=(2, 3)).load_state_dict(
        torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    )  # the bare network, also when averaged
    assert epochs_done(tmp_path / "models" / "checkpoint_last.pt") == 1


@pytest.mark.slow
def test_metadata_and_network_checks(trained, tmp_path):
    configs = BUNDLE / "configs"
    meta = ["--meta_file", str(configs / "metadata.json")]
    schema = ["--filepath", str(configs / "metadata_schema.json")]
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", *meta, *schema],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    common = [*meta, "--config_file", str(configs / "inference.json"), *TINY]
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", *common, "--device", "cpu"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    ts = tmp_path / "model.ts"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(trained / "models" / "model.pt"), *common],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    exported = torch.jit.load(ts)
    x = torch.rand(1, 45, 64, 64)
    reference = DCNN(2, 45, 1, channels=(4, 8, 16), dilations=(2, 3))
    reference.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    torch.testing.assert_close(exported(x), reference.eval()(x))


def test_inference_config_matches_training_config():
    """The network and its inputs are defined in both configs: they must not drift apart."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    infer = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    keys = ("spatial_dims", "input_set", "neighbours", "in_channels", "mask_channel", "precision", "network_def")
    for key in (*keys, "pixdim", "min_pixdim", "max_pixdim", "divisor", "sw_batch_size", "frame"):
        assert train[key] == infer[key], key


TINY_3D = {
    "train_3d.json": TINY,
    "cascade_3d.json": [
        *("--network_def#first#channels", "[4,8]", "--network_def#first#strides", "[2]"),
        *("--network_def#second#channels", "[4,8]", "--network_def#second#strides", "[2]"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(TINY_3D))
def test_3d_variants_train(variant, tmp_path, openkbp_dir):
    """The 3D DCNN and the 3D cascade train by layering their config on train.json."""
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        "--num_train", "1", "--num_val", "1", *SMALL_RUN, *TINY_3D[variant], config=["train.json", variant],
    )  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    conv_weights = [v for k, v in state.items() if k.endswith("conv.weight") or k.endswith("conv.unit0.conv.weight")]
    assert conv_weights and all(w.ndim == 5 for w in conv_weights)  # 3D convolutions


@pytest.mark.slow
def test_gpu_settings_train_epochs_of_several_passes(tmp_path, openkbp_dir):
    """train_gpu.json layered on train.json: an epoch draws every cached volume ``passes_per_epoch`` times."""
    bundle_run(
        "run", "training", "--run_dir", str(tmp_path), "--dataset_dir", str(openkbp_dir), "--epochs", "1",
        *SMALL_DATA, *SMALL_RUN, *TINY, "--passes_per_epoch", "3", "--validate#dataloader#num_workers", "0",
        config=["train.json", "train_gpu.json"],
    )  # fmt: skip
    trainer = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert trainer["epoch_length"] == 2 * 3  # 2 patients x 3 passes, 1 volume per step
    assert (tmp_path / "models" / "model.pt").is_file()
