"""The training loop: before every optimizer step, the policy's values go into the optimizer.

Accelerate places the model and batches and handles mixed precision; the policy is never handed
to ``accelerator.prepare`` (its wrapper would step a scheduler once per process).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clrx.build import build_optimizer, build_policy, instantiate
from clrx.config import check_trainer
from clrx.data import Splits, keep_batch
from clrx.errors import ConfigError
from clrx.optim import applied_momentum, apply_hyper, momentum_name
from clrx.plots import schedule_figure
from clrx.recorder import Recorder
from clrx.tracking import default_uri, flatten, open_store, tracked_run


@dataclass(frozen=True)
class Result:
    run_id: str
    tracking_uri: str
    experiment: str
    steps: int
    seconds: float
    val_loss: float
    val_acc: float
    best_val_acc: float


def _loaders(data: Splits, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    if batch_size > len(data.train):
        raise ConfigError(
            "trainer.batch_size",
            f"must not exceed the {len(data.train)} training images of dataset {data.name}, got {batch_size}",
        )
    order = torch.Generator().manual_seed(seed)
    train = DataLoader(data.train, batch_size, shuffle=True, drop_last=True, collate_fn=keep_batch, generator=order)
    return train, DataLoader(data.val, batch_size, collate_fn=keep_batch)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Validation loss and top-1 accuracy over the whole set (each sample counted once)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits, labels = accelerator.gather_for_metrics((model(images), labels))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    model.train()
    return {"val_loss": loss_sum / count, "val_acc": correct / count}


def _progress_enabled(cfg: DictConfig) -> bool:
    return cfg.trainer.progress and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def _save(model: torch.nn.Module, path: Path) -> None:
    """Write atomically: a crash leaves the previous file or none, never a torn one."""
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)


def train(cfg: DictConfig, output_dir: Path, tags: Mapping[str, str] | None = None) -> Result:
    """Build everything ``cfg`` describes, check it, then train and track one MLflow run."""
    trainer = cfg.trainer
    check_trainer(trainer)
    set_seed(trainer.seed)
    device = {"auto": {}, "cpu": {"cpu": True}, "cuda": {}}[trainer.device]
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was requested but no CUDA device is available; use auto or cpu")
    accelerator = Accelerator(mixed_precision=trainer.precision, **device)

    data = instantiate(cfg.dataset, "dataset")
    train_loader, val_loader = _loaders(data, trainer.batch_size, trainer.seed)
    steps_per_epoch = len(train_loader)
    total_steps = trainer.epochs * steps_per_epoch
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    policy = build_policy(cfg.policy, steps_per_epoch, total_steps)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=policy(0).lr)
    momentum = momentum_name(optimizer)
    if momentum is None and policy(0).momentum is not None:
        raise ConfigError(
            "policy.max_momentum",
            f"{type(optimizer).__name__} has no momentum or betas to cycle; set policy.base_momentum and "
            "policy.max_momentum to null",
        )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    client = open_store(cfg.tracking.uri or default_uri())
    output_dir.mkdir(parents=True, exist_ok=True)

    run_tags = {"mlflow.source.name": "clrx", "clrx.output_dir": str(output_dir), **(tags or {})}
    with tracked_run(client, cfg.tracking.experiment, cfg.tracking.run_name, run_tags) as tracker:
        tracker.params(flatten(cfg))
        tracker.text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
        if (output_dir / ".hydra").is_dir():
            tracker.client.log_artifacts(tracker.run_id, str(output_dir / ".hydra"), "config/hydra")
        bar = tqdm(total=total_steps, unit="step", disable=not _progress_enabled(cfg), dynamic_ncols=True)
        recorder = Recorder(
            tracker,
            momentum,
            trainer.log_every,
            on_drain=lambda n, lr, loss: (bar.update(n), bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss:.4f}")),
        )
        start, step, scores = time.perf_counter(), 0, {}
        best = 0.0
        model.train()
        for epoch in range(1, trainer.epochs + 1):
            for images, labels in train_loader:
                hyper = policy(step)
                apply_hyper(optimizer, hyper)
                loss = F.cross_entropy(model(images), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                recorder.record(step, hyper.lr, applied_momentum(optimizer), loss)
                step += 1
            recorder.drain()
            if epoch % trainer.eval_every == 0 or epoch == trainer.epochs:
                scores = evaluate(model, val_loader, accelerator)
                best = max(best, scores["val_acc"])
                tracker.metrics(
                    {"epoch": epoch, "train_loss_epoch": recorder.epoch_loss(steps_per_epoch), **scores}, step
                )
        seconds = time.perf_counter() - start
        bar.close()
        tracker.metrics({"best_val_acc": best, "train_seconds": seconds}, step)
        figure = schedule_figure(recorder.steps, recorder.lrs, recorder.momenta, recorder.losses, momentum)
        tracker.figure(figure, "plots/schedule.png")
        if trainer.save_model:
            _save(accelerator.unwrap_model(model), output_dir / "model.pt")
            tracker.tags({"clrx.model_path": str(output_dir / "model.pt")})
    return Result(
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        experiment=cfg.tracking.experiment,
        steps=step,
        seconds=seconds,
        val_loss=scores["val_loss"],
        val_acc=scores["val_acc"],
        best_val_acc=best,
    )
