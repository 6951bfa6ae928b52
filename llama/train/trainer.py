"""The training loop, its checkpoints and what it shows (see llama/train/__init__.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..atomic import atomic_file, write_bytes, write_dir
from ..checkpoint import load_model, save
from ..data import val_batches
from ..formats.native import native_files, save_native
from ..lora import save_adapters
from ..model import Transformer
from ..optim import AdamW, cosine_schedule, param_groups
from . import distributed as dist
from .config import TrainConfig

__all__ = ["Trainer", "TrainingDiverged", "latest_checkpoint"]

CHECKPOINTS = "checkpoints"
STEP_RE = re.compile(r"step_(\d{8})")
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer.safetensors"
TRAINABLE = "trainable.safetensors"
STATE_VERSION = 1
SHARDS_STAGING = ".{}.shards"  # where the ranks write a sharded checkpoint before it is put in place
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; nothing after the last good checkpoint was saved."""


# ============================================================================ state <-> files
def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """`obj` with every tensor replaced by {"tensor": key}, the tensors collected in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {str(k): _split(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"tensor"}:
            if obj["tensor"] not in tensors:
                raise ValueError(f"{where}: tensor {obj['tensor']!r} is missing from {STATE_TENSORS}")
            return tensors[obj["tensor"]]
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete step folder under out_dir/checkpoints, or None."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted((int(m[1]), p) for p in root.iterdir() if (m := STEP_RE.fullmatch(p.name)) and p.is_dir()
                   and (p / STATE_JSON).is_file())
    return steps[-1][1] if steps else None


def _link_or_copy(src: Path, dst: Path) -> None:
    """`src`'s content at `dst`: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ============================================================================ the trainer
