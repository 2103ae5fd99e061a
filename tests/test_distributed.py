"""One schedule whatever the hardware: several processes, gradient accumulation, mixed precision, batch search."""

import os
import subprocess
import sys

import pytest
import torch

from clrx.config.build import build_optimizer
from clrx.config.schema import check_gpus, compose_run
from clrx.data.datasets import digits
from clrx.errors import ConfigError
from clrx.training.batch_size import find_batch_size, largest
from clrx.training.run import train
from clrx.training.session import accelerator_for
from tests.conftest import ROOT, main_in_process

PER_EPOCH = 1438 // 64
VAL_IMAGES = 359
# What is compared here (processes, accumulation, bf16 autocast) is CPU behaviour: pinned to the CPU.
COMMON = ("trainer.epochs=2", "trainer.save_model=false", "trainer.progress=false", "trainer.device=cpu")
ON_GPU = (*COMMON[:-1], "trainer.device=cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Layer norm treats each image alone, so splitting a batch changes only the order of float sums:
# runs on 1 or 2 processes, with or without accumulation, must then agree step by step.
PER_SAMPLE = ("model.name=test_efficientnet_ln", "policy.base_lr=0.005", "policy.max_lr=0.05")


def _points(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _single(tmp_path, uri, *overrides):
    return train(compose_run(*COMMON, f"tracking.uri={uri}", *overrides), tmp_path / "single").run_id


def test_two_processes_follow_the_single_process_schedule_in_one_run_and_directory(tmp_path, store):
    uri, client = store
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "ACCELERATE_USE_CPU": "1"}  # gloo, also beside GPUs
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "-m", "clrx", *COMMON, *PER_SAMPLE, f"tracking.uri={uri}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # both processes wrote to one run directory
    [run] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])  # rank 1 logged nothing
    single = _single(tmp_path, uri, *PER_SAMPLE)

    for key in ("lr", "momentum"):
        assert _points(client, run.info.run_id, key) == _points(client, single, key), key
    losses, reference = (_points(client, r, "train_loss") for r in (run.info.run_id, single))
    assert [s for s, _ in losses] == list(range(2 * PER_EPOCH))  # one point per optimizer step
    # Step 0: the same weights and images, only the order of float sums differs; later steps drift apart slowly.
    assert losses[0][1] == pytest.approx(reference[0][1], rel=1e-5)
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], rel=2e-2)
    [(_, first), (_, last)] = _points(client, run.info.run_id, "val_acc")
    assert last > 0.8 and last == pytest.approx(_points(client, single, "val_acc")[-1][1], abs=0.01)
    assert all(abs(acc * VAL_IMAGES - round(acc * VAL_IMAGES)) < 1e-6 for acc in (first, last))  # each image once
    assert run.data.params["trainer.batch_size"] == "64"  # the global batch: 32 on each process


def test_gradient_accumulation_keeps_the_schedule_and_losses_of_the_same_global_batch(tmp_path, store):
    uri, client = store
    single = _single(tmp_path, uri, *PER_SAMPLE)
    accumulated = train(
        compose_run(*COMMON, *PER_SAMPLE, "trainer.grad_accum=4", f"tracking.uri={uri}"), tmp_path / "accumulated"
    ).run_id
    for key in ("lr", "momentum"):
        assert _points(client, accumulated, key) == _points(client, single, key), key
    losses, reference = (_points(client, r, "train_loss") for r in (accumulated, single))
    assert [s for s, _ in losses] == list(range(2 * PER_EPOCH))
    # Step 0: the same weights and images, only the order of float sums differs; later steps drift apart slowly.
    assert losses[0][1] == pytest.approx(reference[0][1], rel=1e-5)
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], rel=2e-2)


def test_bf16_trains_on_cpu_with_the_same_schedule(tmp_path, store):
    uri, client = store
    single = _single(tmp_path, uri, *PER_SAMPLE)
    bf16 = train(compose_run(*COMMON, *PER_SAMPLE, "trainer.precision=bf16", f"tracking.uri={uri}"), tmp_path / "bf16")
    assert _points(client, bf16.run_id, "lr") == _points(client, single, "lr")
    losses, reference = (_points(client, r, "train_loss") for r in (bf16.run_id, single))
    # Same weights, same first batch: only autocast can make the first loss differ, and bfloat16 only by rounding.
    assert losses[0][1] != reference[0][1] and losses[0][1] == pytest.approx(reference[0][1], rel=0.02)
    fp32 = client.get_run(single).data.metrics["val_acc"]
    assert bf16.val_acc > 0.8 and bf16.val_acc == pytest.approx(fp32, abs=0.05)


