"""Hard-concrete pruning masks (llama/prune/masks.py): expected L0 against sampling, deterministic
masks at the target's counts, expected parameter counts, the Lagrangian and its warmup, errors."""
import math

import pytest
import torch

from llama.config import ModelConfig
from llama.prune import (LOG_ALPHA_LIMIT, MODULE_KINDS, HardConcrete, PruningMasks, expected_params,
                         param_groups, target_params)

SOURCE = ModelConfig(dim=64, n_layers=4, n_heads=4, hidden_dim=172, vocab_size=128)
TARGET = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=86, vocab_size=128)  # head_dim 16 kept
DEFAULT = ("layer", "head", "intermediate", "hidden")


@pytest.mark.parametrize("log_alpha", [-3.0, -0.5, 0.0, 1.0, 2.5])
def test_expected_l0_matches_monte_carlo(log_alpha):
    torch.manual_seed(0)
    gate = HardConcrete(4, init_std=0.0)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    n = 50_000
    z = gate.sample(n)
    assert z.shape == (n, 4) and z.min() >= 0 and z.max() <= 1
    frac = (z != 0).float().mean(0)
    p = gate.prob_nonzero().detach()
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((frac - p).abs() < 4 * se + 1e-6), (frac, p)
    assert math.isclose(float(gate.expected_num().detach()), float(p.sum()), rel_tol=1e-6)
    # Both ends are reached with positive probability (the stretch makes exact 0s and 1s).
    if -1.0 <= log_alpha <= 1.0:
        assert (z == 0).any() and (z == 1).any()


def test_sample_is_differentiable_and_init_keep():
    gate = HardConcrete((3, 5), init_keep=0.9, init_std=0.0)
    assert torch.allclose(gate.prob_nonzero(), torch.full((3, 5), 0.9), atol=1e-5)
    gate.sample(8).sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
    with torch.no_grad():
        gate.log_alpha.fill_(50.0)
    gate.clamp_()
    assert float(gate.log_alpha.detach().max()) == LOG_ALPHA_LIMIT


def test_deterministic_masks_hit_target_counts():
    torch.manual_seed(1)
    masks = PruningMasks(SOURCE, TARGET, modules=MODULE_KINDS, init_std=1.0)
    masks.eval()
    det = masks()
    keep = masks.keep()
    expected_rows = {"layer": 2, "head": [2] * 4, "intermediate": [86] * 4, "hidden": 32,
                     "head_layer": 4, "mlp": 4}  # with `layer` pruned the branch gates keep every layer
    for kind, mask in det.items():
        assert mask.shape == masks.gates[kind].shape
        assert keep[kind].sum(-1).tolist() == expected_rows[kind], kind
        assert torch.all((mask >= 0) & (mask <= 1))
        assert torch.all(mask[~keep[kind]] == 0)
        # The kept entries are the largest log_alphas of each row.
        la = masks.gates[kind].log_alpha.detach()
        kept_min = torch.where(keep[kind], la, torch.full_like(la, math.inf)).min(-1).values
        dropped_max = torch.where(keep[kind], torch.full_like(la, -math.inf), la).max(-1).values
        assert torch.all(kept_min >= dropped_max)
    binary = masks.deterministic_masks(binary=True)
    assert all(torch.equal(binary[k], keep[k].float()) for k in binary)
    # Without `layer`, head_layer and mlp keep the target's n_layers.
    only = PruningMasks(SOURCE, SOURCE.replace(n_layers=2), modules=("head_layer", "mlp"))
    assert {k: int(v.sum()) for k, v in only.keep().items()} == {"head_layer": 2, "mlp": 2}
    # The deterministic masks of the defaults keep exactly the target's expected sizes.
    masks = PruningMasks(SOURCE, TARGET, modules=DEFAULT)
    counted = masks.expected_sizes({k: v.float() for k, v in masks.keep().items()})
    assert {k: float(v) for k, v in counted.items()} == {k: float(v) for k, v in masks.target_sizes.items()}


