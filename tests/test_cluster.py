"""Runs over several machines: every rank resumes from the main process's checkpoint or all stop, a launch that
would train alone is refused, a lost process leaves no RUNNING run, batch norm over the global batch, threads.

Two machines are two torchrun agents on 127.0.0.1 (``--nnodes 2``, each its own ``--node_rank``, gloo on the CPU).
A node without the shared disk is a mount namespace in which node 0's run directory is an empty tmpfs.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d

from clrx.config.schema import check_claims, check_launcher, compose_run
from clrx.errors import ConfigError
from clrx.tracking.service import LOST
from clrx.training import checkpoint, ranks
from clrx.training.run import train
from clrx.training.session import threads
from clrx.training.sync_bn import GlobalBatchNorm, synchronized
from tests.conftest import ROOT, free_port, main_in_process

STEPS = 1438 // 64
RUN = ("trainer.epochs=1", "trainer.device=cpu", "trainer.save_model=false", "trainer.progress=false")
OWN_DISK = ["unshare", "--user", "--map-current-user", "--mount"]
KILLED = str(ROOT / "tests" / "helpers" / "killed_at_step.py")


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _node(node, port, args, cwd, script=("-m", "clrx"), own_disk=None):
    """Node ``node`` of two, one process each. ``own_disk``: (folder, contents): this node sees, at ``folder``,
    a disk of its own holding a copy of ``contents``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    command += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    command += [*script, *args]
    if own_disk is not None:
        mounted = 'mount -t tmpfs none "$0" && cp -r "$1/." "$0" && shift && exec "$@"'
        command = [*OWN_DISK, "sh", "-c", mounted, *map(str, own_disk), *command]
    return subprocess.Popen(command, cwd=cwd, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("clrx:")]


