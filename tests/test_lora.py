"""LoRA adapters (llama.lora): the layer against dense math, training only the adapters, merging,
QLoRA on 4-bit bases, adapters saved and loaded apart from the base, and the refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import llama
from llama import checkpoint as ck
from llama.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, check_no_lora, load_adapters, lora_layers,
    lora_parameters, merge_lora, remove_lora, save_adapters, trainable_parameter_count, trainable_parameters,
    unmerge_lora,
)
from llama.model import Linear
from llama.optim import AdamW
from llama.quantize import Int4Config, NF4Config, QuantLinear, quantize_
from llama_kernels.cpu import int4_matmul as cpu_int4

CFG = dict(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=32)
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
INPUTS, TARGETS = TOKENS[:, :-1], TOKENS[:, 1:]


def tiny(**changes):
    # eval mode: the config has no dropout, so a forward computes what training mode does
    return llama.build(llama.ModelConfig(**{**CFG, **changes})).eval()


def randomize_adapters(model, seed=0):
    """Non-zero B (a fresh adapter is the identity), so the adapters show in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def snapshot(model, keep=lambda name: True):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if keep(k)}


def train(model, steps=6, lr=1e-2):
    opt = AdamW(list(trainable_parameters(model)), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(INPUTS, TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- the layer
def test_lora_linear_matches_dense_reference_fp64():
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=True).double()
    layer = LoRALinear(base, rank=4, alpha=8, dtype=torch.float64)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (20, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = base.weight.detach() + 2.0 * b @ a
    y_ref = x_ref @ w.T + base.bias.detach()
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert base.weight.grad is None and base.bias.grad is None


def test_lora_linear_on_our_linear_and_passthrough():
    base = Linear(32, 16, bias=False)
    layer = LoRALinear(base, rank=2, alpha=4)
    assert (layer.in_features, layer.out_features) == (32, 16)
    assert layer.weight is base.weight and layer.bias is None and layer.scale == 2.0
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    with pytest.raises(KeyError):  # a parameter cannot be set over the read-through weight
        layer.weight = nn.Parameter(torch.zeros(16, 32))


def test_dropout_applies_to_the_adapter_input_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8), rank=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.equal(y1, y2)


def test_adapters_keep_their_dtype_through_model_to():
    model = apply_lora(tiny())
    model.to(torch.bfloat16)
    wq = model.layers[0].attention.wq
    assert wq.base.weight.dtype == torch.bfloat16 and wq.lora_A.dtype == torch.float32
    randomize_adapters(model)
    logits = model(INPUTS)
    assert logits.dtype == torch.bfloat16
    model(INPUTS, TARGETS).backward()
    assert wq.lora_B.grad.dtype == torch.float32 and wq.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=True), "rank"),
    (dict(alpha=0), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(alpha="16"), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(dtype=torch.int8), "dtype"),
])
def test_lora_linear_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(8, 8), **kwargs)


def test_lora_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Embedding(8, 8))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(8, 8)))


# ----------------------------------------------------------------------------- the model
def test_fresh_adapters_change_nothing_and_freeze_the_rest():
    model = tiny()
    ref = model(INPUTS)
    apply_lora(model, rank=4, alpha=8, trainable=("norm",))
    assert torch.equal(model(INPUTS), ref)
    layers = lora_layers(model)
    assert list(layers) == [f"layers.{i}.attention.{n}" for i in range(2) for n in ("wq", "wk", "wv", "wo")]
    training = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert training == sorted([f"{name}.lora_{x}" for name in layers for x in "AB"] + ["norm.weight"])
    assert "layers.0.attention.wq.base.weight" in model.state_dict()


def test_training_changes_only_adapters_and_named_trainables():
    model = apply_lora(tiny(), rank=4, alpha=8, trainable=("norm",))
    before = snapshot(model)
    losses = train(model)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    expected = sorted([f"{name}.lora_{x}" for name in lora_layers(model) for x in "AB"] + ["norm.weight"])
    assert changed == expected  # every base weight bit-identical


