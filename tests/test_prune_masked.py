"""The pruning forward (llama/prune/masked.py): no masks is the model, the fused path equals the eager
path in values and gradients, gradients reach every gate, skipped rows get no gradient, norms
average over the kept dims, LoRA and 4-bit bases, gradient checkpointing, and named errors."""
import pytest
import torch

import llama
from llama.config import ModelConfig
from llama.lora import apply_lora, lora_parameters
from llama.prune import MODULE_KINDS, PruningMasks, gate_shapes, masked_forward
from llama.quantize import Int4Config, quantize_

SOURCE = dict(dim=64, n_layers=3, n_heads=4, hidden_dim=96, vocab_size=97, max_seq_len=64)
TARGET = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=97, max_seq_len=64)
VARIANTS = {"swiglu-rms": {}, "gelu-layernorm": dict(mlp="gelu", norm="layer"), "tied": dict(tie_embeddings=True)}


def model_of(seed=0, **changes):
    torch.manual_seed(seed)
    model = llama.build(ModelConfig(**{**SOURCE, **changes}))
    with torch.no_grad():  # norms away from 1, so a wrong slice or average shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    return model.eval()


def tokens_of(seed=1, batch=2, seq=12):
    return torch.randint(0, SOURCE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def sampled_masks(cfg, seed=0, modules=MODULE_KINDS, zeros=True):
    """Leaf tensors from hard-concrete samples, with exact zeros forced in every kind."""
    torch.manual_seed(seed)
    target = ModelConfig(**{**TARGET, **{k: getattr(cfg, k) for k in ("tie_embeddings", "mlp", "norm")}})
    masks = PruningMasks(cfg, target, modules=modules, init_std=1.5).train()
    z = {k: v.detach().clone() for k, v in masks().items()}
    if zeros:
        for kind, t in z.items():
            if kind == "hidden":
                t[::5] = 0
            elif t.dim() == 2:
                t[0, 1] = 0
                t[1, ::3] = 0
            else:
                t[1] = 0
    return {k: v.requires_grad_() for k, v in z.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_masks_is_exactly_the_model(variant):
    model = model_of(**VARIANTS[variant])
    tok = tokens_of()
    with torch.no_grad():
        assert torch.equal(masked_forward(model, tok, {}), model(tok))
        targets = tokens_of(seed=2)
        assert torch.equal(masked_forward(model, tok, {}, targets), model(tok, targets))
        assert torch.equal(masked_forward(model, tok, {}, return_hidden=True), model(tok, return_hidden=True))
        # All-ones masks of every kind run the masked kernels: the same up to fp32 rounding.
        ones = {kind: torch.ones(shape) for kind, shape in gate_shapes(model.config).items()}
        for eager in (False, True):
            torch.testing.assert_close(masked_forward(model, tok, ones, eager=eager), model(tok),
                                       atol=2e-6, rtol=1e-5)


def _grads(model, z, eager, tok, targets):
    model.zero_grad(set_to_none=True)
    for t in z.values():
        t.grad = None
    loss = masked_forward(model, tok, z, targets, eager=eager)
    loss.backward()
    weights = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), weights, {k: t.grad.clone() for k, t in z.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_path_equals_eager_path(variant):
    model = model_of(**VARIANTS[variant])
    model.use_fused_ops(False)  # the same loss op for both (the masking is what is compared)
    z = sampled_masks(model.config)
    tok, targets = tokens_of(), tokens_of(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(masked_forward(model, tok, z), masked_forward(model, tok, z, eager=True),
                                   atol=1e-5, rtol=1e-5)
    loss_f, w_f, z_f = _grads(model, z, False, tok, targets)
    loss_e, w_e, z_e = _grads(model, z, True, tok, targets)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-6, rtol=1e-6)
    assert w_f.keys() == w_e.keys() and len(w_f) == len(list(model.parameters()))
    for name in w_f:
        torch.testing.assert_close(w_f[name], w_e[name], atol=1e-5, rtol=1e-4, msg=name)
    for kind in z:
        # where a gate is exactly 0 its gradient may differ (the fused path multiplies a soft
        # mask in after the kernel, from the saved output), and nothing passes to log_alpha
        # there anyway, through the clamp; everywhere else the two agree
        live = z[kind] != 0
        assert z_f[kind][live].abs().sum() > 0, kind
        torch.testing.assert_close(z_f[kind][live], z_e[kind][live], atol=1e-5, rtol=1e-4, msg=kind)


@pytest.mark.parametrize("variant", ["swiglu-rms", "tied"])
def test_fused_loss_over_kept_columns_equals_the_full_loss(variant):
    """On fused ops the loss multiplies only the head's kept columns; the eager path the full head."""
    model = model_of(**VARIANTS[variant]).use_fused_ops(True)
    z = sampled_masks(model.config)
    assert (z["hidden"] == 0).any()
    tok, targets = tokens_of(), tokens_of(seed=2)
    loss_f, w_f, z_f = _grads(model, z, False, tok, targets)
    loss_e, w_e, z_e = _grads(model, z, True, tok, targets)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-6, rtol=1e-6)
    for name in w_e:
        torch.testing.assert_close(w_f[name], w_e[name], atol=1e-5, rtol=1e-4, msg=name)
    for kind in z:
        torch.testing.assert_close(z_f[kind], z_e[kind], atol=1e-5, rtol=1e-4, msg=kind)


def test_gradient_reaches_every_log_alpha():
    model = model_of()
    # init_keep 0.6: samples strictly inside (0, 1), where the clamp passes a gradient
    masks = PruningMasks(model.config, ModelConfig(**TARGET), modules=MODULE_KINDS, init_keep=0.6).train()
    torch.manual_seed(3)
    for _ in range(4):  # a few samples: a scalar gate's single sample may sit on the clamp
        masked_forward(model, tokens_of(), masks(), tokens_of(seed=2)).backward()
    for kind, gate in masks.gates.items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, kind


@pytest.mark.parametrize("eager", [False, True])
def test_zero_head_gate_gives_its_rows_no_gradient(eager):
    model = model_of()
    cfg = model.config
    z = {"head": torch.rand(cfg.n_layers, cfg.n_heads) * 0.5 + 0.5}
    z["head"][1, 2] = 0.0
    masked_forward(model, tokens_of(), z, tokens_of(seed=2), eager=eager).backward()
    hd = cfg.head_dim
    attn = model.layers[1].attention
    for name in ("wq", "wk", "wv"):
        g = getattr(attn, name).weight.grad.view(cfg.n_heads, hd, cfg.dim)
        assert torch.all(g[2] == 0), name
        assert g[[0, 1, 3]].abs().sum() > 0, name
    assert torch.all(attn.wo.weight.grad.view(cfg.dim, cfg.n_heads, hd)[:, 2] == 0)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("eager", [False, True])
def test_norms_average_over_the_kept_dims(norm, eager):
    model = model_of(norm=norm)
    cfg = model.config
    hidden = torch.rand(cfg.dim) * 0.5 + 0.5
    hidden[::3] = 0
    # Every block off: the final norm sees the masked embedding alone.
    z = {"hidden": hidden, "layer": torch.zeros(cfg.n_layers)}
    tok = tokens_of()
    with torch.no_grad():
        h = masked_forward(model, tok, z, return_hidden=True, eager=eager)
        kept = hidden != 0
        e = (model.tok_embeddings(tok) * hidden)[..., kept]
        n = int(kept.sum())
        if norm == "rms":
            expected = e * torch.rsqrt(e.pow(2).sum(-1, keepdim=True) / n + cfg.norm_eps) * model.norm.weight[kept]
        else:
            centred = e - e.mean(-1, keepdim=True)
            expected = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
                        * model.norm.weight[kept] + model.norm.bias[kept])
    torch.testing.assert_close(h[..., kept], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(h[..., ~kept] == 0)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense-base", "4bit-base"])
def test_lora_pruning_fused_equals_eager_and_trains_adapters_only(four_bit):
    model = model_of()
    if four_bit:
        quantize_(model, Int4Config(32), filter_fn=lambda module, fqn: fqn != "output")
    apply_lora(model, rank=4, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.05)
    model.use_fused_ops(False)
    z = sampled_masks(model.config)
    tok, targets = tokens_of(), tokens_of(seed=2)
    loss_f, w_f, z_f = _grads(model, z, False, tok, targets)
    loss_e, w_e, z_e = _grads(model, z, True, tok, targets)
    torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=1e-5)
    adapters = {n for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and adapters <= set(w_f) and set(w_f) == set(w_e)
    assert not any(".base." in n for n in w_f)  # the base stays frozen
    for name in w_f:
        torch.testing.assert_close(w_f[name], w_e[name], atol=1e-5, rtol=1e-4, msg=name)
    for kind in z:
        torch.testing.assert_close(z_f[kind], z_e[kind], atol=1e-5, rtol=1e-4, msg=kind)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = model_of()
    z = sampled_masks(model.config)
    tok, targets = tokens_of(), tokens_of(seed=2)
    model.train()  # no dropout in the config: training mode computes what eval does
    plain = _grads(model, z, False, tok, targets)
    model.gradient_checkpointing = True
    checkpointed = _grads(model, z, False, tok, targets)
    torch.testing.assert_close(plain[0], checkpointed[0])
    for a, b in ((plain[1], checkpointed[1]), (plain[2], checkpointed[2])):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.parametrize("z,match", [
    ([1.0], r"z: expected a dict"),
    ({"heads": torch.ones(3, 4)}, r"z: unknown mask kind 'heads'"),
    ({"head": torch.ones(3, 5)}, r"z\['head'\]: expected shape \(3, 4\)"),
    ({"hidden": torch.ones(63)}, r"z\['hidden'\]: expected shape \(64,\)"),
    ({"layer": torch.ones(3, dtype=torch.long)}, r"z\['layer'\]: expected a floating-point tensor of shape \(3,\)"),
    ({"mlp": [1.0, 1.0, 1.0]}, r"z\['mlp'\]: expected a floating-point tensor"),
])
def test_bad_masks_are_named(z, match):
    with pytest.raises(ValueError, match=match):
        masked_forward(model_of(), tokens_of(), z)


def test_bad_arguments_are_named():
    model = model_of()
    with pytest.raises(ValueError, match="model: expected a llama.model.Transformer"):
        masked_forward(torch.nn.Linear(2, 2), tokens_of(), {})
    with pytest.raises(ValueError, match=r"tokens: expected an integer tensor of shape \(batch, seq\)"):
        masked_forward(model, tokens_of()[0], {})
    with pytest.raises(ValueError, match="targets: expected tokens' shape"):
        masked_forward(model, tokens_of(), {}, tokens_of()[:, :3])
    with pytest.raises(ValueError, match="return_hidden"):
        masked_forward(model, tokens_of(), {}, tokens_of(), return_hidden=True)
    gqa = model_of(n_kv_heads=2)
    with pytest.raises(ValueError, match=r"z\['head'\]: head masks need multi-head attention"):
        masked_forward(gqa, tokens_of(), {"head": torch.ones(3, 4)})