def _points(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("on_node_1", ["nothing", "an older checkpoint"])
def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank_in_one_line(tmp_path, store, on_node_1):
    if subprocess.run([*OWN_DISK, "true"], capture_output=True).returncode:
        pytest.skip("this machine allows no mount namespaces: one node's own disk cannot be made")
    uri, client = store
    run = (*RUN, "trainer.checkpoint_every=5", f"tracking.uri={uri}")
    dirs = [tmp_path / f"node{node}" for node in (0, 1)]
    train(compose_run(*run), dirs[0])  # checkpoints on node 0's disk only: steps 20 and 22
    newest = checkpoint.path_for(dirs[0] / checkpoint.DIRECTORY, STEPS)
    seen = tmp_path / "seen on node 1"  # node 1's own disk where node 0's run directory is
    (seen / checkpoint.DIRECTORY).mkdir(parents=True)
    if on_node_1 == "an older checkpoint":  # the same path, another step: as a stale local copy would be
        (seen / checkpoint.DIRECTORY / newest.name).write_bytes(checkpoint.path_for(newest.parent, 20).read_bytes())
    port, started = free_port(), time.monotonic()
    nodes = [
        _node(node, port, [*run, "trainer.resume=auto", f"hydra.run.dir={dirs[node]}"], tmp_path, own_disk=disk)
        for node, disk in ((0, None), (1, (dirs[0], seen)))
    ]
    stderr = [process.communicate(timeout=300)[1] for process in nodes]
    problem = (
        f"cannot read {newest}" if on_node_1 == "nothing" else f"reads another checkpoint at {newest} (step 20, not 22)"
    )
    said = f"clrx: error: trainer.resume: node 1 {problem}; {ranks.SHARED}"
    for process, err in zip(nodes, stderr, strict=True):
        assert process.returncode != 0 and _errors(err) == [said], err[-3000:]
    assert time.monotonic() - started < 120
    [finished] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    assert finished.info.status == "FINISHED"  # the checkpoint's run, untouched; no other


@pytest.mark.parametrize("killed", [1, 0], ids=["rank 1 lost", "main process lost"])
def test_a_lost_process_fails_the_run_within_seconds_and_both_nodes_resume_it_exactly(tmp_path, store, killed):
    uri, client = store
    run = (*RUN, "trainer.checkpoint_every=5", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}")
    port = free_port()
    nodes = [
        _node(node, port, ["13", *run], tmp_path, script=(KILLED,))
        if node == killed
        else _node(node, port, run, tmp_path)
        for node in (0, 1)
    ]
    nodes[killed].wait(timeout=300)  # its agent ends with it
    lost_at = time.monotonic()
    [started] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    while client.get_run(started.info.run_id).info.status == "RUNNING" and time.monotonic() < lost_at + 60:
        time.sleep(0.2)
    ended_after = time.monotonic() - lost_at
    failed = client.get_run(started.info.run_id)
    assert failed.info.status == "FAILED" and ended_after < 20, ended_after
    survivor = nodes[1 - killed]
    err = survivor.communicate(timeout=60)[1]
    assert survivor.returncode != 0
    [said] = _errors(err)
    resume = f"resume with trainer.resume=auto hydra.run.dir={tmp_path / 'run'} on every node"
    if killed == 1:  # the main process ends its own run
        assert said.startswith("clrx: error: a process of the launch was lost (") and said.endswith(resume), err
        assert failed.data.tags["clrx.failure"].startswith("ProcessLost: a process of the launch was lost")
        return
    assert said.startswith("clrx: error: the main process was lost (") and said.endswith(resume), err
    assert "ended FAILED" in said
    # Its store process saw it die and ended the run at once; a survivor would have after GRACE_S.
    assert failed.data.tags["clrx.failure"] == LOST or "main process was lost" in failed.data.tags["clrx.failure"]

    port = free_port()
    resumed = [_node(node, port, [*run, "trainer.resume=auto"], tmp_path) for node in (0, 1)]
    for process in resumed:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    finished = client.get_run(failed.info.run_id)
    assert finished.info.status == "FINISHED" and "step-00000010.pt" in finished.data.tags["clrx.resumed_from"]
    reference = train(compose_run(*RUN, f"tracking.uri={uri}"), tmp_path / "reference").run_id
    assert _points(client, failed.info.run_id, "lr") == _points(client, reference, "lr")
    assert [step for step, _ in _points(client, failed.info.run_id, "train_loss")] == list(range(STEPS))


def test_a_launch_that_would_train_alone_is_refused_before_the_store(tmp_path, store):
    uri, client = store
    port = free_port()
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_machines", "2"]
    launch += ["--machine_rank", "0"]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", "clrx"]
    env = {**_env(), "HF_HOME": str(tmp_path / "hf")}  # no accelerate config of the user's
    done = subprocess.run(
        [*launch, *RUN, f"tracking.uri={uri}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "returned non-zero exit status 2" in done.stderr, done.stderr[-3000:]  # clrx's status, under Accelerate's
    assert "Error executing job" not in done.stderr
    [said] = set(_errors(done.stderr))  # Accelerate 1.16 and later repeat the process's stderr in their own error
    assert said.startswith("clrx: error: accelerate launch --num_machines: Accelerate set MASTER_ADDR but started")
    assert [e.name for e in client.search_experiments()] == ["Default"] and not client.search_runs(["0"])


def test_environments_that_claim_several_processes_for_one_are_refused():
    check_claims({})
    check_claims({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"})  # torchrun
    with pytest.raises(ConfigError) as alone:
        check_claims({"MASTER_ADDR": "node7"})
    assert str(alone.value).startswith("MASTER_ADDR: is set but WORLD_SIZE is not")
    cfg = compose_run("hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", return_hydra=True)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.tasks_per_node: submitit_local would start 2 copies"):
        check_launcher(cfg.hydra.launcher)
    check_launcher(compose_run("hydra/launcher=submitit_local", return_hydra=True).hydra.launcher)
    check_launcher(
        compose_run("hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4", return_hydra=True).hydra.launcher
    )


def test_submitit_local_with_several_tasks_is_refused_before_the_sweep_starts(tmp_path, store, monkeypatch, capsys):
    uri, client = store
    monkeypatch.chdir(tmp_path)
    args = ("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *RUN, f"tracking.uri={uri}")
    status, stderr = main_in_process(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and _errors(stderr) == [
        "clrx: error: hydra.launcher.tasks_per_node: submitit_local would start 2 copies of each job, each training "
        "alone; set it to 1 (several processes: torchrun --nproc_per_node 2, or hydra/launcher=slurm on a cluster)"
    ], stderr
    assert [e.name for e in client.search_experiments()] == ["Default"] and not client.search_runs(["0"])


def test_sync_bn_on_two_processes_trains_as_one_process_with_the_same_global_batch(tmp_path, store, monkeypatch):
    uri, client = store
    run = (*RUN, "model=test_resnet", "trainer.batch_size=128", "policy.base_lr=0.001", "policy.max_lr=0.01")
    run = (*run, f"tracking.uri={uri}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clrx"]
    done = subprocess.run(
        [*command, *run, "trainer.sync_bn=true"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [synced] = client.search_runs([client.get_experiment_by_name("clrx").experiment_id])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = train(compose_run(*run, "trainer.sync_bn=true"), tmp_path / "single").run_id  # a no-op on one process
    losses, reference = (_points(client, r, "train_loss") for r in (synced.info.run_id, single))
    assert [s for s, _ in losses] == list(range(1438 // 128))
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], rel=1e-3)
    assert synced.data.params["threads"] == client.get_run(single).data.params["threads"] == "1"


def test_cpu_sync_batch_norm_matches_batch_norm_on_one_process(tmp_path):
    """Its statistics, running averages and gradients against torch's BatchNorm2d (a world of one process)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None))
        synced = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None))
        synced = synchronized(synced, cpu=True)
        synced.load_state_dict(plain.state_dict())
        assert type(synced[1]) is GlobalBatchNorm
        images = torch.randn(6, 3, 8, 8) * 3 + 1
        for model in (plain, synced):
            for _ in range(2):
                model(images).square().mean().backward()
        for (name, mine), theirs in zip(synced.state_dict().items(), plain.state_dict().values(), strict=True):
            assert torch.allclose(mine.float(), theirs.float(), rtol=1e-5, atol=1e-6), name
        for mine, theirs in zip(synced.parameters(), plain.parameters(), strict=True):
            assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(ConfigError, match=r"^trainer.sync_bn: on the CPU only .*, not BatchNormAct2d"):
        synchronized(BatchNormAct2d(4), cpu=True)


def test_each_process_takes_its_share_of_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads() == max(1, cores // 2)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # a task's own CPUs, whatever else the machine has
    assert threads() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