def test_trainable_parameter_count_is_exact():
    cfg = llama.ModelConfig(**CFG)
    model = apply_lora(tiny(), rank=8, targets=("wq", "wk", "wv", "wo"), trainable=("norm",))
    # 2 blocks x 4 projections of 64 x 64: A (8, 64) + B (64, 8) each; the final norm has 64
    adapters = 2 * 4 * (8 * 64 + 64 * 8)
    assert adapters == 8192
    assert trainable_parameter_count(model) == (adapters + 64, cfg.num_params() + adapters)
    # 4-bit layers count as their logical out x in weights
    q = quantize_(tiny(), Int4Config(64))
    apply_lora(q, rank=2, targets=("w2",))
    w2 = 2 * (2 * 192 + 64 * 2)
    assert trainable_parameter_count(q) == (w2, cfg.num_params() + w2)
    # a tied head is counted once
    tied = apply_lora(tiny(tie_embeddings=True), rank=1, targets=("wq",))
    wq = 2 * (64 + 64)
    assert trainable_parameter_count(tied) == (wq, llama.ModelConfig(**CFG, tie_embeddings=True).num_params() + wq)


def test_targets_by_suffix_full_name_and_filter():
    model = apply_lora(tiny(), targets=("attention.wq", "layers.1.feed_forward.w2"))
    assert list(lora_layers(model)) == ["layers.0.attention.wq", "layers.1.attention.wq", "layers.1.feed_forward.w2"]
    model = apply_lora(tiny(), targets=lambda module, fqn: fqn.endswith("w3") and module.in_features == 64)
    assert list(lora_layers(model)) == ["layers.0.feed_forward.w3", "layers.1.feed_forward.w3"]
    assert model.lora_config.targets == ("layers.0.feed_forward.w3", "layers.1.feed_forward.w3")


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"targets: 'wqq' matches no linear layer.*wq, wk, wv, wo, w1, w2, w3, output"):
        apply_lora(tiny(), targets=("wq", "wqq"))
    with pytest.raises(ValueError, match="'attention_norm' names a module of type RMSNorm, not a linear layer"):
        apply_lora(tiny(), targets=("attention_norm",))
    with pytest.raises(ValueError, match="filter accepted none"):
        apply_lora(tiny(), targets=lambda module, fqn: False)
    with pytest.raises(TypeError, match="targets"):
        apply_lora(tiny(), targets=("wq", 3))
    with pytest.raises(ValueError, match="targets: expected at least one"):
        apply_lora(tiny(), targets=())
    with pytest.raises(ValueError, match="trainable: 'nope' names no parameter"):
        apply_lora(tiny(), trainable=("nope",))
    with pytest.raises(ValueError, match="base stays frozen"):
        apply_lora(tiny(), trainable=("wq",))
    model = tiny()
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=-1)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_tied_head_and_second_application_are_refused():
    with pytest.raises(ValueError, match="output's weight is tied"):
        apply_lora(tiny(tie_embeddings=True), targets=("output",))
    model = apply_lora(tiny())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model)


