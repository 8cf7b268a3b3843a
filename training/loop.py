"""The training loop every stage shares: config, seeding, checkpoints, resume, logs, Ray Train.

A stage is a :class:`Task`: it builds one ``nn.Module`` whose ``forward(batch, generator)`` returns
the loss, makes the batch for (step, rank), and exports its result. The loop owns everything else,
so the VAE, stage 1 and stage 2 checkpoint, resume, log and scale out the same way.

Determinism: the batch and every random draw of a step (noise, timesteps, dropout of the exemplar)
come from seeds derived from (config seed, step, rank), never from a running RNG. Resuming at step
k therefore replays exactly the draws an uninterrupted run would make at step k; the global RNG
states are still saved with each checkpoint for code that reaches for them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from amgen_core.records import stable_seed


class TrainConfigError(ValueError):
    """A training config (file or override) that cannot be used; the message names the source."""


class DataConfig(BaseModel):
    """Where training pairs come from (training/sources.py turns it into the data the tasks get).
    Toy-town is generated on the fly; nothing is read from disk."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["toytown", "cityscapes"] = "toytown"
    root: str | None = None                  # Cityscapes-format tree (source=cityscapes)
    split: str = "train"
    height: int = 64
    width: int = 128
    domain: str | None = None                # toy-town light; None draws one per scene
    # toy-town only, with domain None: how often each light is drawn ({"night": 0.35, ...}; the
    # lights left out get nothing; default toytown.DOMAIN_P). Weighs training towards the lights
    # the model renders worst.
    domain_weights: dict[str, float] | None = None
    p_shared_appearance: float = Field(0.5, ge=0.0, le=1.0)  # toy-town only: one palette, two layouts
    crop_scale: tuple[float, float] = (0.5, 1.0)               # release-style pairs: two crops
    flip: bool = True

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "cityscapes" and not self.root:
            raise ValueError("data.source=cityscapes needs data.root (a Cityscapes-format tree)")
        if self.domain_weights is not None:
            from amgen_core.domains import DOMAINS

            unknown = sorted(set(self.domain_weights) - set(DOMAINS))
            if unknown:
                raise ValueError(f"data.domain_weights: unknown light(s) {unknown}; expected some of {', '.join(DOMAINS)}")
            if self.domain is not None:
                raise ValueError("data.domain_weights needs data.domain unset (null)")
            if any(w < 0 for w in self.domain_weights.values()) or sum(self.domain_weights.values()) <= 0:
                raise ValueError(f"data.domain_weights: {self.domain_weights} must be >= 0 with a positive sum")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        return self


class LoaderConfig(BaseModel):
    """How batches reach the loop: a ``torch.utils.data.DataLoader`` over step indices
    (training/loader.py). Batches are the same bytes whichever process renders them."""

    model_config = ConfigDict(extra="forbid")

    # worker processes rendering batches ahead; 0 renders each in the training process, between
    # steps (the CPU default: on a 2-core box a worker only takes a core from the model)
    num_workers: int = Field(0, ge=0)
    prefetch_factor: int = Field(2, ge=1)    # batches each worker keeps ready (workers > 0)
    # page-locked batches, so host-to-device copies run asynchronously; "auto": on when training on CUDA
    pin_memory: bool | Literal["auto"] = "auto"