class Trainer:
    """Trains `model` on `data` as `config` says (see the module docstring).

    data: a llama.data.WindowLoader over the training split (its batch size and window length
    are the config's); val: what llama.data.val_batches takes for validation (None: none).
    tokenizer: used only for the sample printed at the end. on_step(step, metrics) is called
    after every optimizer step (tests use it to interrupt a run).
    """

    def __init__(self, model: Transformer, config: TrainConfig, data: Any, val: Any = None, tokenizer: Any = None,
                 on_step: Optional[Callable[[int, dict], None]] = None):
        self.config = config
        self.model = model
        self.data = data
        self.val = val
        self.tokenizer = tokenizer
        self.on_step = on_step
        self.out_dir = Path(config.out_dir)
        self.device = next(model.parameters()).device
        self.step = 0
        self.tokens_seen = 0
        self.stop_requested = False
        model.gradient_checkpointing = config.gradient_checkpointing
        if hasattr(model, "use_fused_ops"):
            model.use_fused_ops(config.fused)
        # Under torchrun (a process group started by llama.train.distributed.setup): FSDP2.
        self.root = None
        self.rows = slice(None)
        if dist.is_distributed():
            for name, bad in (("lora", config.lora), ("compile", config.compile)):
                if bad:
                    raise ValueError(f"{name}: not supported in distributed (FSDP) training yet; run it in a "
                                     "single process, or set it to false")
            self.rows = dist.local_rows(config.batch_size)
            self.root = dist.shard_model(model)
        self.rank = dist.rank()
        self.step_metrics: dict[str, Any] = {}  # what a subclass's loss adds to the step's record
        self.names = {}
        for name, p in self.named_trainables():
            if p.requires_grad and id(p) not in self.names:
                self.names[id(p)] = name
        groups = self.param_groups()
        if not groups:
            raise ValueError("model: no parameter requires a gradient; nothing to train")
        self.optimizer = AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                               correct_bias=config.correct_bias)
        self.scheduler = self.schedule(self.optimizer)
        self.forward = torch.compile(model) if config.compile else model
        self.tensorboard = None
        if config.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"tensorboard: needs the tensorboard package ({e}); pip install tensorboard, "
                                 "or set tensorboard=false (metrics.jsonl has the same figures)") from None
            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))

    # ------------------------------------------------------------------ what a subclass extends
    # Pruning (llama.prune.train.PruneTrainer) trains more than the model: its masks and
    # Lagrange multipliers. These hooks are where such a trainer adds them; by default they hold
    # the model alone.
    def named_trainables(self):
        """(name, parameter) of everything the optimizer may train; names key the optimizer state."""
        return self.model.named_parameters()

    def param_groups(self) -> list[dict]:
        cfg = self.config
        return param_groups(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                            decay_norms_and_embeddings=cfg.decay_norms_and_embeddings)

    def schedule(self, optimizer: Any) -> Any:
        cfg = self.config
        return cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    def clipped_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose joint gradient norm grad_clip bounds."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def after_step(self) -> None:
        """Called after each optimizer step (pruning clamps its gates here)."""

    def extra_files(self) -> dict[str, Callable[[Path], None]]:
        """More files for each checkpoint folder, {name: writer} as llama.atomic.write_dir takes."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """More JSON values for trainer_state.json (a subclass's own state)."""
        return {}

    def load_extra(self, path: Path, state: dict[str, Any]) -> None:
        """Resume what extra_files and extra_state saved, from checkpoint folder `path`."""

    # ------------------------------------------------------------------ loss
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean token loss of one micro-batch (with label smoothing and z-loss as configured)."""
        if self.root is not None:  # sharded: inside the root's forward, its parameters are gathered
            return self.root(self._loss, x, y)
        return self._loss(x, y)

    def autocast(self):
        """The context the loss runs in: autocast to the config's dtype (none for fp32)."""
        dtype = AUTOCAST.get(self.config.dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with self.autocast():  # the model picks the fused loss or the eager one (use_fused_ops)
            return self.forward(x, y, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss)

    @torch.no_grad()
    def validation_sums(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                        ) -> dict[str, tuple[float, int]]:
        """{domain: (summed token loss, token count)} of loss(x, y) over `eval_batches` windows of
        each domain's validation split ("default" for a single source), the model in eval mode."""
        batches = val_batches(self.val, self.config.seq_len, self.config.batch_size,
                              max_batches=self.config.eval_batches)
        streams = batches if isinstance(batches, dict) else {"default": batches}
        was_training = self.model.training
        self.model.eval()
        out = {}
        try:
            for name, stream in streams.items():
                total, count = 0.0, 0
                for x, y in stream:
                    x, y = x.to(self.device), y.to(self.device)
                    total += float(loss(x, y)) * y.numel()
                    count += y.numel()
                out[name] = (total, count)
        finally:
            self.model.train(was_training)
        return out

    def evaluate(self) -> Optional[dict[str, float]]:
        """Mean validation loss and perplexity over `eval_batches` windows (plain cross-entropy)."""
        if self.val is None:
            return None
        # the fused loss when the model trains on fused ops (every rank: the whole batch)
        sums = self.validation_sums(self.model if self.root is None else partial(self.root, self.model))
        # Several domains: every domain's windows count alike, token for token.
        total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
        if not count:
            return None
        mean = total / count
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0))}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train up to max_steps (or until SIGINT/SIGTERM); returns the last metrics."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.resume()
        if self.rank == 0:
            self._trim_metrics()
        dist.barrier()
        self.model.train()
        last: dict[str, Any] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)
        with self._signals(), bar:
            stopping = self._stopping()
            while self.step < cfg.max_steps and not stopping:
                started = time.perf_counter()
                loss = self._one_step()
                self.step += 1
                elapsed = time.perf_counter() - started
                tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
                self.tokens_seen += tokens
                last = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens / max(elapsed, 1e-9), "tokens": self.tokens_seen,
                        **self.step_metrics}
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tokens_per_s']:.0f}", lr=f"{last['lr']:.2e}")
                if (self.step % cfg.log_every == 0 or self.step == cfg.max_steps) and self.rank == 0:
                    self._log(last)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    evaluated = self.evaluate()
                    if evaluated:
                        last.update(evaluated)
                        if self.rank == 0:
                            self._log({"step": self.step, **evaluated})
                        bar.write(f"step {self.step}: val loss {evaluated['val_loss']:.4f}, "
                                  f"perplexity {evaluated['val_ppl']:.2f}")
                if self.on_step is not None:
                    self.on_step(self.step, last)
                stopping = self._stopping()
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps or stopping:
                    self.save_checkpoint()
        if self.step >= cfg.max_steps:
            self.save_final()
            if self.rank == 0:
                self.plot()
        last["stopped_early"] = self.step < cfg.max_steps
        return last

    def _stopping(self) -> bool:
        """Whether a stop was asked (on any rank: all ranks stop after the same step)."""
        if self.root is None:
            return self.stop_requested
        self.stop_requested = dist.any_rank(self.stop_requested, self.device)
        return self.stop_requested

    def _one_step(self) -> float:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = self.data.next_batch()  # the global batch; this rank trains on its rows
            x, y = x[self.rows], y[self.rows]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.loss(x, y)
            value = dist.all_reduce_mean(float(loss.detach()), self.device)  # the global batch's mean
            if not math.isfinite(value):
                last = latest_checkpoint(self.out_dir)
                raise TrainingDiverged(
                    f"loss is {value} at step {self.step + 1}; stopped before the optimizer step, so nothing was "
                    f"saved after it. Last good checkpoint: {last if last else 'none'}. Lower lr, raise warmup_steps "
                    "or grad_clip, or train in fp32.")
            (loss / cfg.grad_accum).backward()
            total += value / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.clipped_parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.after_step()
        return total

    # ------------------------------------------------------------------ what users see
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def _trim_metrics(self) -> None:
        """Drop records past the current step (a run resumed from an earlier checkpoint)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())

    def plot(self) -> Optional[Path]:
        """loss.png: training and validation loss against the step."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.5)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"{self.model.config.num_params() / 1e6:.2f}M-parameter LLaMA, {time.strftime('%Y-%m-%d')}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        out = self.out_dir / "loss.png"
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return out

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM ask the loop to save and stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum, _frame):
            self.stop_requested = True

        old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------ checkpoints
    def _lora(self) -> bool:
        return any(not p.requires_grad for p in self.model.parameters())

    def save_checkpoint(self) -> Path:
        """Write out_dir/checkpoints/step_XXXXXXXX atomically; keep the newest `keep_last`."""
        if self.root is not None:
            return self._save_sharded()
        tensors: dict[str, torch.Tensor] = {}
        optim = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st:
                    name = self.names[id(p)]
                    optim[name] = {"step": st["step"], "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        state = self._trainer_state(optim, tensors, **self.extra_state())
        files: dict[str, Callable[[Path], None]] = dict(self.extra_files())
        if self._lora():
            trainable = {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters()
                         if p.requires_grad}
            files[TRAINABLE] = lambda p: save_file(trainable, str(p))
        else:
            state_dict = {n: t.detach() for n, t in self.model.state_dict().items()}
            files.update(native_files(state_dict, self.model.config, {"step": self.step}, None))
        files[STATE_TENSORS] = lambda p: save_file(tensors, str(p))
        text = json.dumps(state, indent=1) + "\n"
        files[STATE_JSON] = lambda p: p.write_text(text, encoding="utf-8")  # last: marks the folder complete
        path = self.out_dir / CHECKPOINTS / f"step_{self.step:08d}"
        write_dir(path, files)
        self._prune()
        return path

    def _prune(self) -> None:
        root = self.out_dir / CHECKPOINTS
        steps = sorted(p for p in root.iterdir() if STEP_RE.fullmatch(p.name) and p.is_dir())
        for old in steps[:-self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _trainer_state(self, optim: Any, tensors: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = list(torch.cuda.get_rng_state_all())
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config": self.config.to_dict(),
            **extra,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "optimizer": _split(optim, tensors, "optimizer"),
            "data": _split(self.data.state_dict(), tensors, "data"),
            "rng": _split(rng, tensors, "rng"),
        }

    def _sharded_state(self) -> dict[str, torch.Tensor]:
        """The tensors of a sharded checkpoint, by name: the model's, then the optimizer moments."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st:
                    name = self.names[id(p)]
                    out[f"optim.{name}.exp_avg"] = st["exp_avg"]
                    out[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"]
        return out

    def _save_sharded(self) -> Path:
        """Every rank writes its shards (torch.distributed.checkpoint) into a hidden staging folder;
        rank 0 adds the trainer state and puts the whole folder in place in one step."""
        import torch.distributed.checkpoint as dcp

        root = self.out_dir / CHECKPOINTS
        path = root / f"step_{self.step:08d}"
        staging = root / SHARDS_STAGING.format(path.name)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted save's
        dist.barrier()
        dcp.save(self._sharded_state(), checkpoint_id=str(staging))
        dist.barrier()
        if self.rank == 0:
            steps = {self.names[id(p)]: {"step": st["step"]} for g in self.optimizer.param_groups
                     for p in g["params"] if (st := self.optimizer.state.get(p))}
            tensors: dict[str, torch.Tensor] = {}
            state = self._trainer_state(steps, tensors, sharded=True, world_size=dist.world_size(),
                                        model=self.model.config.to_dict())
            files: dict[str, Callable[[Path], None]] = {
                f.name: (lambda p, f=f: _link_or_copy(f, p)) for f in sorted(staging.iterdir()) if f.is_file()}
            files[STATE_TENSORS] = lambda p: save_file(tensors, str(p))
            text = json.dumps(state, indent=1) + "\n"
            files[STATE_JSON] = lambda p: p.write_text(text, encoding="utf-8")  # last: marks the folder complete
            write_dir(path, files, stale=lambda name: True)  # nothing of an older folder is kept
            shutil.rmtree(staging, ignore_errors=True)
            self._prune()
        dist.barrier()
        return path

    def _load_sharded(self, path: Path, state: dict[str, Any], where: str) -> None:
        """Model and optimizer moments from a sharded checkpoint, at this run's world size."""
        import torch.distributed.checkpoint as dcp

        by_name = {name: self._param(p_id) for p_id, name in self.names.items()}
        steps = state["optimizer"]
        if not isinstance(steps, dict):
            raise ValueError(f"{where}: optimizer: expected a mapping of parameter names")
        for name, st in steps.items():
            if name not in by_name:
                raise ValueError(f"{where}: optimizer state for unknown parameter {name}")
            p = by_name[name]
            self.optimizer.state[p] = {"step": int(st["step"]), "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)}
        wanted = self._sharded_state()
        try:
            with warnings.catch_warnings():  # a single process loading shards is what is meant here
                warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
                dcp.load(wanted, checkpoint_id=str(path), no_dist=not dist.is_distributed())
        except Exception as e:  # DCP reports a missing or mis-shaped tensor as a CheckpointException
            raise ValueError(f"{path}: does not fit this model and optimizer ({' '.join(str(e).split())[:500]})") \
                from None

    def resume(self) -> Optional[Path]:
        """Load the newest checkpoint into the model, optimizer, schedule, data and RNGs."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return None
        where = str(path / STATE_JSON)
        try:
            state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{where}: unreadable trainer state ({e})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{where}: not a trainer state of version {STATE_VERSION}")
        tensors = load_file(str(path / STATE_TENSORS))
        if state.get("sharded"):
            self._load_sharded(path, state, where)
        elif self._lora():
            saved = load_file(str(path / TRAINABLE))
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            if set(saved) != set(params):
                raise ValueError(f"{path / TRAINABLE}: holds {sorted(set(saved) ^ set(params))[:5]} that the "
                                 "model's trainable parameters do not (or the reverse)")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        else:
            loaded = load_model(path)
            missing = set(self.model.state_dict()) - set(loaded.state_dict())
            if missing:
                raise ValueError(f"{path}: missing tensor(s) {', '.join(sorted(missing)[:5])}")
            if self.root is None:
                self.model.load_state_dict(loaded.state_dict(), strict=False)
            else:  # a single-process checkpoint resumed under FSDP: each rank takes its shards
                full = loaded.state_dict()
                with torch.no_grad():
                    for name, t in self.model.state_dict().items():
                        t.copy_(dist.shard_like(full[name], t))
        if not state.get("sharded"):
            optim = _join(state["optimizer"], tensors, where)
            by_name = {name: p for p_id, name in self.names.items() for p in [self._param(p_id)]}
            for name, st in optim.items():
                if name not in by_name:
                    raise ValueError(f"{where}: optimizer state for unknown parameter {name}")
                p = by_name[name]
                self.optimizer.state[p] = {"step": int(st["step"]),
                                           "exp_avg": dist.shard_like(st["exp_avg"].to(p.device), p),
                                           "exp_avg_sq": dist.shard_like(st["exp_avg_sq"].to(p.device), p)}
        sched = dict(self.scheduler.state_dict())
        sched.update(state["scheduler"])
        self.scheduler.load_state_dict(sched)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.data.load_state_dict(_join(state["data"], tensors, where))
        rng = _join(state["rng"], tensors, where)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.load_extra(path, state)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        return path

    def _param(self, p_id: int) -> torch.nn.Parameter:
        if not hasattr(self, "_params_by_id"):
            self._params_by_id = {id(p): p for _, p in self.named_trainables()}
        return self._params_by_id[p_id]

    def save_final(self) -> Path:
        """out_dir/final: the trained model (native), or only the adapters with LoRA."""
        out = self.out_dir / "final"
        if self.root is not None:  # gathered from the shards (every rank), written by rank 0
            state = {name: dist.full_tensor(t.detach()).to("cpu") for name, t in self.model.state_dict().items()}
            if self.rank == 0:
                save_native(state, self.model.config, out, None)
            dist.barrier()
            return out
        if self._lora():
            save_adapters(self.model, out)
        else:
            save(self.model, out)
        return out