@pytest.mark.parametrize("modules", [DEFAULT, MODULE_KINDS])
@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True}, {"norm": "layer", "mlp": "gelu"}])
def test_expected_params(modules, variant):
    src, tgt = SOURCE.replace(**variant), TARGET.replace(**variant)
    masks = PruningMasks(src, tgt, modules=modules)
    ones = {k: torch.ones(g.shape) for k, g in masks.gates.items()}
    assert float(expected_params(masks, src, probs=ones)) == src.num_params()
    keep = {k: v.float() for k, v in masks.keep().items()}
    assert float(expected_params(masks, src, probs=keep)) == target_params(tgt) == tgt.num_params()
    e = expected_params(masks)
    assert tgt.num_params() < float(e.detach()) < src.num_params()
    e.backward()
    assert all(g.log_alpha.grad is not None for g in masks.gates.values())


def test_expected_params_gqa_source_without_head_pruning():
    src = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=172, vocab_size=128)
    tgt = src.replace(n_layers=2, hidden_dim=86)
    masks = PruningMasks(src, tgt, modules=("layer", "intermediate"))
    keep = {k: v.float() for k, v in masks.keep().items()}
    assert float(expected_params(masks, src, probs=keep)) == tgt.num_params()


def test_sizes_combine_multiplicatively():
    masks = PruningMasks(SOURCE, TARGET, modules=MODULE_KINDS, init_std=0.5)
    p = masks.probabilities()
    sizes = masks.expected_sizes()
    attn = p["layer"] * p["head_layer"]
    assert torch.allclose(sizes["head"], (attn * p["head"].sum(-1)).sum())
    assert torch.allclose(sizes["intermediate"], (p["layer"] * p["mlp"] * p["intermediate"].sum(-1)).sum())
    assert torch.allclose(sizes["head_layer"], attn.sum())


def test_target_ramps_linearly():
    masks = PruningMasks(SOURCE, TARGET, modules=DEFAULT, lagrangian_warmup_steps=100, constrain_params=True)
    src, tgt = masks.source_sizes, masks.target_sizes
    assert src["layer"] == 4 and tgt["layer"] == 2 and tgt["head"] == 4 and tgt["intermediate"] == 172
    assert tgt["params"] == TARGET.num_params() and src["params"] == SOURCE.num_params()
    for step in (0, 25, 50, 99, 100, 250):
        t = masks.target_at(step)
        frac = min(step / 100, 1.0)
        for k in src:
            assert math.isclose(t[k], src[k] + frac * (tgt[k] - src[k]), rel_tol=1e-12)
    _, log = masks.lagrangian_loss(50)
    assert log["target_layer"] == 3.0 and log["target_hidden"] == 48.0
    final = {k: v for k, v in tgt.items() if k != "params"}
    assert PruningMasks(SOURCE, TARGET, modules=DEFAULT).target_at(0) == final


@pytest.mark.parametrize("constrain_params", [False, True])
def test_lagrangian_drives_expected_sizes_to_target(constrain_params):
    torch.manual_seed(0)
    masks = PruningMasks(SOURCE, TARGET, modules=DEFAULT, constrain_params=constrain_params)
    opt = torch.optim.AdamW(param_groups(masks, mask_lr=0.1, lag_lr=0.1))
    start = {k: float(v.detach()) for k, v in masks.expected_sizes().items()}
    lambda_1_grew = {k: False for k in DEFAULT}
    for step in range(300):
        task = 0.0 * sum(g.log_alpha.sum() for g in masks.gates.values())  # a dummy task loss
        penalty, log = masks.lagrangian_loss(step)
        opt.zero_grad()
        (task + penalty).backward()
        opt.step()
        masks.clamp_()
        for k in DEFAULT:  # ascent: while the expected size is above the target, lambda_1 rises
            lambda_1_grew[k] |= step < 20 and float(masks.lambda_1[k].detach()) > 0
    end = {k: float(v.detach()) for k, v in masks.expected_sizes().items()}
    for k in DEFAULT:
        t = masks.target_sizes[k]
        assert abs(end[k] - t) < 0.05 * abs(start[k] - t), (k, start[k], end[k], t)
        assert lambda_1_grew[k] and float(masks.lambda_2[k].detach()) > 0, k
    assert set(log) >= {f"{p}_{k}" for p in ("expected", "target", "lambda_1", "lambda_2") for k in DEFAULT}


