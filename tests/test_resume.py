"""Checkpoints and resume: a run killed mid-epoch continues exactly where it was, in the same MLflow run."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from clrx.config.schema import compose_run
from clrx.errors import ConfigError
from clrx.tracking.service import LOST
from clrx.training import checkpoint
from clrx.training.run import train
from tests.conftest import ROOT, main_in_process
from tests.test_evaluation import STILL, STILL_PER_EPOCH

PER_EPOCH = 1438 // 64
# Every step draws random numbers: a random crop and flip of each image, dropout in the model and mixup's
# weight; clipping and an average of the weights carry state. Identical losses after a resume are a CPU
# promise: GPU kernels need trainer.deterministic=true for it.
MNIST_PER_EPOCH = 64 // 8
RANDOM_RUN = (
    "dataset=mnist",
    "dataset.crop_padding=2",
    "dataset.flip=true",
    "+model.drop_rate=0.3",
    "loss.mixup_alpha=0.4",
    "trainer.clip_grad_norm=3.0",
    "trainer.ema=0.9",
    "trainer.batch_size=8",
    "trainer.epochs=4",
    "trainer.checkpoint_every=3",
    "trainer.keep_last=3",
    "trainer.save_model=false",
    "trainer.device=cpu",
)


def _points(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_killed_run_resumes_into_the_same_mlflow_run_with_identical_steps(
    tmp_path, store, data_root, monkeypatch, capsys
):
    uri, client = store
    run = (*RANDOM_RUN, f"dataset.root={data_root}", f"tracking.uri={uri}")
    reference = train(compose_run(*run, "trainer.progress=false"), tmp_path / "reference")

    run_dir = tmp_path / "run"
    killed_at = 2 * MNIST_PER_EPOCH + 5  # 21 steps taken: mid-epoch 3, just after the checkpoint at step 21
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "killed_at_step.py"), str(killed_at), *run]
        + [f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    runs = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    [killed] = [r for r in runs if r.info.run_id != reference.run_id]
    # The process had no chance to close it; its store process saw it die and ended the run.
    assert killed.info.status == "FAILED" and killed.data.tags["clrx.failure"] == LOST
    # Checkpoints every 3 steps and at epoch ends (8, 16): the last three of 3, 6, 8, 9, ..., 16, 18, 21.
    saved = sorted(p.name for p in (run_dir / checkpoint.DIRECTORY).iterdir())
    assert saved == ["step-00000016.pt", "step-00000018.pt", "step-00000021.pt"]
    newest = checkpoint.path_for(run_dir / checkpoint.DIRECTORY, 21)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn: the one before must be used

    resume = (*run, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    status, stderr = main_in_process(*resume, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, stderr
    log = (run_dir / "__main__.log").read_text()
    assert f"{newest} cannot be read" in log and "step 18" in log

    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and "clrx.failure" not in resumed.data.tags
    assert "step-00000018.pt" in resumed.data.tags["clrx.resumed_from"]
    total = 4 * MNIST_PER_EPOCH
    for key in ("lr", "momentum", "train_loss", "grad_norm"):
        points = _points(client, killed.info.run_id, key)
        assert [step for step, _ in points] == list(range(total)), key  # no gap, no duplicate
        assert points == _points(client, reference.run_id, key), key  # same values, losses included
    for key in ("val_acc", "val_loss", "val_acc_ema", "val_loss_ema", "train_loss_epoch", "best_val_acc"):
        assert _points(client, killed.info.run_id, key) == _points(client, reference.run_id, key), key


def test_resume_refuses_a_changed_schedule_and_names_what_changed(tmp_path, store):
    uri, _ = store
    run_dir = tmp_path / "run"
    first = ("trainer.epochs=1", "trainer.resume=auto", "trainer.progress=false")  # resumable: checkpoints on
    train(compose_run(*first, f"tracking.uri={uri}"), run_dir)
    changed = compose_run("trainer.epochs=1", "policy.max_lr=1.0", "trainer.resume=auto", f"tracking.uri={uri}")
    expected = r"differs from checkpoint .* in policy.max_lr \(0.5 -> 1.0\); .* trainer.resume_changed=true"
    with pytest.raises(ConfigError, match=expected):
        train(changed, run_dir)
    changed.trainer.resume_changed = True
    assert train(changed, run_dir).steps == PER_EPOCH  # finished already: nothing left to train


def test_checkpoints_are_kept_as_asked_and_none_are_written_with_keep_last_zero(tmp_path, store):
    uri, _ = store
    common = ("trainer.epochs=2", "trainer.checkpoint_every=4", "trainer.progress=false", f"tracking.uri={uri}")
    train(compose_run(*common, "trainer.keep_last=2"), tmp_path / "kept")
    kept = sorted(p.name for p in (tmp_path / "kept" / checkpoint.DIRECTORY).iterdir())
    assert kept == ["step-00000040.pt", "step-00000044.pt"]  # the last mid-epoch one and the end of epoch 2
    train(compose_run(*common, "trainer.keep_last=0"), tmp_path / "none")
    assert not (tmp_path / "none" / checkpoint.DIRECTORY).exists()


def test_checkpoints_are_written_only_when_asked_for(tmp_path, store):
    uri, _ = store
    common = ("trainer.epochs=2", "trainer.progress=false", "trainer.save_model=false", f"tracking.uri={uri}")
    train(compose_run(*common), tmp_path / "default")
    assert not (tmp_path / "default" / checkpoint.DIRECTORY).exists()
    train(compose_run(*common, "trainer.checkpoint_epochs=true"), tmp_path / "epochs")
    saved = sorted(p.name for p in (tmp_path / "epochs" / checkpoint.DIRECTORY).iterdir())
    assert saved == [f"step-{PER_EPOCH:08d}.pt", f"step-{2 * PER_EPOCH:08d}.pt"]


def test_an_explicit_unreadable_checkpoint_is_an_error_not_a_fallback(tmp_path):
    bad = tmp_path / "checkpoints" / "step-00000010.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.find(str(bad), tmp_path)
    assert checkpoint.find("auto", tmp_path / "elsewhere") is None  # nothing to resume: start afresh
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        checkpoint.find(str(tmp_path), tmp_path)


def test_a_resumed_run_keeps_its_best_so_far_and_the_patience_it_used(tmp_path, store):
    uri, client = store
    watched = (*STILL, "trainer.save_best=val_acc", "trainer.early_stop=2", "trainer.checkpoint_epochs=true")
    reference = train(compose_run(*watched, "trainer.epochs=6", f"tracking.uri={uri}"), tmp_path / "reference")
    run_dir = tmp_path / "run"
    first = train(compose_run(*watched, "trainer.epochs=2", f"tracking.uri={uri}"), run_dir)  # best at 1, 1 stale
    assert first.early_stop is None
    more = ("trainer.epochs=6", "trainer.resume=auto", "trainer.resume_changed=true", f"tracking.uri={uri}")
    resumed = train(compose_run(*watched, *more), run_dir)
    # A resume that forgot would take epoch 3 as its first best and stop after epoch 5.
    assert resumed.run_id == first.run_id and resumed.steps == reference.steps == 3 * STILL_PER_EPOCH
    tags = [client.get_run(result.run_id).data.tags for result in (reference, resumed)]
    for key in ("clrx.best.metric", "clrx.best.value", "clrx.best.step", "clrx.best.epoch", "clrx.early_stop"):
        assert tags[0][key] == tags[1][key], key
    saved = [
        torch.load(path / checkpoint.DIRECTORY / checkpoint.BEST)["best"] for path in (tmp_path / "reference", run_dir)
    ]
    assert saved[0] == saved[1] and saved[0]["step"] == STILL_PER_EPOCH