def test_largest_doubles_then_bisects_and_respects_the_unit_and_cap():
    asked = []

    def fits(size):
        asked.append(size)
        return size <= 300

    assert largest(fits, 1, 1024) == 300
    assert asked[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # powers of two, then bisection
    assert largest(lambda size: size <= 300, 8, 1024) == 296 and largest(lambda size: True, 8, 100) == 100
    with pytest.raises(ConfigError, match="not even a batch of 4 fits"):
        largest(lambda size: False, 4, 64)


class _Capped(torch.nn.Module):
    """A model whose device 'runs out of memory' above a batch of ``cap``, as a GPU would."""

    def __init__(self, cap):
        super().__init__()
        self.cap, self.linear = cap, torch.nn.Linear(64, 10)

    def forward(self, images):
        if len(images) > self.cap:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.linear(images.flatten(1))


def test_find_batch_size_stops_below_out_of_memory_and_leaves_no_trace():
    data = digits(image_size=8)
    accelerator = accelerator_for(compose_run("trainer.device=cpu").trainer)
    model = _Capped(cap=100)
    optimizer = build_optimizer(compose_run().optimizer, model, lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert find_batch_size(accelerator, model, optimizer, data, grad_accum=1, cap=1024) == 100
    assert find_batch_size(accelerator, model, optimizer, data, grad_accum=4, cap=1024) == 400  # per micro batch
    assert find_batch_size(accelerator, model, optimizer, data, grad_accum=1, cap=48) == 48
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not optimizer.state


def test_found_batch_size_is_used_and_logged(tmp_path, store):
    uri, client = store
    cfg = compose_run(*COMMON, "trainer.epochs=1", "trainer.find_batch_size=true", "trainer.max_batch_size=200")
    cfg.tracking.uri = uri
    result = train(cfg, tmp_path)
    run = client.get_run(result.run_id)
    assert run.data.params["trainer.batch_size"] == "200" and result.steps == 1438 // 200


def test_a_multi_gpu_slurm_job_composes():
    cfg = compose_run(
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.nodes=2",
        return_hydra=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4 and launcher.nodes == 2


@needs_cuda
def test_fp16_skipped_steps_are_logged_and_the_schedule_still_advances(tmp_path, store):
    uri, client = store
    # An lr far too high overflows fp16 gradients: the scaler skips steps and halves its scale.
    cfg = compose_run(*ON_GPU, "trainer.epochs=1", "trainer.precision=fp16", f"tracking.uri={uri}")
    result = train(cfg, tmp_path)
    lrs = _points(client, result.run_id, "lr")
    assert [s for s, _ in lrs] == list(range(PER_EPOCH))  # one point per step, skipped or not
    skipped = client.get_metric_history(result.run_id, "amp/skipped_steps")
    assert skipped and skipped[-1].value == len(client.get_metric_history(result.run_id, "amp/skipped_step"))
    assert client.get_metric_history(result.run_id, "amp/loss_scale")


@needs_cuda
@pytest.mark.parametrize("layout", [(), ("trainer.channels_last=true",)], ids=["default", "channels_last"])
def test_bf16_on_the_gpu_keeps_the_schedule_and_learns(tmp_path, store, layout):
    uri, client = store
    single = _single(tmp_path, uri, *PER_SAMPLE)
    gpu = train(
        compose_run(*ON_GPU, *PER_SAMPLE, *layout, "trainer.precision=bf16", f"tracking.uri={uri}"), tmp_path / "gpu"
    )
    assert client.get_run(gpu.run_id).data.tags["clrx.device"].startswith("cuda")
    assert _points(client, gpu.run_id, "lr") == _points(client, single, "lr")
    assert gpu.val_acc > 0.8


def test_more_processes_than_gpus_is_refused_in_one_line():
    check_gpus(1, 1)
    check_gpus(8, 8)
    check_gpus(4, 0)  # no GPU: the processes run on the CPU
    with pytest.raises(ConfigError) as refused:
        check_gpus(2, 1)
    assert str(refused.value) == (
        "trainer.device: 2 processes on this machine but only 1 CUDA device; launch at most 1 "
        "(torchrun --nproc_per_node 1), or run on the CPU with ACCELERATE_USE_CPU=1 and trainer.device=cpu"
    )


def test_slurm_tasks_become_torch_processes():
    """The variables submitit's helper exports are the ones torch and Accelerate read."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    script = "import os; from clrx.__main__ import slurm_processes; slurm_processes(); "
    script += f"print(*map(os.environ.get, {names}))"
    env = {
        **os.environ,
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "PYTHONPATH": str(ROOT),
    }
    for name in names:
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5", "8", "1", "gpu07"]


def test_the_command_leaves_its_process_group_before_the_interpreter_ends(tmp_path, monkeypatch, capsys):
    """Gloo's threads still at work while an interpreter tears down can abort a rank at its exit."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        status, stderr = main_in_process(
            *COMMON, "trainer.dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", monkeypatch=monkeypatch, capsys=capsys
        )
        left = not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert status == 0, stderr
    assert left