def test_lambdas_ascend_with_project_adamw():
    from llama.optim import AdamW
    masks = PruningMasks(SOURCE, SOURCE.replace(dim=32, n_heads=2, n_kv_heads=2), modules=("hidden", "head"))
    opt = AdamW(param_groups(masks, mask_lr=0.1, lag_lr=0.1), fused=False)
    before = float(masks.expected_sizes()["hidden"].detach())
    for step in range(5):
        penalty, _ = masks.lagrangian_loss(step)
        opt.zero_grad()
        penalty.backward()
        opt.step()
    assert float(masks.lambda_1["hidden"].detach()) > 0 and float(masks.lambda_2["hidden"].detach()) > 0
    assert float(masks.expected_sizes()["hidden"].detach()) < before


def test_sampled_masks_in_training():
    masks = PruningMasks(SOURCE, TARGET, modules=MODULE_KINDS)
    z = masks()
    assert {k: tuple(v.shape) for k, v in z.items()} == {
        "layer": (4,), "head": (4, 4), "intermediate": (4, 172), "hidden": (64,), "head_layer": (4,), "mlp": (4,)}
    assert all(v.requires_grad for v in z.values())


@pytest.mark.parametrize("kwargs, name", [
    (dict(target=TARGET.replace(n_layers=5)), "target.n_layers"),
    (dict(target=SOURCE.replace(hidden_dim=200)), "target.hidden_dim"),
    (dict(target=ModelConfig(dim=128, n_layers=2, n_heads=8, hidden_dim=86, vocab_size=128)), "target.dim"),
    (dict(target=ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=86, vocab_size=128)), "target.n_heads"),
    (dict(target=TARGET.replace(vocab_size=64)), "target.vocab_size"),
    (dict(target=TARGET.replace(tie_embeddings=True)), "target.tie_embeddings"),
    (dict(modules=("layer", "heads")), "modules"),
    (dict(modules=()), "modules"),
    (dict(modules=("layer", "layer", "head", "intermediate", "hidden")), "modules"),
    (dict(modules=("head", "intermediate", "hidden")), "target.n_layers"),
    (dict(modules=("layer", "head", "intermediate")), "target.dim"),
    (dict(lagrangian_warmup_steps=-1), "lagrangian_warmup_steps"),
    (dict(init_keep=1.0), "init_keep"),
    (dict(source="stories15M"), "source"),
])
def test_bad_input_named(kwargs, name):
    args = dict(source=SOURCE, target=TARGET, modules=DEFAULT) | kwargs
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        PruningMasks(**args)


def test_gqa_source_refused_for_head_pruning():
    src = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=172, vocab_size=128)
    tgt = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=86, vocab_size=128)
    with pytest.raises(ValueError, match=r"source\.n_kv_heads"):
        PruningMasks(src, tgt, modules=DEFAULT)
    with pytest.raises(ValueError, match=r"target\.n_kv_heads"):
        PruningMasks(SOURCE, TARGET.replace(n_kv_heads=1), modules=DEFAULT)


def test_other_bad_arguments_named():
    masks = PruningMasks(SOURCE, TARGET, modules=DEFAULT)
    with pytest.raises(ValueError, match="step"):
        masks.target_at(-1)
    with pytest.raises(ValueError, match="mask_lr"):
        param_groups(masks, mask_lr=0, lag_lr=0.1)
    with pytest.raises(ValueError, match="lag_lr"):
        param_groups(masks, mask_lr=0.1, lag_lr=float("nan"))
    with pytest.raises(ValueError, match="masks"):
        param_groups(object(), 0.1, 0.1)
    with pytest.raises(ValueError, match="target_cfg"):
        target_params({"dim": 32})
    with pytest.raises(ValueError, match="k"):
        masks.gates["head"].keep(5)
    with pytest.raises(ValueError, match="shape"):
        HardConcrete((4, 0))