def test_joined_projections_do_not_bypass_adapters():
    """Decode-time joining (join_projections, project) must run every adapter."""
    plain = randomize_adapters(apply_lora(tiny(), targets=("wk", "w1")))
    joined_first = tiny().join_projections()  # joined, then wrapped: the joined record goes stale
    apply_lora(joined_first, targets=("wk", "w1"))
    joined_first.load_state_dict(plain.state_dict())
    joined_after = apply_lora(tiny(), targets=("wk", "w1"))
    joined_after.load_state_dict(plain.state_dict())
    joined_after.join_projections()  # LoRA layers are not joinable: nothing of theirs is joined
    assert "_joined" not in joined_after.layers[0].attention.wq.__dict__
    with torch.no_grad():
        ref = plain(INPUTS)
        assert not torch.equal(ref, tiny()(INPUTS))
        torch.testing.assert_close(joined_first(INPUTS), ref, rtol=0, atol=0)
        torch.testing.assert_close(joined_after(INPUTS), ref, rtol=0, atol=0)
        # one decode step (the fused CPU projection path)
        cache = llama.KVCache.allocate(plain.config, 2, 16)
        cache2 = llama.KVCache.allocate(plain.config, 2, 16)
        plain(INPUTS[:, :4], cache=cache)
        joined_first(INPUTS[:, :4], cache=cache2)
        torch.testing.assert_close(joined_first(INPUTS[:, 4:5], cache=cache2), plain(INPUTS[:, 4:5], cache=cache),
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------- merging
def test_merge_and_unmerge():
    model = randomize_adapters(apply_lora(tiny()))
    wq = model.layers[0].attention.wq
    base_weight = wq.base.weight.detach().clone()
    with torch.no_grad():
        ref = model(INPUTS)
        merge_lora(model)
        assert wq.merged
        torch.testing.assert_close(wq.base.weight, base_weight + wq.delta_weight())
        torch.testing.assert_close(model(INPUTS), ref, rtol=1e-5, atol=1e-5)  # the delta is not added twice
        merge_lora(model)  # idempotent
        torch.testing.assert_close(model(INPUTS), ref, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        assert not wq.merged
        torch.testing.assert_close(wq.base.weight, base_weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(INPUTS), ref, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)  # idempotent
        torch.testing.assert_close(wq.base.weight, base_weight, rtol=0, atol=1e-6)


def test_unmerge_uses_the_adapters_it_merged():
    layer = LoRALinear(nn.Linear(16, 8), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    w = layer.base.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lora_B.add_(1.0)  # changed while merged
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w, rtol=0, atol=1e-6)


def test_remove_lora_merged_saves_as_a_plain_checkpoint(tmp_path):
    model = randomize_adapters(apply_lora(tiny(), trainable=("norm",)))
    with torch.no_grad():
        ref = model(INPUTS)
    with pytest.raises(ValueError, match="merge them into the base first.*save only the adapters"):
        check_no_lora(model)
    remove_lora(model, merge=True)
    assert not lora_layers(model) and isinstance(model.layers[0].attention.wq, Linear)
    check_no_lora(model)
    assert sorted(model.state_dict()) == sorted(tiny().state_dict())
    ck.save(model, tmp_path / "merged")
    loaded = ck.load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUTS), ref, rtol=1e-5, atol=1e-5)


def test_remove_lora_without_merge_restores_the_base():
    model = tiny()
    with torch.no_grad():
        ref = model(INPUTS)
    randomize_adapters(apply_lora(model))
    merge_lora(model)
    remove_lora(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUTS), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- QLoRA
@pytest.mark.parametrize("config", [Int4Config(64), NF4Config(64)], ids=["int4", "nf4"])
def test_qlora_trains_adapters_through_int4_matmul(config):
    model = quantize_(tiny(), config, filter_fn=lambda module, fqn: fqn != "output")
    apply_lora(model, rank=4, alpha=8, targets=("wq", "wv", "w2"))
    wq = model.layers[0].attention.wq
    assert isinstance(wq.base, QuantLinear) and not list(wq.base.parameters())
    before = snapshot(model)
    # gradients reach every A and B (A's once B is non-zero) through the 4-bit layers' backward
    randomize_adapters(model)
    model(INPUTS, TARGETS).backward()
    for name, layer in lora_layers(model).items():
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0, name
    model.zero_grad()
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(before[next(n for n, q in model.named_parameters() if q is p)])
    losses = train(model)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.lora_{x}" for name in lora_layers(model) for x in "AB"}
    assert any(k.endswith(".base.packed") for k in before)  # the 4-bit tensors are among those unchanged


