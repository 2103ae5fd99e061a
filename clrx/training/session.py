"""A run's model, optimizer and data, ready on the accelerator, and the one optimizer step they take.

Accelerate places the model and handles mixed precision; in-memory datasets live on the device
and each process draws its share of every global batch there (folder datasets come through
Accelerate's loaders, pinned and copied without blocking). A global batch may be taken as several
micro batches (gradient accumulation) with one gradient synchronization; the step counter outside
counts optimizer steps, so a schedule is the same on any number of processes and with any accumulation.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    parse_flag_from_env,
    set_seed,
)
from omegaconf import DictConfig
from timm.utils import ModelEmaV3
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, default_collate

from clrx.config.build import build_optimizer, instantiate
from clrx.config.schema import TOP5_ABOVE, check_launch, check_metrics, check_trainer
from clrx.data.splits import DeviceBatches, Splits, TensorImages, build_data
from clrx.errors import ConfigError
from clrx.models import exported
from clrx.optim import effective_lr, schedule_free
from clrx.schedules.apply import applied_momentum, apply_hyper, momentum_name
from clrx.schedules.policies import Policy
from clrx.training.batch_size import find_batch_size
from clrx.training.finetune import frozen_parameters
from clrx.training.loss import TrainingLoss, training_loss
from clrx.training.recorder import Recorder
from clrx.training.sync_bn import synchronized

Batch = tuple[torch.Tensor, torch.Tensor]
Batches = DeviceBatches | DataLoader  # in-memory data drawn where it lives; folders through Accelerate
NORM_BATCHES = 50  # training batches that recompute batch-norm statistics at a schedule-free average (its README)
log = logging.getLogger("clrx")


@dataclass
class Session:
    """Everything a run is built from, ready on the accelerator."""

    cfg: DictConfig
    accelerator: Accelerator
    data: Splits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Batches
    val_loader: Batches
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    momentum: str | None
    loss: TrainingLoss
    ema: ModelEmaV3 | None = None  # the average of the weights, where trainer.ema asks for one
    grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping, where it clips
    test_loader: Batches | None = None  # a test set kept apart from validation (dataset.val_split)
    frozen: tuple[torch.nn.Parameter, ...] = ()  # what trainer.freeze_epochs holds still at first

    def __post_init__(self) -> None:
        # The settings a step reads, as plain values: a config lookup costs microseconds a fast GPU would wait for.
        trainer = self.cfg.trainer
        self.clip_norm, self.clip_value = trainer.clip_grad_norm, trainer.clip_grad_value
        self.channels_last = trainer.channels_last

    def step(self, micro: list[Batch]) -> tuple[torch.Tensor, list[Batch]]:
        """One optimizer step over the micro batches of one global batch.

        Gradients are averaged over micro batches and synchronized across processes once, on the
        last; returns the mean loss (on the device) and each micro batch's (logits, labels).
        """
        total, outputs = 0.0, []
        for index, (images, labels) in enumerate(micro):
            last = index == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                images, targets = self.loss.targets(self.inputs(images, train=True), labels)
                logits = self.model(images)
                loss = self.loss.loss(logits, targets)
                self.accelerator.backward(loss if len(micro) == 1 else loss / len(micro))
            total = total + loss.detach()
            outputs.append((logits.detach(), labels))
        self.grad_norm = self._clip()
        # Accelerate's optimizer wrapper spends ~0.8 ms of Python a step (package lookups, signature
        # inspection); it is needed only to drive the fp16 loss scaler.
        (self.torch_optimizer if self.accelerator.scaler is None else self.optimizer).step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        return (total if len(micro) == 1 else total / len(micro)), outputs

    def policy_step(self, policy: Policy, step: int, micro: list[Batch], recorder: Recorder) -> None:
        """Optimizer step number ``step``: the policy's values applied, the step taken and recorded.

        What is recorded is read back from the optimizer (its first group), so a run's log says what
        the step used, not what the policy meant it to use.
        """
        apply_hyper(self.optimizer, policy(step))
        lr, momentum = effective_lr(self.torch_optimizer), applied_momentum(self.optimizer)
        loss, _ = self.step(micro)
        if self.ema is not None:
            self.ema.update(self.plain_model, step=step + 1)  # timm counts updates: the first copies the weights
        recorder.record(step, lr, momentum, loss, self.grad_norm)

    def freeze(self, on: bool) -> None:
        """Hold the ``frozen`` parameters still (no gradients: the optimizer skips them), or train them again."""
        for param in self.frozen:
            param.requires_grad_(not on)

    def _clip(self) -> torch.Tensor | None:
        """Clip the gradients as trainer.clip_grad_norm or clip_grad_value say; their norm before clipping."""
        if self.clip_norm is None and self.clip_value is None:
            return None
        self.accelerator.unscale_gradients()  # fp16: the true gradients first (a no-op otherwise)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_value_(params, self.clip_value)
        return norm

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list[Batch]]:
        """The optimizer steps of epoch ``epoch`` (from 0), each a list of micro batches.

        The order of an epoch depends only on the seed and the epoch, so a resumed run skips the
        ``skip`` steps it already took and sees exactly the batches it would have seen.
        """
        accumulate = self.cfg.trainer.grad_accum
        self.train_loader.set_epoch(epoch)
        if isinstance(self.train_loader, DeviceBatches):
            micro = self.train_loader.iterate(start=skip * accumulate)
        elif skip:
            micro = iter(self.accelerator.skip_first_batches(self.train_loader, skip * accumulate))
        else:
            micro = iter(self.train_loader)
        for _ in range(self.steps_per_epoch - skip):
            yield [next(micro) for _ in range(accumulate)]

    def batches(self) -> Iterator[list[Batch]]:
        """Optimizer steps for as many epochs as asked for."""
        for epoch in itertools.count():
            yield from self.epoch(epoch)

    @torch.no_grad()
    def evaluate(
        self, part: str = "val", model: torch.nn.Module | None = None, batches: int | None = None
    ) -> dict[str, float]:
        """Loss and top-1 accuracy of ``model`` (the run's) over the whole ``part`` (``val`` or ``test``),
        each sample counted once; also top-5 accuracy for datasets of more than TOP5_ABOVE classes (``val_acc5``).
        ``batches``: only the first that many batches, the same samples each time (the range test's subset).

        Sums stay on the device and are read back once, after the last batch.
        """
        loader, size = (
            (self.val_loader, len(self.data.val)) if part == "val" else (self.test_loader, len(self.data.test))
        )
        if batches is not None and batches < len(loader):
            loader, size = itertools.islice(loader, batches), None
        ks = (1, 5) if self.data.num_classes > TOP5_ABOVE else (1,)
        evaluated = self.model if model is None else model
        evaluated.eval()
        shared = isinstance(loader, DeviceBatches)  # each process holds its own share of a batch
        totals = torch.zeros(1 + len(ks), device=self.accelerator.device, dtype=torch.float64)  # loss sum, hits
        count = torch.zeros((), device=self.accelerator.device, dtype=torch.float64)
        for images, labels in loader:
            logits = evaluated(self.inputs(images, train=False))
            if not shared:
                logits, labels = self.accelerator.gather_for_metrics((logits, labels))
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            totals += torch.cat([loss.view(1), top_k_hits(logits, labels, ks)])
            count += labels.shape[0]
        if shared:
            totals, count = self.accelerator.reduce(totals, "sum"), self.accelerator.reduce(count, "sum")
        self.model.train()
        names = [f"{part}_loss", f"{part}_acc", f"{part}_acc5"]
        *sums, counted = torch.cat([totals, count.view(1)]).tolist()
        return {name: total / (size or counted) for name, total in zip(names, sums, strict=False)}

    @contextlib.contextmanager
    def averaged(self, norms: bool = False) -> Iterator[None]:
        """With a schedule-free optimizer, the weights it evaluates and saves (its average x) in the model,
        and, with ``norms``, batch-norm statistics recomputed for them; training weights back afterwards.

        Nested uses switch once. Other optimizers evaluate the weights they train.
        """
        switched = self.use_averaged(norms)
        try:
            yield
        finally:
            if switched:
                self.torch_optimizer.train()

    def use_averaged(self, norms: bool = True) -> bool:
        """A schedule-free optimizer's average into the model, as its README asks before evaluation:
        ``norms`` recomputes batch-norm statistics at it over the first NORM_BATCHES training batches,
        in a fixed order and as evaluation sees images (the running ones were taken at other weights).
        Whether it switched: not for other optimizers, nor when already switched."""
        if not (schedule_free(self.torch_optimizer) and self.torch_optimizer.param_groups[0]["train_mode"]):
            return False
        self.torch_optimizer.eval()
        if norms:
            batches = itertools.islice(self.norm_batches, NORM_BATCHES)
            update_bn((self.inputs(images, train=False) for images, _ in batches), self.plain_model)
        return True

    @functools.cached_property
    def norm_batches(self) -> Batches:
        """The training set in order, in micro batches, each process its share: the batches ``use_averaged`` reads."""
        if isinstance(self.train_loader, DeviceBatches):
            where = {"rank": self.accelerator.process_index, "processes": self.accelerator.num_processes}
            return DeviceBatches(self.data.train, self.train_loader.batch_size, self.accelerator.device, **where)
        micro = self.cfg.trainer.batch_size // self.cfg.trainer.grad_accum
        return self.accelerator.prepare(self.data.loader(self.data.train, micro, train=False))

    def inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """A batch as the model takes it: augmented (training) and normalized on the device."""
        images = self.data.pipeline(images, train)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer inside Accelerate's wrapper."""
        return self.optimizer.optimizer

    @property
    def plain_model(self) -> torch.nn.Module:
        """The model without DDP or torch.compile wrappers: its weights load into a freshly built one."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def exported(self, examples: int = 2) -> dict[str, Any] | None:
        """The trained model as the run's MLflow model holds it (``models.exported``): a copy on the CPU in
        eval mode, exported on the first ``examples`` validation images as it takes them (normalized):
        what a user loads and feeds.

        For after training: the run's model loses Accelerate's mixed-precision wrapper of ``forward``,
        which a copy cannot shed and which would run a user's model in reduced precision.
        """
        plain = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        model = copy.deepcopy(plain).cpu().eval()
        if isinstance(self.data.val, TensorImages):
            images = self.data.val.images[:examples]
        else:
            images = default_collate([self.data.val[index] for index in range(min(examples, len(self.data.val)))])[0]
        example = self.data.pipeline(images.cpu(), train=False).float().contiguous().numpy()
        return exported(model, example)

    def state(self) -> dict[str, Any]:
        """Weights, optimizer and loss-scaler state, as they are now (not copies)."""
        scaler = self.accelerator.scaler
        return {
            "model": self.plain_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.plain_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        if schedule_free(self.torch_optimizer):  # saved at its average: training goes on from the weights it trains
            self.torch_optimizer.train()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, "mean")


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """For each k, how many labels are among their row's k highest logits; a tensor on the logits' device."""
    among = logits.topk(max(ks), dim=1).indices == labels[:, None]
    return torch.stack([among[:, :k].any(dim=1).sum() for k in ks])


def set_deterministic(on: bool) -> None:
    """Deterministic kernels, or torch's defaults back: for the same losses from the same command on a GPU.

    cuBLAS reads its workspace setting when it first runs, so it is set before any matmul. An op
    without a deterministic version on the device warns, naming itself, instead of stopping the run.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def on_cpu(trainer: DictConfig) -> bool:
    """On a machine without a GPU, "auto" is the CPU: also for the processes of a multi-process launch."""
    return trainer.device == "cpu" or (trainer.device == "auto" and not torch.cuda.is_available())


def threads() -> int:
    """Threads for this process's CPU work: what OMP_NUM_THREADS says, else a SLURM task's own CPUs under
    submitit, else this machine's cores shared evenly by the launch's processes on it (two processes each
    taking every core would wait on each other)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def accelerator_for(trainer: DictConfig) -> Accelerator:
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was requested but no CUDA device is available; use auto or cpu")
    if trainer.precision == "fp16" and (trainer.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("trainer.precision", "fp16 needs a CUDA device (loss scaling is GPU-only); use bf16 or no")
    # Each run sets its own precision and, outside a multi-process launch, its own device, also when
    # one process runs several (tests, sequential sweeps).
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not launched)
    set_deterministic(trainer.deterministic)
    # Batches are global and split over the processes; an epoch's order is a function of (seed, epoch).
    loading = DataLoaderConfiguration(
        split_batches=True, use_seedable_sampler=True, data_seed=trainer.seed, non_blocking=True
    )
    cpu = on_cpu(trainer)
    check_launch(cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    try:
        return Accelerator(
            mixed_precision=trainer.precision,
            cpu=cpu,
            dataloader_config=loading,
            dynamo_backend="inductor" if trainer.compile else "no",
            # Frozen parameters get no gradients: DDP must not wait for them.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if trainer.freeze_epochs
            else [],
        )
    except ValueError as error:
        raise ConfigError(
            "trainer.device", f"cpu inside a GPU launch is not possible; launch with ACCELERATE_USE_CPU=1 ({error})"
        ) from None


def _loaders(data: Splits, trainer: DictConfig, accelerator: Accelerator) -> tuple[Batches, Batches, Batches | None]:
    """Training, validation and test batches (None: no test set kept apart): drawn where in-memory
    data lives, else Accelerate's loaders."""
    processes = accelerator.num_processes
    batch, accumulate = trainer.batch_size, trainer.grad_accum
    if batch % (processes * accumulate):
        raise ConfigError(
            "trainer.batch_size",
            f"must be a multiple of processes x trainer.grad_accum = {processes} x {accumulate}, got {batch}",
        )
    if batch > len(data.train):
        raise ConfigError(
            "trainer.batch_size",
            f"must not exceed the {len(data.train)} training images of dataset {data.name}, got {batch}",
        )
    micro = batch // accumulate  # all processes together; each takes its share
    evaluated = [part for part in (data.val, data.test) if part is not None]
    if all(isinstance(part, TensorImages) for part in (data.train, *evaluated)):
        share = {"device": accelerator.device, "rank": accelerator.process_index, "processes": processes}
        val, test = (None if part is None else DeviceBatches(part, micro, **share) for part in (data.val, data.test))
        return DeviceBatches(data.train, micro, seed=trainer.seed, **share), val, test
    order = torch.Generator().manual_seed(trainer.seed)  # keeps DataLoader's seed draws off the global RNG
    train = data.loader(data.train, micro, train=True, order=order)
    train, val, *test = accelerator.prepare(train, *(data.loader(part, micro, train=False) for part in evaluated))
    return train, val, (test[0] if test else None)


def _check_batch_norm(model: torch.nn.Module, trainer: DictConfig, processes: int) -> None:
    """Batch norm cannot train on a single image: its variance over one value is undefined."""
    share = processes * trainer.grad_accum
    if trainer.batch_size // share == 1 and any(isinstance(module, _BatchNorm) for module in model.modules()):
        raise ConfigError(
            "trainer.batch_size",
            f"gives each process micro batches of 1 image, which the model's batch norm layers cannot train on; "
            f"use at least {2 * share} (or a lower trainer.grad_accum)",
        )


def prepare(cfg: DictConfig, search_batch: bool = True) -> Session:
    """Build and check everything except the policy; nothing is trained or tracked yet.

    With ``trainer.find_batch_size`` (and ``search_batch``), ``cfg.trainer.batch_size`` is set to
    the largest batch that trains on this device.
    """
    trainer = cfg.trainer
    check_trainer(trainer)
    torch.set_num_threads(threads())
    accelerator = accelerator_for(trainer)
    set_seed(trainer.seed, device_specific=True)  # each process its own augmentation; weights come from rank 0
    data = build_data(cfg.dataset)
    check_metrics(trainer, data.num_classes)
    model = instantiate(cfg.model, "model", num_classes=data.num_classes, in_chans=data.in_chans)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if trainer.sync_bn and accelerator.num_processes > 1:  # before DDP wraps the model
        model = synchronized(model, accelerator.device.type == "cpu")
    optimizer = build_optimizer(cfg.optimizer, model, lr=1e-3)  # the policy sets lr every step
    if schedule_free(optimizer):
        optimizer.train()  # its steps are taken in training mode; evaluation switches it (Session.averaged)
    model, optimizer = accelerator.prepare(model, optimizer)
    if trainer.find_batch_size and search_batch:
        trainer.batch_size = find_batch_size(
            accelerator, model, optimizer, data, trainer.grad_accum, trainer.max_batch_size
        )
        log.info("largest batch that trains: %d", trainer.batch_size)
    _check_batch_norm(model, trainer, accelerator.num_processes)
    train_loader, val_loader, test_loader = _loaders(data, trainer, accelerator)
    steps_per_epoch = len(train_loader) // trainer.grad_accum
    micro_batch = trainer.batch_size // (accelerator.num_processes * trainer.grad_accum)
    ema = (
        None
        if trainer.ema is None
        else ModelEmaV3(accelerator.unwrap_model(model), trainer.ema, use_warmup=trainer.ema_warmup)
    )
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        data=data,
        model=model,
        optimizer=optimizer,
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps_per_epoch,
        total_steps=trainer.epochs * steps_per_epoch,
        momentum=momentum_name(optimizer),
        loss=training_loss(cfg.loss, data.num_classes, micro_batch),
        ema=ema,
        test_loader=test_loader,
        frozen=frozen_parameters(accelerator.unwrap_model(model)) if trainer.freeze_epochs else (),
    )
