"""Structured-pruning masks: hard-concrete (L0) gates and their Lagrangian size constraint, as in
Sheared LLaMA (Xia et al., 2023), after Louizos et al. (2018), "Learning Sparse Neural Networks
through L0 Regularization".

    masks = PruningMasks(ModelConfig.preset("llama2-7b"), ModelConfig.preset("sheared-1.3b"),
                         modules=("layer", "head", "intermediate", "hidden"), lagrangian_warmup_steps=1000)
    opt = torch.optim.AdamW(param_groups(masks, mask_lr=1.0, lag_lr=1.0))   # or llama.optim.AdamW
    for step in ...:
        z = masks()                                   # {kind: sampled mask}, applied in the forward
        loss = task_loss(model, batch, z)
        penalty, sizes = masks.lagrangian_loss(step)  # sizes: expected and target, for logging
        (loss + penalty).backward(); opt.step(); opt.zero_grad(); masks.clamp_()
    final = masks.deterministic_masks()               # exactly the target's counts

Module kinds and gate shapes (L = source n_layers, H = source n_heads, F = source hidden_dim,
D = source dim):

    layer         (L,)     a whole block (attention and FFN)
    head          (L, H)   one attention head of one layer
    intermediate  (L, F)   one FFN channel of one layer
    hidden        (D,)     one channel of the model dimension (embeddings, norms, every projection)
    head_layer    (L,)     a layer's whole attention branch
    mlp           (L,)     a layer's whole FFN branch

Parameterization (per gate, independent): stretch limits l = -0.1, r = 1.1, temperature
beta = 2/3 and a learned log_alpha. Training samples u ~ U(eps, 1 - eps),
s = sigmoid((log u - log(1 - u) + log_alpha) / beta), s_bar = s (r - l) + l, z = clamp(s_bar, 0, 1):
z is exactly 0 or 1 with positive probability and continuous in between, and the sample is
differentiable in log_alpha (reparameterization). log_alpha starts where P(z != 0) = init_keep
(default 0.95; configurable) plus N(0, init_std) noise that breaks ties, and `clamp_()` (call it
after every optimizer step) keeps it in [-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT] = [-10, 10]: there
P(z != 0) is about 1e-7 or 1 - 1e-7, so nothing is lost, and a gate never drifts so far that it
cannot come back within a reasonable number of steps. The clamp is applied to the parameter, not
inside the forward, so that the gradient is never cut.

Expected sizes: P(z != 0) = sigmoid(log_alpha - beta log(-l / r)) per gate. The gates being
independent, expectations of products are products of expectations, so a module's expected
remaining size combines the gates above it multiplicatively (a missing kind counts as 1):

    layer         sum_i P(layer_i)
    head          sum_i P(layer_i) P(head_layer_i) sum_h P(head_ih)       (heads kept in all layers)
    intermediate  sum_i P(layer_i) P(mlp_i) sum_j P(intermediate_ij)
    hidden        sum_d P(hidden_d)
    head_layer    sum_i P(layer_i) P(head_layer_i)                         (attention branches kept)
    mlp           sum_i P(layer_i) P(mlp_i)

and the targets come from the target config: n_layers; n_layers * n_heads; n_layers * hidden_dim;
dim; n_layers; n_layers. `expected_params(masks, cfg)` is the expected parameter count of the
masked model, exact in expectation under independence: with D' the expected kept model dim,
A_i = P(layer_i) P(head_layer_i) sum_h P(head_ih) and M_i = P(layer_i) P(mlp_i) sum_j P(int_ij),

    sum_i [ 2 D' hd A_i (1 + n_kv_heads / n_heads)        wq, wo; wk, wv
            + (3 or 2) D' M_i                             SwiGLU or GELU FFN
            + norm(D') (P(layer_i) P(head_layer_i) + P(layer_i) P(mlp_i)) ]   attention/ffn norms
    + norm(D') + vocab D' (1 if tied else 2)

where hd = head_dim stays fixed and norm(D') is D' (RMSNorm) or 2 D' (LayerNorm). For a GQA
source the key/value heads are counted as the fraction n_kv_heads / n_heads of the query heads:
exact here, because head pruning of a GQA source is refused (see below) so the head count of a
GQA model never changes. With every gate kept it is the source's `num_params()`, with the
deterministic masks the target's (`target_params(target_cfg)`).

Lagrangian: for each module, with s the expected size and t the target of the current step,
lambda_1 (s - t) + lambda_2 (s - t)^2. The target ramps linearly from the source's size at step 0
to the target config's at `lagrangian_warmup_steps` (0: the final target at once). With
`normalize=True` (default) s and t are measured as fractions of the source's size, so every
module's gap lies in [-1, 1] and one learning rate suits all of them (the logged sizes are always
in counts). `constrain_params=True` adds one more constraint, "params": `expected_params` against
`target_params`, also in fractions of the source's count when normalized. The masks minimize the
penalty (plus the task loss); the lambdas maximize it: they enter it through a gradient reversal
(the forward uses lambda, the backward negates its gradient), so an ordinary minimizing optimizer
step on them is gradient ascent. This works with any optimizer (torch's or llama.optim.AdamW),
and the lambdas need no `maximize` flag; `param_groups` gives log_alpha and the lambdas their own
learning rates and no weight decay. A gap that stays positive grows lambda_1, which pushes the
expected size down, and lambda_2 only ever grows, tightening the constraint on both sides.

Evaluation (`deterministic_masks()`, or a gate's `forward()` in eval mode) keeps, per row of a
gate (per layer for head/intermediate), exactly k entries: the k largest by P(z != 0) (the order of
log_alpha), k the target's count (per layer: target n_heads, target hidden_dim; hidden: target
dim; layer: target n_layers; head_layer/mlp: target n_layers, or every layer when `layer` is
pruned too, since then the layer gates already remove the rest). Without `layer`, a smaller
target n_layers needs both head_layer and mlp, and is met by n_layers attention branches and
n_layers FFN branches, not necessarily in the same layers (the parameter count is the target's;
a layer left with one branch runs as a block with the other branch skipped). The kept entries carry
clamp(sigmoid(log_alpha) (r - l) + l, 0, 1), Louizos et al.'s test-time value, in [0, 1] and 1 for
a gate trained to be open (`binary=True` gives exactly 1); the others are 0. `keep()` gives the
kept entries as booleans. The later compaction step will select the kept rows and columns of each
weight (heads of wq/wk/wv and wo, channels of w1/w3 and w2, model-dim channels of every weight,
the embeddings and the norms), drop removed layers and branches, and fold the kept mask values
into the weights that produce each masked output, so the compact model of the target config
computes what the masked model computed.

Checks (ValueError naming the argument): unknown, repeated or no module kinds; a target larger
than the source in any dimension; a dimension that shrinks without the kind that prunes it; a
target whose head_dim (dim / n_heads) differs from the source's — head_dim stays fixed, so the
target's dim and n_heads shrink together (pruning heads therefore needs `hidden` too, as
ModelConfig ties head_dim to dim / n_heads); head pruning of a GQA source (n_kv_heads !=
n_heads), refused for simplicity; a target whose n_kv_heads, vocab_size, tie_embeddings, norm or
mlp differ from what pruning can give.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..atomic import write_dir
from ..config import ModelConfig
from ..formats.common import get_tensor, json_writer, make_config, open_safetensors, read_json, save_safetensors

__all__ = ["HardConcrete", "PruningMasks", "MODULE_KINDS", "LOG_ALPHA_LIMIT", "expected_params",
           "target_params", "param_groups", "gate_shapes", "MASKS_CONFIG", "MASKS_WEIGHTS", "MASKS_FORMAT",
           "MASKS_VERSION", "mask_files", "save_masks", "load_masks"]

MODULE_KINDS = ("layer", "head", "intermediate", "hidden", "head_layer", "mlp")
LIMIT_L, LIMIT_R = -0.1, 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
LOG_ALPHA_LIMIT = 10.0


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}: expected a probability strictly between 0 and 1, got {value!r}")
    return float(value)


class HardConcrete(nn.Module):
    """One tensor of hard-concrete gates (see the module docstring), `shape` (..., n).

    forward(): in training a fresh sample z of shape `shape`; in eval the deterministic mask that
    keeps, per row (last dimension), the `k` entries of largest P(z != 0) (default `target_count`).
    """

    def __init__(self, shape: Sequence[int] | int, target_count: Optional[int] = None, init_keep: float = 0.95,
                 init_std: float = 0.01, beta: float = BETA, limit_l: float = LIMIT_L, limit_r: float = LIMIT_R):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in shape):
            raise ValueError(f"shape: expected positive integer sizes, got {shape!r}")
        init_keep = _check_prob("init_keep", init_keep)
        if not (isinstance(init_std, (int, float)) and init_std >= 0):
            raise ValueError(f"init_std: expected a number >= 0, got {init_std!r}")
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta: expected a positive number, got {beta!r}")
        if not limit_l < 0.0 or not limit_r > 1.0:
            raise ValueError(f"limit_l, limit_r: expected limit_l < 0 and limit_r > 1, got {limit_l!r}, {limit_r!r}")
        if target_count is not None and (isinstance(target_count, bool) or not isinstance(target_count, int)
                                         or not 0 < target_count <= shape[-1]):
            raise ValueError(f"target_count: expected an integer in 1..{shape[-1]} (or None), got {target_count!r}")
        self.shape = shape
        self.target_count = target_count
        self.beta, self.limit_l, self.limit_r = float(beta), float(limit_l), float(limit_r)
        # P(z != 0) = sigmoid(log_alpha - shift): log_alpha = logit(init_keep) + shift starts at init_keep.
        self.shift = self.beta * math.log(-self.limit_l / self.limit_r)
        start = math.log(init_keep / (1.0 - init_keep)) + self.shift
        start = min(max(start, -LOG_ALPHA_LIMIT), LOG_ALPHA_LIMIT)
        self.log_alpha = nn.Parameter(torch.full(shape, start) + init_std * torch.randn(shape))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, target_count={self.target_count}"

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_alpha in [-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT]; call after each optimizer step."""
        self.log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def sample(self, *batch: int) -> torch.Tensor:
        """Hard-concrete samples z, shape (*batch, *self.shape), differentiable in log_alpha."""
        u = torch.empty((*batch, *self.shape), device=self.log_alpha.device,
                        dtype=self.log_alpha.dtype).uniform_(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) per gate = sigmoid(log_alpha - beta log(-l / r))."""
        return torch.sigmoid(self.log_alpha - self.shift)

    def expected_num(self) -> torch.Tensor:
        """Expected number of nonzero gates per row (sum of P(z != 0) over the last dimension)."""
        return self.prob_nonzero().sum(-1)

    def soft_values(self) -> torch.Tensor:
        """Louizos et al.'s test-time value clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)."""
        return (torch.sigmoid(self.log_alpha) * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def keep(self, k: Optional[int] = None) -> torch.Tensor:
        """Booleans: per row, the k entries of largest P(z != 0) (default target_count, else all)."""
        k = self.shape[-1] if k is None and self.target_count is None else (self.target_count if k is None else k)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.shape[-1]:
            raise ValueError(f"k: expected an integer in 0..{self.shape[-1]}, got {k!r}")
        with torch.no_grad():
            top = torch.topk(self.log_alpha, k, dim=-1).indices
            out = torch.zeros(self.shape, dtype=torch.bool, device=self.log_alpha.device)
            return out.scatter_(-1, top, True)

    def deterministic(self, k: Optional[int] = None, binary: bool = False) -> torch.Tensor:
        """The eval mask: kept entries (see `keep`) carry `soft_values()` (1 if binary), others 0."""
        kept = self.keep(k)
        with torch.no_grad():
            values = torch.ones_like(self.log_alpha) if binary else self.soft_values()
            return torch.where(kept, values, torch.zeros_like(values))

    def forward(self, k: Optional[int] = None) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic(k)


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward: a minimizing step on the input ascends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _target_fields(source: ModelConfig, target: ModelConfig, modules: tuple[str, ...]) -> None:
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(target, name) > getattr(source, name):
            raise ValueError(f"target.{name}: expected at most the source's {getattr(source, name)}, "
                             f"got {getattr(target, name)}")
    for name in ("vocab_size", "tie_embeddings", "norm", "mlp"):
        if getattr(target, name) != getattr(source, name):
            raise ValueError(f"target.{name}: pruning keeps it, so expected the source's "
                             f"{getattr(source, name)!r}, got {getattr(target, name)!r}")
    if target.head_dim != source.head_dim:
        raise ValueError(f"target.n_heads: head_dim stays fixed, so target dim / n_heads must be the source's "
                         f"head_dim {source.head_dim}; got {target.dim} / {target.n_heads} = {target.head_dim}")
    needs = (("n_layers", "'layer' (or both 'head_layer' and 'mlp')", "layer" in modules
              or {"head_layer", "mlp"} <= set(modules)), ("n_heads", "'head'", "head" in modules),
             ("hidden_dim", "'intermediate'", "intermediate" in modules), ("dim", "'hidden'", "hidden" in modules))
    for name, kinds, pruned in needs:
        if getattr(target, name) != getattr(source, name) and not pruned:
            raise ValueError(f"target.{name}: {getattr(target, name)} differs from the source's "
                             f"{getattr(source, name)}, but modules has no {kinds} to prune it")
    if "head" in modules and source.n_kv_heads != source.n_heads:
        raise ValueError(f"source.n_kv_heads: head pruning needs multi-head attention (n_kv_heads == n_heads); "
                         f"this source has {source.n_kv_heads} key/value heads for {source.n_heads} query heads "
                         f"(GQA); leave 'head' out of modules")
    if target.n_kv_heads * source.n_heads != source.n_kv_heads * target.n_heads:
        raise ValueError(f"target.n_kv_heads: expected the source's ratio of key/value to query heads "
                         f"({source.n_kv_heads}/{source.n_heads}), got {target.n_kv_heads}/{target.n_heads}")


class PruningMasks(nn.Module):
    """The hard-concrete gates of `modules` for pruning `source` down to `target` (both
    ModelConfigs), their expected sizes and the Lagrangian that drives them to the target."""

    def __init__(self, source: ModelConfig, target: ModelConfig,
                 modules: Iterable[str] = ("layer", "head", "intermediate", "hidden"),
                 lagrangian_warmup_steps: int = 0, init_keep: float = 0.95, init_std: float = 0.01,
                 normalize: bool = True, constrain_params: bool = False):
        super().__init__()
        if not isinstance(source, ModelConfig):
            raise ValueError(f"source: expected a ModelConfig, got {type(source).__name__}")
        if not isinstance(target, ModelConfig):
            raise ValueError(f"target: expected a ModelConfig, got {type(target).__name__}")
        if isinstance(modules, str):
            modules = (modules,)
        modules = tuple(modules)
        unknown = [m for m in modules if m not in MODULE_KINDS]
        if unknown or not modules or len(set(modules)) != len(modules):
            raise ValueError(f"modules: expected distinct names among {', '.join(MODULE_KINDS)}, got {modules!r}")
        if (isinstance(lagrangian_warmup_steps, bool) or not isinstance(lagrangian_warmup_steps, int)
                or lagrangian_warmup_steps < 0):
            raise ValueError(f"lagrangian_warmup_steps: expected an integer >= 0, got {lagrangian_warmup_steps!r}")
        _target_fields(source, target, modules)
        self.source, self.target, self.modules_ = source, target, modules
        self.lagrangian_warmup_steps = lagrangian_warmup_steps
        self.normalize, self.constrain_params = bool(normalize), bool(constrain_params)

        L, Lt = source.n_layers, target.n_layers
        block_count = L if "layer" in modules else Lt
        spec = {  # kind: (gate shape, deterministic count per row, source size, target size)
            "layer": ((L,), Lt, L, Lt),
            "head": ((L, source.n_heads), target.n_heads, L * source.n_heads, Lt * target.n_heads),
            "intermediate": ((L, source.hidden_dim), target.hidden_dim, L * source.hidden_dim, Lt * target.hidden_dim),
            "hidden": ((source.dim,), target.dim, source.dim, target.dim),
            "head_layer": ((L,), block_count, L, Lt),
            "mlp": ((L,), block_count, L, Lt),
        }
        self.gates = nn.ModuleDict({
            kind: HardConcrete(spec[kind][0], spec[kind][1], init_keep=init_keep, init_std=init_std)
            for kind in modules})
        self.source_sizes = {kind: spec[kind][2] for kind in modules}
        self.target_sizes = {kind: spec[kind][3] for kind in modules}
        constraints = list(modules)
        if self.constrain_params:
            constraints.append("params")
            self.source_sizes["params"] = source.num_params()
            self.target_sizes["params"] = target_params(target)
        self.lambda_1 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in constraints})
        self.lambda_2 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in constraints})

    # ----------------------------------------------------------------------------- masks
    def forward(self) -> dict[str, torch.Tensor]:
        """{kind: mask}: sampled in training, deterministic (the target's counts) in eval."""
        return {kind: gate() for kind, gate in self.gates.items()}

    def deterministic_masks(self, binary: bool = False) -> dict[str, torch.Tensor]:
        """{kind: mask} keeping exactly the target's counts; values as `HardConcrete.deterministic`."""
        return {kind: gate.deterministic(binary=binary) for kind, gate in self.gates.items()}

    def keep(self) -> dict[str, torch.Tensor]:
        """{kind: booleans} of the entries the deterministic masks keep."""
        return {kind: gate.keep() for kind, gate in self.gates.items()}

    def clamp_(self) -> None:
        """Clamp every log_alpha to [-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT]; call after each optimizer step."""
        for gate in self.gates.values():
            gate.clamp_()

    def mask_parameters(self) -> list[nn.Parameter]:
        return [gate.log_alpha for gate in self.gates.values()]

    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return list(self.lambda_1.values()) + list(self.lambda_2.values())

    # ----------------------------------------------------------------------------- sizes
    def probabilities(self) -> dict[str, torch.Tensor]:
        """{kind: P(z != 0)} per gate of each pruned kind."""
        return {kind: gate.prob_nonzero() for kind, gate in self.gates.items()}

    def expected_sizes(self, probs: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """{kind: expected remaining size} (combinations in the module docstring); `probs` replaces
        P(z != 0) (e.g. the deterministic keep booleans as floats, to count a final mask)."""
        p = self.probabilities() if probs is None else probs
        branch = _branches(p, self.source)
        out: dict[str, torch.Tensor] = {}
        for kind in self.gates:
            if kind == "layer":
                out[kind] = p["layer"].sum()
            elif kind == "head":
                out[kind] = (branch["attn"] * p["head"].sum(-1)).sum()
            elif kind == "intermediate":
                out[kind] = (branch["ffn"] * p["intermediate"].sum(-1)).sum()
            elif kind == "hidden":
                out[kind] = p["hidden"].sum()
            elif kind == "head_layer":
                out[kind] = branch["attn"].sum()
            else:
                out[kind] = branch["ffn"].sum()
        return out

    def target_at(self, step: int) -> dict[str, float]:
        """{constraint: target size at `step`}: linear from the source's size to the target's over
        lagrangian_warmup_steps, then the target's."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        w = self.lagrangian_warmup_steps
        frac = 1.0 if w == 0 else min(step / w, 1.0)
        return {k: self.source_sizes[k] + frac * (self.target_sizes[k] - self.source_sizes[k])
                for k in self.source_sizes}

    def lagrangian_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(penalty, log): the sum over constraints of lambda_1 (s - t) + lambda_2 (s - t)^2, and
        {"expected_<kind>": s, "target_<kind>": t, "lambda_1_<kind>": ..., "lambda_2_<kind>": ...}
        in counts. Minimize it over the masks; the lambdas ascend through a gradient reversal."""
        targets = self.target_at(step)
        sizes = self.expected_sizes()
        if self.constrain_params:
            sizes["params"] = expected_params(self, self.source)
        loss = self.lambda_1[next(iter(self.lambda_1))].new_zeros(())
        log: dict[str, float] = {}
        for k, s in sizes.items():
            scale = float(self.source_sizes[k]) if self.normalize else 1.0
            gap = (s - targets[k]) / scale
            l1 = _GradReverse.apply(self.lambda_1[k])
            l2 = _GradReverse.apply(self.lambda_2[k])
            loss = loss + l1 * gap + l2 * gap * gap
            log[f"expected_{k}"] = float(s.detach())
            log[f"target_{k}"] = float(targets[k])
            log[f"lambda_1_{k}"] = float(self.lambda_1[k].detach())
            log[f"lambda_2_{k}"] = float(self.lambda_2[k].detach())
        return loss, log


def _branches(p: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per layer, the probability that its attention and its FFN branch are kept."""
    like = next(iter(p.values()))
    one = torch.ones(cfg.n_layers, dtype=like.dtype, device=like.device)
    layer = p.get("layer", one)
    return {"attn": layer * p.get("head_layer", one), "ffn": layer * p.get("mlp", one)}


def expected_params(masks: PruningMasks, cfg: Optional[ModelConfig] = None,
                    probs: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Expected parameter count of `cfg` (default the masks' source) under the masks (formula in
    the module docstring), differentiable in log_alpha. `probs` replaces P(z != 0), e.g.
    {kind: keep.float()} counts what a deterministic mask keeps."""
    cfg = masks.source if cfg is None else cfg
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    p = masks.probabilities() if probs is None else probs
    for kind, gate in masks.gates.items():
        if kind not in p or tuple(p[kind].shape) != gate.shape:
            raise ValueError(f"probs: expected a {gate.shape} tensor for {kind!r}")
    if (cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.dim) != (
            masks.source.n_layers, masks.source.n_heads, masks.source.hidden_dim, masks.source.dim):
        raise ValueError("cfg: expected the masks' source shape (n_layers, n_heads, hidden_dim, dim)")
    like = next(iter(p.values()))
    dim = p["hidden"].sum() if "hidden" in p else like.new_tensor(float(cfg.dim))
    branch = _branches(p, cfg)
    heads = p["head"].sum(-1) if "head" in p else like.new_full((cfg.n_layers,), float(cfg.n_heads))
    inter = (p["intermediate"].sum(-1) if "intermediate" in p
             else like.new_full((cfg.n_layers,), float(cfg.hidden_dim)))
    kv_ratio = cfg.n_kv_heads / cfg.n_heads
    norm = dim if cfg.norm == "rms" else 2 * dim
    ffn_mats = 3 if cfg.mlp == "swiglu" else 2
    attn = 2 * dim * cfg.head_dim * (branch["attn"] * heads).sum() * (1 + kv_ratio)
    ffn = ffn_mats * dim * (branch["ffn"] * inter).sum()
    norms = norm * (branch["attn"].sum() + branch["ffn"].sum()) + norm
    embed = cfg.vocab_size * dim * (1 if cfg.tie_embeddings else 2)
    return attn + ffn + norms + embed


def target_params(target_cfg: ModelConfig) -> int:
    """The parameter count the pruned model should reach: the target config's."""
    if not isinstance(target_cfg, ModelConfig):
        raise ValueError(f"target_cfg: expected a ModelConfig, got {type(target_cfg).__name__}")
    return target_cfg.num_params()


def param_groups(masks: PruningMasks, mask_lr: float, lag_lr: float) -> list[dict]:
    """Two optimizer groups, no weight decay: the log_alphas at mask_lr and the lambdas at lag_lr.
    Both are minimizing groups; the lambdas ascend the Lagrangian through the gradient reversal
    inside `lagrangian_loss`, so no `maximize` flag (which llama.optim.AdamW lacks) is needed."""
    if not isinstance(masks, PruningMasks):
        raise ValueError(f"masks: expected a PruningMasks, got {type(masks).__name__}")
    for name, lr in (("mask_lr", mask_lr), ("lag_lr", lag_lr)):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{name}: expected a positive number, got {lr!r}")
    return [{"params": masks.mask_parameters(), "lr": float(mask_lr), "weight_decay": 0.0},
            {"params": masks.lagrangian_parameters(), "lr": float(lag_lr), "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- gate shapes and persistence
MASKS_WEIGHTS = "masks.safetensors"
MASKS_CONFIG = "masks.json"
MASKS_FORMAT = "llama-kernels-prune-masks"
MASKS_VERSION = 1
_STORED_FLOATS = {"F64", "F32", "F16", "BF16"}


def gate_shapes(cfg: ModelConfig, modules: Iterable[str] = MODULE_KINDS) -> dict[str, tuple[int, ...]]:
    """{kind: gate shape} for a source config (the table in the module docstring), for `modules`.
    The masked forward and the loader check tensors against these before using them."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    L = cfg.n_layers
    shapes = {"layer": (L,), "head": (L, cfg.n_heads), "intermediate": (L, cfg.hidden_dim), "hidden": (cfg.dim,),
              "head_layer": (L,), "mlp": (L,)}
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    unknown = [m for m in modules if m not in shapes]
    if unknown:
        raise ValueError(f"modules: expected names among {', '.join(MODULE_KINDS)}, got {unknown!r}")
    return {kind: shapes[kind] for kind in modules}


def _stored_shapes(source: ModelConfig, modules: Sequence[str], constrain_params: bool) -> dict[str, tuple]:
    """The state_dict of PruningMasks(source, ..., modules, constrain_params): name -> shape."""
    out: dict[str, tuple] = {f"gates.{kind}.log_alpha": shape for kind, shape in gate_shapes(source, modules).items()}
    for k in (*modules, *(("params",) if constrain_params else ())):
        out[f"lambda_1.{k}"] = ()
        out[f"lambda_2.{k}"] = ()
    return out


def mask_files(masks: PruningMasks) -> dict[str, Callable[[Path], None]]:
    """The files that store `masks`, as {name: writer} for llama.atomic.write_dir, so that a
    caller can write them in the same atomic step as a checkpoint:

    masks.safetensors  the state_dict: gates.<kind>.log_alpha, lambda_1.<constraint>, lambda_2.<constraint>
    masks.json         {"format", "version", "source", "target" (ModelConfig dicts), "modules",
                       "lagrangian_warmup_steps", "normalize", "constrain_params"}

    The tensors are copied now (to the CPU), so training may go on while the files are written."""
    if not isinstance(masks, PruningMasks):
        raise ValueError(f"masks: expected a PruningMasks, got {type(masks).__name__}")
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in masks.state_dict().items()}
    config = {
        "format": MASKS_FORMAT,
        "version": MASKS_VERSION,
        "source": masks.source.to_dict(),
        "target": masks.target.to_dict(),
        "modules": list(masks.modules_),
        "lagrangian_warmup_steps": masks.lagrangian_warmup_steps,
        "normalize": masks.normalize,
        "constrain_params": masks.constrain_params,
    }
    return {MASKS_WEIGHTS: lambda p: save_safetensors(tensors, p), MASKS_CONFIG: json_writer(config)}


def save_masks(masks: PruningMasks, folder: Union[str, Path]) -> Path:
    """Write `masks` (mask_files) into `folder` atomically, keeping the other files there (a
    checkpoint beside them, say); returns the folder."""
    folder = Path(folder)
    write_dir(folder, mask_files(masks))
    return folder


def _json_field(raw: dict[str, Any], key: str, where: str, check: Callable[[Any], bool], expected: str) -> Any:
    if key not in raw:
        raise ValueError(f"{where}: missing field {key} (expected {expected})")
    value = raw[key]
    if not check(value):
        raise ValueError(f"{where}: field {key}: expected {expected}, got {value!r:.200}")
    return value


def load_masks(folder: Union[str, Path]) -> PruningMasks:
    """The PruningMasks that `save_masks` wrote into `folder`, on the CPU.

    Written for files that may be hostile: every field of masks.json is type-checked (a wrong
    one is a ValueError naming the file and the field), the configs must be valid ModelConfigs,
    and the names, dtypes and shapes of the tensors in masks.safetensors are checked against
    what those fields imply before anything is allocated for them; values must be finite.
    Only safetensors is read, never pickle. The global random state is left as it was (building
    the gates draws their initial noise, which the loaded values then replace)."""
    folder = Path(folder)
    config_path, weights_path = folder / MASKS_CONFIG, folder / MASKS_WEIGHTS
    where = str(config_path)
    if not config_path.exists():
        raise ValueError(f"{where}: missing masks file (save_masks writes {MASKS_CONFIG} and {MASKS_WEIGHTS})")
    raw = read_json(config_path)
    _json_field(raw, "format", where, lambda v: v == MASKS_FORMAT, repr(MASKS_FORMAT))
    _json_field(raw, "version", where, lambda v: v == MASKS_VERSION, str(MASKS_VERSION))
    configs = {}
    for key in ("source", "target"):
        fields = _json_field(raw, key, where, lambda v: isinstance(v, dict), "an object of ModelConfig fields")
        configs[key] = make_config(f"{where}: field {key}", **fields)
    modules = _json_field(raw, "modules", where,
                          lambda v: isinstance(v, list) and v and all(m in MODULE_KINDS for m in v)
                          and len(set(v)) == len(v),
                          f"a non-empty list of distinct names among {', '.join(MODULE_KINDS)}")
    warmup = _json_field(raw, "lagrangian_warmup_steps", where,
                         lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
    normalize = _json_field(raw, "normalize", where, lambda v: isinstance(v, bool), "true or false")
    constrain = _json_field(raw, "constrain_params", where, lambda v: isinstance(v, bool), "true or false")
    expected = _stored_shapes(configs["source"], modules, constrain)

    wfile = str(weights_path)
    with contextlib.ExitStack() as stack:
        handles = open_safetensors(weights_path, stack)
        missing, unexpected = sorted(set(expected) - set(handles)), sorted(set(handles) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{wfile}: expected the tensors that {MASKS_CONFIG} implies; missing {missing}, "
                             f"unexpected {unexpected[:10]}")
        for name, shape in expected.items():
            piece = handles[name].get_slice(name)
            if piece.get_dtype() not in _STORED_FLOATS:
                raise ValueError(f"{wfile}: tensor {name}: expected a float tensor, got dtype {piece.get_dtype()}")
            if tuple(piece.get_shape()) != shape:
                raise ValueError(f"{wfile}: tensor {name}: expected shape {shape}, got {tuple(piece.get_shape())}")
        state = {}
        for name in expected:
            t = get_tensor(handles[name], name, weights_path).to(torch.float32)
            if not torch.isfinite(t).all():
                raise ValueError(f"{wfile}: tensor {name}: expected finite values")
            state[name] = t
    try:
        with torch.random.fork_rng(devices=[]):
            masks = PruningMasks(configs["source"], configs["target"], modules=modules,
                                 lagrangian_warmup_steps=warmup, normalize=normalize, constrain_params=constrain)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    masks.load_state_dict(state)
    return masks