class TrainConfig(BaseModel):
    """What every stage shares. Stage configs subclass it; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    preset: str = "toy"
    out_dir: str = "runs/train"
    seed: int = 0
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)          # per worker
    lr: float = Field(1e-4, gt=0)            # at base_batch_size samples per step (see lr_scaling)
    # Large batches: the lr the optimizer gets is lr x f(global batch / base_batch_size), with
    # global batch = batch_size x num_workers: f = k for "linear" (SGD's rule), sqrt(k) for "sqrt"
    # (Adam's rule), 1 for "none". None for base_batch_size: this config's own global batch (f = 1).
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    base_batch_size: int | None = Field(None, ge=1)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine floor, as a fraction of lr
    grad_clip: float | None = 1.0
    # AdamW kernel: "auto" takes the fused one wherever torch has it (CUDA; CPU too, where it
    # measured 3-4x faster than the per-tensor loop on the toy model: docs/performance.md), else "foreach".
    optimizer_impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    # Scale-out and memory switches (SD1.5-sized runs); the toy run uses the defaults.
    num_workers: int = Field(1, ge=1)         # >1 runs under Ray Train's TorchTrainer
    use_gpu: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # per worker; None keeps torch's default; "auto" follows the machine's load every 20 steps
    # (a shared box: fewer threads than busy cores only adds spinning). Fixed counts are bit-reproducible.
    torch_threads: int | Literal["auto"] | None = None
    # Under mixed precision, conv and linear weights go to the compute dtype once per step
    # (trainable) or once per run (frozen) instead of at every use (training/precision.py); same numbers.
    cast_weights_once: bool = True
    data: DataConfig = Field(default_factory=DataConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @model_validator(mode="after")
    def _check_common(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) > steps ({self.steps})")
        if self.lr_scaling != "none" and self.base_batch_size is None:
            raise ValueError(f"lr_scaling: {self.lr_scaling} needs base_batch_size (the batch lr was tuned at)")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_workers

    def effective_lr(self) -> float:
        """The lr the optimizer starts from: ``lr`` scaled from ``base_batch_size`` to the global batch."""
        if self.lr_scaling == "none" or self.base_batch_size is None:
            return self.lr
        k = self.global_batch_size / self.base_batch_size
        return self.lr * (k if self.lr_scaling == "linear" else math.sqrt(k))


class Task(Protocol):
    """One training stage, as the loop sees it. A task is made from its config and its data
    (``task_class(stage)(config, data)``, see :func:`make_task`)."""

    config: TrainConfig

    def build(self, device: torch.device) -> torch.nn.Module:
        """The module to train; ``forward(batch, generator) -> dict`` with a scalar ``loss``.
        Parameters with ``requires_grad`` are optimized, the rest are frozen."""

    def trainable_prefixes(self) -> tuple[str, ...]:
        """state_dict key prefixes saved in checkpoints (frozen parts are rebuilt, not saved)."""

    def batch(self, step: int, rank: int, world_size: int) -> dict[str, Any]:
        """The batch of (step, rank): a pure function of the config seed, step and rank."""

    def export(self, module: torch.nn.Module, out_dir: Path) -> Path:
        """Write the trained result (a diffusers-style folder); returns its path."""


@dataclass
class TrainSummary:
    stage: str
    out_dir: str
    start_step: int
    end_step: int
    steps_run: int
    loss_start: float | None
    loss_end: float | None
    seconds: float
    checkpoint: str | None
    export: str | None
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("losses")
        return d


# ---------------------------------------------------------------------------------------------
# seeds, schedules, precision


def step_seed(seed: int, step: int, rank: int, *what: Any) -> int:
    return stable_seed("train", step, rank, *what, base=seed)


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warm, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def autocast_context(config: TrainConfig, device: torch.device):
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# checkpoints: out_dir/checkpoints/step-0000200/{state.pt, meta.json}, "latest" names the newest


def _checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = _checkpoint_root(Path(out_dir))
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no state.pt (damaged checkpoint folder)")
    return path


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _trainable_state(module: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in _unwrap(module).state_dict().items() if k.startswith(prefixes)}


def save_checkpoint(out_dir: Path, step: int, module, prefixes, optimizer, scheduler, scaler, config: TrainConfig,
                    keep: int) -> Path:
    """Write the state after ``step`` steps atomically (tmp folder + rename), then move ``latest``."""
    root = _checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        "step": step,                      # steps done; also the data position (batches are per step)
        "model": _trainable_state(module, prefixes),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "stage": config.stage, "time": time.time(),
                                               "config": config.model_dump(mode="json")}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / "latest")
    old = sorted(p for p in root.glob("step-???????") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_trained_weights(path: Path, module) -> dict[str, Any]:
    """The checkpoint's state, its trained weights loaded into ``module`` (frozen parts are rebuilt)."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    missing = _unwrap(module).load_state_dict(state["model"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{path}: checkpoint holds weights this model does not have: {missing.unexpected_keys[:5]}")
    return state


