"""Pruning training: a source model learns its hard-concrete masks toward a target shape while its
weights (or only LoRA adapters over a frozen base) keep training, with dynamic batch loading over
several data domains (Xia et al., "Sheared LLaMA", sections 2.1-2.2).

    python -m llama.prune train --config configs/prune/NAME.yaml [key=value ...] [--resume]

`PruneConfig` is a TrainConfig (every training key applies: data, lr, schedule, LoRA, checkpoints)
plus the pruning keys below; `PruneTrainer` is the Trainer with three changes:

* **The objective.** Each micro-batch samples the gates (masks in training mode), runs the model
  through `llama.prune.masked.masked_forward` (masked GEMMs skip what the gates zero) and adds
  the Lagrangian penalty of the expected sizes against the ramped target. The log_alphas train at
  `mask_lr` and the lambdas at `lag_lr`, both at constant rates (the cosine schedule drives the
  model's groups only) and outside gradient clipping, which would otherwise slow the lambdas'
  ascent just when a gap is large. The gates are clamped after every step.
* **Evaluation and dynamic batch loading.** Every `eval_every` steps the model is scored under
  the deterministic masks (exactly the target shape), per domain. With several domains and
  `dynamic_batch_loading`, the excess loss of each domain over its reference,
  d_i = max(L_i - ref_i, 0), reweights the mixture by exponentiated gradient with smoothing:
  a_i = w_i exp(dbl_eta d_i), w_i <- (1 - c) a_i / sum(a) + c / k (c = dbl_smoothing, k domains).
  A domain that lags its reference gets more of the next batches. The references are
  `reference_losses` when given (for example a target-size model's losses, as in the paper),
  else each domain's loss of the source model before pruning, measured at the first step: the
  weights then favour the domains that pruning hurts most.
* **Checkpoints.** Every checkpoint folder also holds the masks and lambdas (masks.safetensors,
  masks.json), and trainer_state.json the references, so `resume` continues exactly; the data
  weights travel in the loader's state. `final/` holds the model (adapters merged into a dense
  copy when training LoRA; a 4-bit base is dequantized for that) and the masks: the input of
  `python -m llama.prune compact`.

A chart, prune.png, shows the expected size of each pruned kind against its target, and the
domain weights, over the steps. Pruning runs in one process (no FSDP) and without torch.compile.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig, parse_overrides
from ..atomic import atomic_file, write_dir
from ..formats.native import native_files
from ..lora import has_lora, remove_lora
from ..optim import cosine_lr
from ..train.config import TrainConfig
from ..train.run import make_data, make_model, resolve_device
from ..train.trainer import Trainer
from ..train import distributed
from .masked import masked_forward
from .masks import MODULE_KINDS, PruningMasks, load_masks, mask_files, param_groups as mask_param_groups

__all__ = ["PruneConfig", "PruneTrainer", "build_prune", "update_domain_weights"]


@dataclass
class PruneConfig(TrainConfig):
    """A pruning run: TrainConfig's keys (the source model is `init_from`, or `model` for a fresh
    one) and these.

    target / target_overrides: the target shape, a preset name or model YAML, or the source's
    config changed by `key=value` overrides (e.g. [dim=256, n_heads=4, hidden_dim=688]).
    prune_modules: the gate kinds (layer, head, intermediate, hidden, head_layer, mlp).
    """

    target: Optional[str] = None
    target_overrides: list[str] = field(default_factory=list)
    prune_modules: list[str] = field(default_factory=lambda: ["head", "intermediate", "hidden"])
    lagrangian_warmup_steps: int = 0
    mask_lr: float = 0.1
    lag_lr: float = 0.1
    init_keep: float = 0.95
    constrain_params: bool = False
    dynamic_batch_loading: bool = True
    reference_losses: Optional[dict[str, float]] = None
    dbl_eta: float = 1.0
    dbl_smoothing: float = 1e-4
    eager_masks: bool = False  # the dense ops with masks multiplied in, for comparison
    out_dir: str = "runs/prune"

    def __post_init__(self):
        super().__post_init__()
        unknown = [m for m in self.prune_modules if m not in MODULE_KINDS]
        if unknown or not self.prune_modules:
            raise ValueError(f"prune_modules: expected names among {', '.join(MODULE_KINDS)}, got {self.prune_modules!r}")
        if self.target is None and not self.target_overrides:
            raise ValueError("target: give a preset or model YAML, or target_overrides of the source's config "
                             "(e.g. [dim=256, n_heads=4, hidden_dim=688])")
        if self.lagrangian_warmup_steps < 0 or self.lagrangian_warmup_steps > self.max_steps:
            raise ValueError(f"lagrangian_warmup_steps: expected an integer in [0, max_steps={self.max_steps}], "
                             f"got {self.lagrangian_warmup_steps}")
        for name in ("mask_lr", "lag_lr", "dbl_eta"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if not 0 < self.init_keep < 1:
            raise ValueError(f"init_keep: expected a probability strictly between 0 and 1, got {self.init_keep!r}")
        if not 0 <= self.dbl_smoothing < 1:
            raise ValueError(f"dbl_smoothing: expected a number in [0, 1), got {self.dbl_smoothing!r}")
        if self.reference_losses is not None:
            if not isinstance(self.data, dict):
                raise ValueError("reference_losses: applies only when data is a mapping {domain: folder}")
            missing = sorted(set(self.data) - set(self.reference_losses))
            unknown = sorted(set(self.reference_losses) - set(self.data))
            if missing or unknown:
                raise ValueError(f"reference_losses: expected one loss per domain {sorted(self.data)}; "
                                 f"missing {missing}, unknown {unknown}")
            for name, value in self.reference_losses.items():
                if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                    raise ValueError(f"reference_losses[{name!r}]: expected a finite number, got {value!r}")
        if self.compile:
            raise ValueError("compile: not supported while pruning (the masks change which rows each GEMM "
                             "runs); set it to false")

    def target_config(self, source: ModelConfig) -> ModelConfig:
        """The target shape: `target` (preset or YAML) then `target_overrides`; without `target`,
        the source's config changed by the overrides."""
        if self.target is not None:
            return ModelConfig.from_spec(self.target, self.target_overrides)
        try:
            return source.replace(**parse_overrides(self.target_overrides, what="target_overrides field"))
        except ValueError as e:
            raise ValueError(f"target_overrides: {e}") from None