def test_qlora_layer_matches_the_dequantized_reference():
    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(128, 48, bias=False), NF4Config(64))
    layer = LoRALinear(base, rank=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 7, 128, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ (base.dequantize() + b @ a).T).backward(grad_y)
    torch.testing.assert_close(y, x_ref @ (base.dequantize() + b.detach() @ a.detach()).T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_merging_into_a_4bit_base_needs_dequantize(monkeypatch):
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")  # compared with the dense merge at 1e-4
    model = randomize_adapters(apply_lora(quantize_(tiny(), Int4Config(64)), targets=("wq",)))
    wq = model.layers[0].attention.wq
    quantized = wq.base
    packed = quantized.packed.clone()
    with pytest.raises(ValueError, match="4-bit.*dequantize=True"):
        merge_lora(model)
    with pytest.raises(ValueError, match="dequantize=True"):
        wq.merge()
    assert not any(layer.merged for layer in lora_layers(model).values())
    with torch.no_grad():
        ref = model(INPUTS)
        merge_lora(model, dequantize=True)
        assert isinstance(wq.base, Linear) and wq.merged
        torch.testing.assert_close(model(INPUTS), ref, rtol=1e-4, atol=1e-4)
        unmerge_lora(model)
    assert wq.base is quantized and torch.equal(wq.base.packed, packed)


# ----------------------------------------------------------------------------- adapters on disk
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model with trained adapters (and final norm), and the directory they were saved to."""
    model = apply_lora(tiny(), rank=4, alpha=8, trainable=("norm",))
    train(model, steps=3)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapters(model, path)
    return model, path


@pytest.fixture
def adapter_dir(trained, tmp_path):
    """A copy of the saved adapters that a test may spoil."""
    shutil.copytree(trained[1], tmp_path / "adapter")
    return tmp_path / "adapter"


def test_save_and_load_adapters_round_trip(trained, tmp_path):
    model, path = trained
    assert sorted(p.name for p in path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    assert meta == {"format": "llama-kernels-lora", "version": 1, "rank": 4, "alpha": 8, "dropout": 0.0,
                    "dtype": "float32", "targets": ["wq", "wk", "wv", "wo"], "trainable": ["norm"],
                    "layers": list(lora_layers(model))}
    tensors = load_file(path / ADAPTER_WEIGHTS)
    assert sorted(tensors) == sorted([f"{n}.lora_{x}" for n in lora_layers(model) for x in "AB"] + ["norm.weight"])
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert (path / ADAPTER_WEIGHTS).stat().st_size < adapter_bytes + 4096  # no base weight in there
    assert adapter_bytes < llama.ModelConfig(**CFG).num_params() * 4 / 10

    fresh = tiny()  # the same base (seeded init)
    load_adapters(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(INPUTS), model(INPUTS))
    assert trainable_parameter_count(fresh) == trainable_parameter_count(model)
    save_adapters(fresh, tmp_path / "again")
    assert json.loads((tmp_path / "again" / ADAPTER_CONFIG).read_text()) == meta

    # into a model that already carries the same adapters: only the tensors are copied
    other = apply_lora(tiny(), rank=4, alpha=8, trainable=("norm",))
    load_adapters(other, path)
    with torch.no_grad():
        assert torch.equal(other(INPUTS), model(INPUTS))
    with pytest.raises(ValueError, match="rank: 4 differs"):
        load_adapters(apply_lora(tiny(), rank=2, alpha=8), path)
    with pytest.raises(ValueError, match="trainable: .* differs"):
        load_adapters(apply_lora(tiny(), rank=4, alpha=8), path)
    merged = merge_lora(apply_lora(tiny(), rank=4, alpha=8, trainable=("norm",)))
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapters(merged, path)


def test_qlora_adapters_round_trip(tmp_path):
    model = apply_lora(quantize_(tiny(), Int4Config(64)), rank=2, targets=("wq", "w2"))
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a")
    assert not any("packed" in n for n in load_file(tmp_path / "a" / ADAPTER_WEIGHTS))
    fresh = load_adapters(quantize_(tiny(), Int4Config(64)), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(INPUTS), model(INPUTS))


def test_save_adapters_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(tiny(), tmp_path / "a")


@pytest.mark.parametrize("field, value", [
    ("rank", "4"), ("rank", 0), ("rank", True), ("rank", 4.0),
    ("alpha", "8"), ("alpha", -1), ("alpha", None),
    ("dropout", 1.5), ("dropout", "0"),
    ("dtype", "int8"), ("dtype", 32),
    ("targets", "wq"), ("targets", {"wq": 1}), ("targets", [1]), ("targets", []),
    ("trainable", [None]), ("trainable", ["nope"]),
    ("layers", ["layers.0.attention.nope"]), ("layers", "layers.0.attention.wq"), ("layers", [{"a": 1}]),
    ("layers", ["layers.0.attention"]), ("layers", []),
    ("format", "llama-kernels"), ("version", 2), ("version", "1"),
    ("rank", "missing"),
])
def test_hostile_adapter_config_is_refused(adapter_dir, field, value):
    path = adapter_dir
    config_path = path / ADAPTER_CONFIG
    meta = json.loads(config_path.read_text())
    if value == "missing":
        del meta[field]
    else:
        meta[field] = value
    config_path.write_text(json.dumps(meta))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_adapters(model, path)
    message = str(err.value)
    assert str(config_path) in message and field in message, message
    assert not lora_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_non_finite_alpha_and_bad_json_are_refused(adapter_dir):
    path = adapter_dir
    config_path = path / ADAPTER_CONFIG
    text = config_path.read_text()
    config_path.write_text(text.replace('"alpha": 8', '"alpha": NaN'))
    with pytest.raises(ValueError, match=r"adapter_config.json: alpha"):
        load_adapters(tiny(), path)
    config_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json: expected a JSON object"):
        load_adapters(tiny(), path)
    config_path.write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapters(tiny(), path)


@pytest.mark.parametrize("change, match", [
    ("missing", r"missing tensors \['layers.1.attention.wo.lora_B'\]"),
    ("unexpected", r"unexpected tensors \['layers.0.attention.wq.base.weight'\]"),
    ("shape", r"tensor layers.0.attention.wq.lora_A: expected shape \(4, 64\), got \(4, 32\)"),
    ("dtype", r"tensor norm.weight: expected a floating-point dtype, got I32"),
    ("corrupt", "corrupt or truncated"),
])
def test_bad_adapter_tensors_are_refused(adapter_dir, change, match):
    path = adapter_dir
    weights = path / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    if change == "missing":
        del tensors["layers.1.attention.wo.lora_B"]
    elif change == "unexpected":
        tensors["layers.0.attention.wq.base.weight"] = torch.zeros(64, 64)
    elif change == "shape":
        tensors["layers.0.attention.wq.lora_A"] = tensors["layers.0.attention.wq.lora_A"][:, :32].contiguous()
    elif change == "dtype":
        tensors["norm.weight"] = tensors["norm.weight"].int()
    if change == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        save_file(tensors, str(weights))
    model = tiny()
    with pytest.raises(ValueError, match=match) as err:
        load_adapters(model, path)
    assert str(weights) in str(err.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_adapter_files_are_never_unpickled(adapter_dir):
    path = adapter_dir
    torch.save({"x": torch.zeros(1)}, path / ADAPTER_WEIGHTS)  # a pickle where safetensors belongs
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapters(tiny(), path)


def test_qlora_merged_and_dequantized_saves_as_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")  # compared with the dense merge at 1e-4
    model = randomize_adapters(apply_lora(quantize_(tiny(), Int4Config(64)), targets=("wq",)))
    with torch.no_grad():
        ref = model(INPUTS)
    remove_lora(model, merge=True, dequantize=True)
    assert isinstance(model.layers[0].attention.wq, Linear)
    assert isinstance(model.layers[0].attention.wk, QuantLinear)
    ck.save(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(ck.load_model(tmp_path / "m")(INPUTS), ref, rtol=1e-4, atol=1e-4)