def load_checkpoint(path: Path, module, optimizer, scheduler, scaler) -> int:
    state = _load_trained_weights(path, module)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def checkpoint_at(out_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of ``step`` in ``out_dir`` (the latest if None); FileNotFoundError names what there is."""
    root = _checkpoint_root(Path(out_dir))
    path = latest_checkpoint(out_dir) if step is None else root / f"step-{step:07d}"
    if path is None or not (path / "state.pt").is_file():
        have = sorted(p.name for p in root.glob("step-???????")) if root.is_dir() else []
        raise FileNotFoundError(f"{out_dir}: no checkpoint {'at all' if step is None else f'of step {step}'}"
                                f" (checkpoints there: {', '.join(have) or 'none'})")
    return path


def export_checkpoint(task: Task, checkpoint: Path, out_dir: Path) -> Path:
    """Export ``checkpoint`` (of ``task``'s run, which may still be going) as a finished run exports
    its weights: ``task.export`` into ``out_dir``, with the run's loss log up to that step."""
    module = task.build(torch.device("cpu"))
    state = _load_trained_weights(checkpoint, module)
    rows = [r for r in read_loss_log(Path(task.config.out_dir) / "loss.jsonl") if r["step"] < state["step"]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "loss.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return task.export(module.eval(), out_dir)


# ---------------------------------------------------------------------------------------------
# loss log (JSONL, CSV) and plot


class LossLog:
    """``loss.jsonl`` gets one line per step; ``loss.csv`` and ``loss.png`` are rewritten from it."""

    def __init__(self, out_dir: Path, resume_step: int, earlier: list[dict[str, Any]] | None = None):
        self.path = out_dir / "loss.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        # On resume drop lines written after the checkpoint: those steps are about to be replayed.
        # A restart from exported weights starts the log with their history (``earlier``).
        if earlier:
            rows = list(earlier)
        else:
            rows = [r for r in read_loss_log(self.path) if r["step"] < resume_step] if resume_step else []
        with open(self.path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_loss_log(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows; a torn last line (a run writing it now, or killed while it did) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return rows


_NOT_CURVES = ("step", "lr", "dropped", "granularity")


def write_csv_and_plot(out_dir: Path, title: str) -> Path | None:
    rows = read_loss_log(out_dir / "loss.jsonl")
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "time"))  # union, first-seen order
    with open(out_dir / "loss.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    try:
        import matplotlib
    except ImportError:  # a bare machine (a lent GPU's): the CSV holds the curves
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in keys if k not in _NOT_CURVES]
    steps = np.array([r["step"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in curves:
        y = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        line, = ax.plot(steps, y, alpha=0.25, lw=0.8)
        ax.plot(steps, _ema(y, 0.98 if len(y) > 200 else 0.9), color=line.get_color(), lw=1.6, label=f"{k} (EMA)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out_dir / "loss.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _ema(y: np.ndarray, decay: float) -> np.ndarray:
    out, acc, norm = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        if np.isfinite(v):
            acc, norm = decay * acc + (1 - decay) * v, decay * norm + (1 - decay)
        out[i] = acc / norm if norm else np.nan
    return out


# ---------------------------------------------------------------------------------------------
# the loop


def train_worker(task: Task, *, rank: int = 0, world_size: int = 1, resume: bool = False,
                 on_step: Callable[[int, dict[str, float]], None] | None = None,
                 distributed: bool = False, max_steps: int | None = None) -> TrainSummary:
    """Run ``task`` from step 0 (or the latest checkpoint) to ``config.steps`` on this process.

    ``max_steps`` stops early after that many total steps (used to simulate an interruption).
    """
    config = task.config
    out_dir = Path(config.out_dir)
    if isinstance(config.torch_threads, int):
        torch.set_num_threads(config.torch_threads)
    seed_everything(config.seed)
    device = _device(config, distributed)
    module = task.build(device)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(module)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError(f"stage {config.stage}: nothing to train (no parameter requires grad)")
    optimizer = make_optimizer(params, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None

    start = 0
    earlier: list[dict[str, Any]] = []
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, module, optimizer, scheduler, scaler)
        keep_optimizer_impl(optimizer, config.optimizer_impl, device)
    else:
        if not resume and rank == 0 and (out_dir / "checkpoints").exists():
            shutil.rmtree(out_dir / "checkpoints")  # a fresh run must never resume stale state later
        earlier = task.continued_rows() if hasattr(task, "continued_rows") else []
        if earlier:  # restarted from exported weights: carry on after their last logged step
            start = int(earlier[-1]["step"]) + 1
            if start >= config.steps:
                raise TrainConfigError(f"{config.stage}: init_from already logged {start} steps; raise steps above that")
            with warnings.catch_warnings():  # no optimizer step yet: only the schedule moves on
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start):
                    scheduler.step()
    if distributed:
        from ray.train.torch import prepare_model

        module = prepare_model(module, move_to_device=False)
    log = LossLog(out_dir, start, earlier) if rank == 0 else None

    end = min(config.steps, max_steps if max_steps is not None else config.steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    last_ckpt: Path | None = ckpt
    module.train()
    from training.loader import step_batches, step_loader
    from training.precision import cast_once

    casts = cast_once(module, config.mixed_precision, config.cast_weights_once)
    # On an accelerator, reading a step's loss waits for the device to finish it, and the next
    # step's kernels are queued only after that: metrics are read every log_every steps instead
    # (and before every checkpoint), so a non-finite loss stops the run at the next read. On the
    # CPU nothing runs ahead: every step is read, and checked before its backward.
    flush_every = 1 if device.type == "cpu" else config.log_every
    pending: list[tuple[int, dict[str, Any], float, float]] = []
    batches = step_batches(step_loader(task.batch, config.loader, rank=rank, world_size=world_size, start=start,
                                       end=end, device=device))
    for step in range(start, end):
        if config.torch_threads == "auto" and (step - start) % 20 == 0:
            torch.set_num_threads(threads_for_load())
        batch = _to_device(next(batches), device)
        generator = step_generator(config.seed, step, rank)
        with casts.step() if casts is not None else contextlib.nullcontext():
            with autocast_context(config, device):
                out = module(batch, generator)
            loss = out["loss"]
            if flush_every == 1 and not torch.isfinite(loss):
                raise FloatingPointError(f"stage {config.stage}: loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()

        pending.append((step, {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()},
                        scheduler.get_last_lr()[0], time.perf_counter() - t0))
        done = step + 1
        save = done % config.checkpoint_every == 0 or done == config.steps
        if save or done == end or done % flush_every == 0:
            for row in _flush(pending, config.stage):  # reading the metrics waits for the device
                losses.append(row["loss"])
                if log is not None:
                    log.write(row)
                if on_step is not None:
                    on_step(row["step"] + 1, {k: v for k, v in row.items() if k not in ("step", "lr", "time")})
        if save and rank == 0:
            last_ckpt = save_checkpoint(out_dir, done, module, task.trainable_prefixes(), optimizer, scheduler,
                                        scaler, config, config.keep_checkpoints)
            write_csv_and_plot(out_dir, f"{config.stage} loss")
        if distributed and (done % config.log_every == 0 or done == end):
            import ray.train

            ray.train.report({"step": done, "loss": losses[-1]})
    seconds = time.perf_counter() - t0
    batches.close()
    if casts is not None:
        casts.remove()
    if log is not None:
        log.close()
        write_csv_and_plot(out_dir, f"{config.stage} loss")

    exported = None
    if rank == 0 and end == config.steps:
        module.eval()
        exported = str(task.export(_unwrap(module), out_dir))
    k = max(1, min(10, len(losses) // 4 or 1))
    return TrainSummary(
        stage=config.stage, out_dir=str(out_dir), start_step=start, end_step=end, steps_run=end - start,
        loss_start=float(np.mean(losses[:k])) if losses else None,
        loss_end=float(np.mean(losses[-k:])) if losses else None,
        seconds=seconds, checkpoint=str(last_ckpt) if last_ckpt else None, export=exported, losses=losses,
    )


def _flush(pending: list, stage: str) -> list[dict[str, Any]]:
    """Loss-log rows of the steps in ``pending`` (emptied), in order; a non-finite loss raises."""
    rows = []
    for step, out, lr, seconds in pending:
        metrics = {k: float(v) for k, v in out.items()}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"stage {stage}: loss is {metrics['loss']} at step {step}")
        rows.append({"step": step, **metrics, "lr": lr, "time": seconds})
    pending.clear()
    return rows


def adamw_kwargs(impl: str, device: torch.device) -> dict[str, bool]:
    """AdamW's kernel switch: fused where torch has it for ``device`` ("auto"), else foreach."""
    if impl == "auto":
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        impl = "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]


def make_optimizer(params, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.effective_lr(), betas=config.adam_betas,
                             weight_decay=config.weight_decay, **adamw_kwargs(config.optimizer_impl, device))


def keep_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str, device: torch.device) -> None:
    """After a resume: the kernel this config asks for, not the one the checkpoint was saved with
    (load_state_dict restores the saved param groups' flags); fused kernels want their step
    counters on the parameters' device."""
    kw = adamw_kwargs(impl, device)
    for group in optimizer.param_groups:
        group.update(fused=kw.get("fused", None), foreach=kw.get("foreach", None))
        if kw.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


def threads_for_load() -> int:
    """Cores left over by the rest of the machine (1-minute load minus our own threads), >= 1."""
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()
    return int(min(cores, max(1, round(cores - others))))


def _device(config: TrainConfig, distributed: bool) -> torch.device:
    if distributed:
        from ray.train.torch import get_device

        return get_device()
    if config.use_gpu:
        if not torch.cuda.is_available():
            raise TrainConfigError("use_gpu=true but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """The task's own switch when it has one (stage 1/2 checkpoint whole UNet passes, see
    diffusion.py), else diffusers' switch on every submodule that supports it (the VAE)."""
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return
    found = False
    for sub in module.modules():
        if sub is not module and hasattr(sub, "enable_gradient_checkpointing") and getattr(sub, "_supports_gradient_checkpointing", False):
            sub.enable_gradient_checkpointing()
            found = True
    if not found:
        raise TrainConfigError("gradient_checkpointing=true but no submodule supports it")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Images to ``device``; label and instance maps stay on the CPU, where they are read (colourised
    for the structure net, turned into matching costs): on a GPU a read would wait for the device."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# entry point: one process, or Ray Train with N workers from the same config


def run_training(config: TrainConfig, data, *, resume: bool = False,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainSummary:
    """Train ``config.stage`` on ``data`` (a :class:`training.data.PairData`; training/sources.py
    builds one from ``config.data``). Ray workers get a pickled copy of ``data``."""
    if config.num_workers <= 1:
        return train_worker(make_task(config, data), resume=resume, on_step=on_step)
    return _run_ray(config, data, resume)


def make_task(config: TrainConfig, data) -> Task:
    from training.registry import task_class

    return task_class(config.stage)(config, data)


def _ray_worker(payload: dict[str, Any]) -> None:
    import ray.train

    from training.registry import config_class

    config = config_class(payload["config"]["stage"]).model_validate(payload["config"])
    ctx = ray.train.get_context()
    summary = train_worker(make_task(config, payload["data"]), rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                           resume=payload["resume"], distributed=True)
    if ctx.get_world_rank() == 0:
        Path(config.out_dir, "summary.json").write_text(json.dumps(summary.as_dict() | {"losses": summary.losses}))


def _run_ray(config: TrainConfig, data, resume: bool) -> TrainSummary:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(config.out_dir).resolve()
    config = config.model_copy(update={"out_dir": str(out_dir)})
    if not ray.is_initialized():
        ray.init(num_gpus=None if config.use_gpu else 0, include_dashboard=False, log_to_driver=True)
    if config.use_gpu and ray.cluster_resources().get("GPU", 0) < config.num_workers:
        raise TrainConfigError(f"use_gpu=true with {config.num_workers} workers, but the Ray cluster has "
                               f"{ray.cluster_resources().get('GPU', 0)} GPUs (workers would wait forever)")
    (out_dir / "summary.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "data": data, "resume": resume},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name=f"amgen-{config.stage}", storage_path=str(out_dir / "ray")),
    )
    trainer.fit()
    data = json.loads((out_dir / "summary.json").read_text())
    data["seconds"] = time.perf_counter() - t0
    return TrainSummary(**data)