def update_domain_weights(weights: dict[str, float], losses: dict[str, float], references: dict[str, float],
                          eta: float = 1.0, smoothing: float = 1e-4) -> dict[str, float]:
    """Dynamic batch loading's update: a_i = w_i exp(eta max(L_i - ref_i, 0)), then
    w_i = (1 - smoothing) a_i / sum(a) + smoothing / k over the k domains."""
    names = list(weights)
    if set(losses) != set(names) or set(references) != set(names):
        raise ValueError(f"losses, references: expected one value per domain {names}")
    excess = {n: max(float(losses[n]) - float(references[n]), 0.0) for n in names}
    top = max(excess.values())  # shifting the exponent by a constant leaves the normalised result
    raw = {n: float(weights[n]) * math.exp(eta * (excess[n] - top)) for n in names}
    total = math.fsum(raw.values())
    if not total > 0:
        raise ValueError(f"weights: no positive weight to update ({weights})")
    k = len(names)
    return {n: (1.0 - smoothing) * raw[n] / total + smoothing / k for n in names}


class PruneTrainer(Trainer):
    """Trainer over `model` and its `masks` (a PruningMasks for the model's config); see the
    module docstring for what differs from training."""

    def __init__(self, model, config: PruneConfig, data: Any, masks: PruningMasks, val: Any = None,
                 tokenizer: Any = None, on_step: Optional[Callable[[int, dict], None]] = None):
        if not isinstance(masks, PruningMasks):
            raise ValueError(f"masks: expected a PruningMasks, got {type(masks).__name__}")
        if distributed.is_distributed():
            raise ValueError("pruning runs in one process; launch it without torchrun")
        self.masks = masks
        self.reference_losses: Optional[dict[str, float]] = (
            dict(config.reference_losses) if config.reference_losses is not None else None)
        super().__init__(model, config, data, val=val, tokenizer=tokenizer, on_step=on_step)
        self.masks.to(self.device)

    # ------------------------------------------------------------------ hooks
    def named_trainables(self):
        yield from self.model.named_parameters()
        for name, p in self.masks.named_parameters():
            yield f"masks.{name}", p

    def param_groups(self) -> list[dict]:
        cfg = self.config
        groups = super().param_groups()
        self._model_groups = len(groups)
        return groups + mask_param_groups(self.masks, mask_lr=cfg.mask_lr, lag_lr=cfg.lag_lr)

    def schedule(self, optimizer):
        cfg = self.config
        def model(step: int) -> float:
            return cosine_lr(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

        def constant(step: int) -> float:
            return 1.0

        lambdas = [model] * self._model_groups + [constant] * (len(optimizer.param_groups) - self._model_groups)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def clipped_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups[:self._model_groups] for p in g["params"]]

    def after_step(self) -> None:
        self.masks.clamp_()

    def extra_files(self) -> dict[str, Callable[[Path], None]]:
        return mask_files(self.masks)

    def extra_state(self) -> dict[str, Any]:
        return {"reference_losses": self.reference_losses}

    def load_extra(self, path: Path, state: dict[str, Any]) -> None:
        saved = load_masks(path)
        if saved.gates.keys() != self.masks.gates.keys() or saved.source != self.masks.source \
                or saved.target != self.masks.target:
            raise ValueError(f"{path}: its masks are for another pruning run (modules, source or target differ)")
        with torch.no_grad():
            self.masks.load_state_dict(saved.state_dict())
        refs = state.get("reference_losses")
        if refs is not None and not (isinstance(refs, dict) and all(isinstance(v, (int, float)) for v in refs.values())):
            raise ValueError(f"{path}: reference_losses: expected a mapping of numbers, got {refs!r}")
        self.reference_losses = refs

    # ------------------------------------------------------------------ loss
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        z = self.masks()  # sampled: the masks are in training mode here
        with self.autocast():
            lm = masked_forward(self.model, x, z, y, eager=cfg.eager_masks, label_smoothing=cfg.label_smoothing,
                                z_loss=cfg.z_loss)
        penalty, log = self.masks.lagrangian_loss(self.step)
        self.step_metrics = {"lm_loss": float(lm.detach()), "lagrangian": float(penalty.detach()),
                             **{k: v for k, v in log.items() if k.startswith(("expected_", "target_"))}}
        return lm + penalty

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def domain_losses(self, masked: bool = True) -> dict[str, float]:
        """{domain: mean validation loss} under the deterministic masks (masked) or none."""
        was = self.masks.training
        self.masks.eval()
        try:
            z = self.masks() if masked else {}
            eager = self.config.eager_masks
            sums = self.validation_sums(lambda x, y: masked_forward(self.model, x, z, y, eager=eager) if masked
                                        else self.model(x, y))
        finally:
            self.masks.train(was)
        return {name: total / count for name, (total, count) in sums.items() if count}

    def evaluate(self) -> Optional[dict[str, float]]:
        if self.val is None:
            return None
        cfg = self.config
        losses = self.domain_losses(masked=True)
        if not losses:
            return None
        mean = sum(losses.values()) / len(losses)  # the domains count alike
        out: dict[str, float] = {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0))}
        for name, value in losses.items():
            out[f"val_loss_{name}"] = value
        domains = getattr(self.data, "domains", [])
        if cfg.dynamic_batch_loading and len(domains) > 1 and set(losses) == set(domains):
            if self.reference_losses is None:
                self.reference_losses = self.domain_losses(masked=False)
            weights = update_domain_weights(self.data.weights, losses, self.reference_losses,
                                            eta=cfg.dbl_eta, smoothing=cfg.dbl_smoothing)
            self.data.set_weights(weights)
        for name, w in getattr(self.data, "weights", {}).items():
            out[f"weight_{name}"] = w
        return out

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        domains = getattr(self.data, "domains", [])
        if (not cfg.resume and self.reference_losses is None and cfg.dynamic_batch_loading and len(domains) > 1
                and self.val is not None):
            self.reference_losses = self.domain_losses(masked=False)  # the source, before any step
        result = super().fit()
        if self.rank == 0 and self.step >= cfg.max_steps:
            self.plot_pruning()
        return result

    # ------------------------------------------------------------------ output
    def save_final(self) -> Path:
        """out_dir/final: the model (LoRA merged into a dense copy) and its masks."""
        model = self.model
        if has_lora(model):
            model = copy.deepcopy(model)
            remove_lora(model, merge=True, dequantize=True, dtype=torch.float32)
        state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
        files = dict(native_files(state, model.config, {"step": self.step, "pruning": "masks.json"}, None))
        files.update(mask_files(self.masks))
        return write_dir(self.out_dir / "final", files)

    def plot_pruning(self) -> Optional[Path]:
        """prune.png: each kind's expected size against its target, and the domain weights."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return plot_pruning(records, self.masks.source_sizes, self.out_dir / "prune.png")


def plot_pruning(records: list[dict], source_sizes: dict[str, float], out: Path) -> Optional[Path]:
    """The chart of a pruning run's metrics records (metrics.jsonl) at `out`."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    kinds = [k for k in source_sizes if any(f"expected_{k}" in r for r in records)]
    weights = sorted({k[len("weight_"):] for r in records for k in r if k.startswith("weight_")})
    if not kinds:
        return None
    panels = 2 if weights else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for i, kind in enumerate(kinds):
        rows = [r for r in records if f"expected_{kind}" in r]
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        ax.plot(steps, [r[f"expected_{kind}"] / source_sizes[kind] for r in rows], color=color, label=f"{kind} expected")
        ax.plot(steps, [r[f"target_{kind}"] / source_sizes[kind] for r in rows], color=color, linestyle="--",
                label=f"{kind} target")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the source's size")
    ax.set_title("Expected size against target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if weights:
        ax = axes[0][1]
        for name in weights:
            rows = [r for r in records if f"weight_{name}" in r]
            ax.plot([r["step"] for r in rows], [r[f"weight_{name}"] for r in rows], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("sampling weight")
        ax.set_title("Domain weights (dynamic batch loading)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def build_prune(cfg: PruneConfig, on_step: Optional[Callable[[int, dict], None]] = None) -> PruneTrainer:
    """The PruneTrainer for `cfg`: the source model (init_from or a fresh `model`, with LoRA when
    asked), its masks toward the target shape, and the data."""
    if distributed.launched():
        raise ValueError("pruning runs in one process; launch it without torchrun")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    loader, val, tokenizer, vocab = make_data(cfg)
    model = make_model(cfg, vocab, device)
    target = cfg.target_config(model.config)
    masks = PruningMasks(model.config, target, modules=tuple(cfg.prune_modules),
                         lagrangian_warmup_steps=cfg.lagrangian_warmup_steps, init_keep=cfg.init_keep,
                         constrain_params=cfg.constrain_params).to(device)
    return PruneTrainer(model, cfg, loader, masks, val=val, tokenizer=tokenizer, on_step=on_step)
