"""The training loop: one process or many (`accelerate launch`), checkpoints, resume, monitoring.

`train(config)` runs one stage. The same code runs alone or under `accelerate launch` (DDP; FSDP
through accelerate's config), with mixed precision and gradient accumulation from accelerate.

Determinism: every micro-batch re-seeds the torch RNG (dropout) and draws masking orders,
diffusion noise and prompt dropout from generators seeded by (seed, rank, micro-batch index),
and data positions are plain counters. A run stopped at step k and resumed therefore ends with
exactly the weights of an uninterrupted run.

Output layout (`out_dir`):

    config.yaml                      the resolved run config
    metrics.csv, loss.png            losses, lr, grad norm, throughput, quick eval scores
    samples/step-XXXXXXX.png (.json) sample grids (and what each row shows)
    checkpoints/step-XXXXXXX/        model/ (a unipic model folder) or vae.safetensors, optimizer.pt,
                                     ema.safetensors, trainer.json (step, schedule), rng-rank*.pt,
                                     data-rank*.json (per-task positions), config.yaml
    final/ or vae.safetensors        the result (EMA weights when EMA is on)

A checkpoint folder is written under a temporary name and renamed when complete, so a kill at
any moment leaves either the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unipic.api import UserError
from unipic.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from unipic.training.config import TrainConfig
from unipic.training.data import TaskData, mix_seed
from unipic.training.jobs import make_job
from unipic.training.monitor import METRICS_FILE, PLOT_FILE, MetricsLog, plot_losses
from unipic.training.optim import EMA, build_optimizer, lr_at

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer.json"  # written last inside a checkpoint
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainResult:
    """How a run ended."""

    out_dir: Path
    step: int  # optimizer steps done
    finished: bool  # reached train.max_steps
    stopped_by: str | None  # "SIGTERM", "SIGINT" or "stop_at" when interrupted
    output: Path | None  # final model folder / vae.safetensors when finished
    checkpoint: Path | None  # the last checkpoint written
    weights_digest: str = ""  # SHA-256 of this process's trainable weights (replicas must agree)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:07d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None if there is none)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def train(config: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> TrainResult:
    """Run one training stage (see the module docstring).

    Args:
        config: the validated run config.
        resume: continue from the newest checkpoint in `out_dir` (a fresh start if there is none).
        stop_at: stop (with a checkpoint) once this many steps are done, as a signal would.

    Raises:
        UserError: `out_dir` already holds checkpoints and `resume` is False, or a bad setting.
    """
    config.validate()
    threads = torch.get_num_threads()
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    accelerator = _make_accelerator(config)
    try:
        return _Trainer(config, accelerator, resume, stop_at).run()
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            _reset_accelerate_state()
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Tasks use different parts of the model (i2t never reaches the diffusion head), hence
    # find_unused_parameters; accumulation is counted by accelerate (loss / grad_accum in backward).
    # `accelerate launch --multi_gpu` on a machine without GPUs starts plain processes; accelerate
    # only forms a (gloo) process group for them when told to run on the CPU.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(cpu=cpu, mixed_precision=config.train.mixed_precision,
                           gradient_accumulation_steps=config.train.grad_accum,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    except ValueError as error:
        raise UserError(f"train.mixed_precision={config.train.mixed_precision}: {error}") from None


def _reset_accelerate_state() -> None:
    # accelerate keeps process-wide singletons; clearing them lets a library caller (or a test) run
    # several single-process trainings with different precision settings in one interpreter.
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - older/newer accelerate
        pass


class _StopSignals:
    """Turns the first SIGTERM/SIGINT into a flag (checked between steps); a second one kills."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # a second signal is not deferred

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _Trainer:
    def __init__(self, config: TrainConfig, accelerator, resume: bool, stop_at: int | None) -> None:
        self.config, self.accelerator, self.stop_at = config, accelerator, stop_at
        self.out_dir = Path(config.out_dir)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        # FSDP / DeepSpeed shard the weights: checkpoints gather them, but EMA, sampling, scores and
        # resuming (optimizer state) assume full replicas and are not supported there.
        self.sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
        if self.sharded and (resume or config.optim.ema_decay > 0):
            raise UserError(f"{accelerator.distributed_type.name} runs support neither --resume nor EMA yet; "
                            "use DDP (accelerate launch --multi_gpu) or set optim.ema_decay=0")
        found = latest_checkpoint(self.out_dir)
        if found is not None and not resume:
            raise UserError(f"{self.out_dir} already holds checkpoints (newest {found.name}); pass --resume to "
                            f"continue that run, or choose another out_dir")
        self.resume_dir = found if resume else None
        state = {}
        if self.resume_dir is not None:
            state = json.loads((self.resume_dir / STATE_FILE).read_text())
            if state["world_size"] != self.world:
                raise UserError(f"{self.resume_dir} was written by {state['world_size']} process(es); resume it "
                                f"with the same number (got {self.world}) so every process finds its data position")
        elif resume:
            self._say(f"no checkpoint in {self.out_dir / CHECKPOINT_DIR}; starting from the beginning")
        self.step = int(state.get("step", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))

        # Model, optimizer, EMA and data, restored from the checkpoint when resuming.
        self.job = make_job(config, self.resume_dir)
        module = self.job.module.to(accelerator.device)
        self.optimizer = build_optimizer(module, config.optim)
        self.ema = EMA(module, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.data = TaskData(config.data, self.rank, self.world)
        if self.resume_dir is not None:
            self._load_state(state)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.model, self.optimizer = accelerator.prepare(module, self.optimizer)
        self.last_checkpoint: Path | None = self.resume_dir

    # --- helpers ------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.main and self.config.log.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"unipic train: {message}")
        logger.info(message)

    def _seed_micro_step(self, micro: int) -> tuple[torch.Generator, np.random.Generator]:
        seed = mix_seed(self.config.seed, self.rank, micro)
        torch.manual_seed(seed)  # dropout and anything else that draws from the global RNG
        generator = torch.Generator(device=self.accelerator.device).manual_seed(seed ^ 0x5DEECE66D)
        return generator, np.random.default_rng([self.config.seed & 0xFFFFFFFF, self.rank, micro])

    def _agree(self, flag: bool) -> bool:
        """True on every process when it is true on any (so all stop at the same step)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.gather(value).max() > 0)

    # --- checkpoints --------------------------------------------------------------------------

    def _load_state(self, state: dict) -> None:
        folder = self.resume_dir
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        if self.ema is not None:
            from safetensors.torch import load_file

            if not (folder / EMA_FILE).is_file():
                raise UserError(f"{folder} has no {EMA_FILE}, but optim.ema_decay > 0; resume with optim.ema_decay=0")
            self.ema.load_state_dict(load_file(str(folder / EMA_FILE)), int(state.get("ema_updates", self.step)))
        positions = json.loads((folder / f"data-rank{self.rank}.json").read_text())
        self.data.load_state_dict(positions["positions"])
        rng = torch.load(folder / f"rng-rank{self.rank}.pt", map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._say(f"resumed {folder} at step {self.step}")

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = checkpoint_path(self.out_dir, self.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Per process: its data position and RNG state.
        atomic_write_json(tmp / f"data-rank{self.rank}.json", {"positions": self.data.state_dict()})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        atomic_write_bytes(tmp / f"rng-rank{self.rank}.pt", _torch_bytes(rng))
        gathered = acc.get_state_dict(self.model) if self.sharded else None  # every process takes part
        acc.wait_for_everyone()
        if self.main:
            from safetensors.torch import save

            self.job.save_weights(tmp, gathered)
            if not self.sharded:  # a sharded optimizer state is not gathered (no resume there)
                atomic_write_bytes(tmp / OPTIMIZER_FILE, _torch_bytes(self.optimizer.state_dict()))
            if self.ema is not None:
                atomic_write_bytes(tmp / EMA_FILE, save({k: v.contiguous() for k, v in self.ema.state_dict().items()}))
            atomic_write_text(tmp / "config.yaml", self.config.to_yaml())
            atomic_write_json(tmp / STATE_FILE, {
                "step": self.step, "stage": self.config.stage, "world_size": self.world,
                "lr": lr_at(max(self.step - 1, 0), self.config.optim, self.config.train.max_steps),
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "elapsed_s": self._elapsed(), "trainable_parameters": sum(p.numel() for p in self.trainable)})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point
            self._prune()
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _prune(self) -> None:
        root = self.out_dir / CHECKPOINT_DIR
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _digest(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name, param in self.accelerator.unwrap_model(self.model).named_parameters():
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # --- monitoring ---------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _with_ema(self, action):
        """Run `action()` with the EMA weights in the model (restored afterwards)."""
        if self.ema is None:
            return action()
        module = self.accelerator.unwrap_model(self.model)
        backup = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.ema.shadow}
        self.ema.copy_to(module)
        try:
            return action()
        finally:
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])

    def _monitor(self, final: bool = False) -> None:
        """Samples and quick scores on the main process (others wait); the final ones use the EMA."""
        log, acc = self.config.log, self.accelerator

        def due(every: int) -> bool:
            return every > 0 and (final or self.step % every == 0)

        want_samples, want_eval = due(log.sample_every), due(log.eval_every)
        if not (want_samples or want_eval) or self.sharded:
            return
        if self.main:
            def run(action):
                return self._with_ema(action) if final else action()

            with acc.autocast(), torch.no_grad():
                if want_samples:
                    path = self.out_dir / "samples" / f"step-{self.step:07d}.png"
                    run(lambda: self.job.sample(path))
                if want_eval:
                    scores = run(self.job.evaluate)
                    self.metrics.append({"step": self.step, "elapsed_s": self._elapsed(), **scores})
                    self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        acc.wait_for_everyone()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        self.started = time.perf_counter()
        columns = ["step", "loss", *self.job.metric_names, "lr", "grad_norm", "examples_per_s", "elapsed_s",
                   *self.job.eval_names]
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", cfg.to_yaml())
            self.metrics = MetricsLog(self.out_dir / METRICS_FILE, columns,
                                      resume_step=self.step if self.resume_dir is not None else None)
            self._say(f"stage {cfg.stage} → {self.out_dir} ({self.world} process(es), {acc.device}, "
                      f"mixed precision {cfg.train.mixed_precision}); {self.job.describe()}")
        acc.wait_for_everyone()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True,
                   disable=not (self.main and cfg.log.progress))
        names = ["loss", *self.job.metric_names]
        window = torch.zeros(2 * len(names), dtype=torch.float64)  # (sum, count) per name
        window_steps, window_seconds = 0, 0.0  # seconds spent in training steps (not sampling/saving)
        examples_per_step = cfg.data.batch_size * cfg.train.grad_accum * self.world
        stopped_by = None
        with _StopSignals() as signals:
            while self.step < cfg.train.max_steps:
                step_start = time.perf_counter()
                lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                grad_norm = None
                for j in range(cfg.train.grad_accum):
                    micro = self.step * cfg.train.grad_accum + j
                    task = self.data.task_for(micro)
                    generator, rng = self._seed_micro_step(micro)
                    batch = self.job.make_batch(task, self.data.next_examples(task), rng)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    with acc.accumulate(self.model):
                        out = self.model(task, batch, generator)
                        acc.backward(out["loss"])
                        if acc.sync_gradients:
                            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                            grad_norm = float(acc.clip_grad_norm_(self.trainable, clip))
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for i, name in enumerate(names):
                        if name in out:
                            window[2 * i] += float(out[name].detach())
                            window[2 * i + 1] += 1
                if self.ema is not None:
                    self.ema.update(acc.unwrap_model(self.model))
                self.step += 1
                window_steps += 1
                window_seconds += time.perf_counter() - step_start
                bar.update(1)
                if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                    totals = acc.reduce(window.to(acc.device), reduction="sum").cpu() if self.world > 1 else window
                    row = {"step": self.step, "lr": lr, "grad_norm": grad_norm, "elapsed_s": self._elapsed(),
                           "examples_per_s": examples_per_step * window_steps / max(window_seconds, 1e-9)}
                    for i, name in enumerate(names):
                        if totals[2 * i + 1] > 0:
                            row[name] = float(totals[2 * i] / totals[2 * i + 1])
                    if self.main:
                        self.metrics.append(row)
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", lr=f"{lr:.2e}",
                                        ex_s=f"{row['examples_per_s']:.1f}")
                    window.zero_()
                    window_steps, window_seconds = 0, 0.0
                if self.main and cfg.log.plot_every > 0 and self.step % cfg.log.plot_every == 0:
                    plot_losses(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE, f"{cfg.stage}: {self.out_dir}")
                if self.step < cfg.train.max_steps:
                    self._monitor()
                if self._agree(signals.received is not None):
                    stopped_by = signals.received or "signal"
                elif self.stop_at is not None and self.step >= self.stop_at:
                    stopped_by = "stop_at"
                if stopped_by is not None:
                    break
                every = cfg.train.checkpoint_every
                if every > 0 and self.step % every == 0 and self.step < cfg.train.max_steps:
                    self._save_checkpoint()
        bar.close()

        if stopped_by is not None:
            checkpoint = self._save_checkpoint()
            if self.main:
                plot_losses(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE, f"{cfg.stage}: {self.out_dir}")
            self._say(f"stopped ({stopped_by}) at step {self.step}; checkpoint {checkpoint}; continue with --resume")
            return TrainResult(self.out_dir, self.step, False, stopped_by, None, checkpoint, self._digest())

        # Finished: a last checkpoint (so --resume of a finished run is a no-op), the result, plots.
        checkpoint = self.last_checkpoint
        if checkpoint is None or checkpoint.name != checkpoint_path(self.out_dir, self.step).name:
            checkpoint = self._save_checkpoint()
        output = None
        gathered = acc.get_state_dict(self.model) if self.sharded else None
        if self.main:
            output = self._with_ema(lambda: self.job.export_final(self.out_dir, gathered))
            plot_losses(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE, f"{cfg.stage}: {self.out_dir}")
        self._monitor(final=True)
        if self.main:
            self._say(f"done: {self.step} steps; result {output}")
        acc.wait_for_everyone()
        return TrainResult(self.out_dir, self.step, True, None, output, checkpoint, self._digest())
