"""The model and its config: presets, overrides, KV-cache decoding, RoPE scaling, training step."""
from pathlib import Path

import pytest
import torch

from llama import KVCache, ModelConfig, PRESETS, build
from llama.config import parse_overrides
from llama.generate import Sampling, generate

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=64, multiple_of=16)


def tiny(**kw):
    return ModelConfig(**{**TINY, **kw})


def randomized(cfg, seed=0):
    """A model whose norms are not all ones, so a wrong norm weight shows up in the logits."""
    torch.manual_seed(seed)
    model = build(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "name,params",
    [("stories15M", 15_191_712), ("stories42M", 41_689_600), ("sheared-1.3b", 1_345_423_360),
     ("llama2-7b", 6_738_415_616)],
)
def test_preset_parameter_counts(name, params):
    cfg = ModelConfig.preset(name)
    assert cfg.num_params() == params
    model = build(cfg, init=False)  # meta device: no memory
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_configs_match_presets(name):
    assert ModelConfig.from_yaml(ROOT / "configs" / f"{name}.yaml") == ModelConfig.preset(name)


def test_stories_hidden_dims_follow_llama2c():
    assert ModelConfig.preset("stories15M").hidden_dim == 768
    assert ModelConfig.preset("stories42M").hidden_dim == 1376
    assert ModelConfig.preset("stories110M").hidden_dim == 2048
    assert ModelConfig.preset("stories260K").hidden_dim == 172


def test_overrides_are_typed_and_rederive_hidden_dim(tmp_path):
    cfg = ModelConfig.from_spec("stories15M", ["dim=576", "rope_scaling=linear", "rope_scaling_factor=2", "tie_embeddings=false"])
    assert cfg.dim == 576 and cfg.hidden_dim == 1536 and cfg.rope_scaling == "linear"
    assert cfg.rope_scaling_factor == 2.0 and cfg.tie_embeddings is False
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  preset: stories42M\n  n_kv_heads: 2\n")
    assert ModelConfig.from_spec(run, ["max_seq_len=2048"]).n_kv_heads == 2
    assert ModelConfig.from_spec(run, ["max_seq_len=2048"]).max_seq_len == 2048
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=65), "n_heads: 4 does not divide dim 65"),
        (dict(n_kv_heads=3), "n_kv_heads: 3 does not divide n_heads 4"),
        (dict(norm="batch"), "norm: expected one of rms, layer"),
        (dict(rope_scaling="yarn"), "rope_scaling: expected one of"),
        (dict(dropout=1.0), "dropout: expected a probability"),
        (dict(n_layers=0), "n_layers: expected a positive integer"),
        (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
    ],
)
def test_bad_configs_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_overrides_and_specs():
    with pytest.raises(ValueError, match="override: unknown field 'width'"):
        parse_overrides(["width=3"])
    with pytest.raises(ValueError, match="override: expected key=value"):
        parse_overrides(["dim"])
    with pytest.raises(FileNotFoundError, match="no preset named 'stories9M'"):
        ModelConfig.from_spec("stories9M")
    with pytest.raises(ValueError, match="config: unknown field"):
        ModelConfig.from_dict({"dim": 8, "depth": 2})


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("norm,mlp", [("rms", "swiglu"), ("layer", "gelu")])
def test_kv_cache_decode_equals_full_recompute(n_kv_heads, norm, mlp):
    cfg = tiny(n_kv_heads=n_kv_heads, norm=norm, mlp=mlp)
    model = randomized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 21))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(cfg, 3, 32)
        steps = [model(tokens[:, :9], cache=cache)]
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(9, 21)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)
    assert cache.seqlens.tolist() == [21, 21, 21]


def test_padded_batch_prefill_matches_single_sequences():
    cfg = tiny(n_kv_heads=2)
    model = randomized(cfg)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in (5, 11, 8)]
    padded = torch.zeros(3, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    lengths = torch.tensor([5, 11, 8])
    nxt = torch.randint(0, cfg.vocab_size, (3, 1))
    with torch.no_grad():
        cache = KVCache.allocate(cfg, 3, 16)
        last = model(padded, cache=cache, lengths=lengths, last_only=True)
        step = model(nxt, cache=cache, last_only=True)
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[i]])[None])
            torch.testing.assert_close(last[i], alone[0, -2], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(step[i], alone[0, -1], atol=2e-5, rtol=1e-4)
    assert cache.seqlens.tolist() == [6, 12, 9]


def test_greedy_generation_is_deterministic_and_matches_argmax():
    cfg = tiny()
    model = randomized(cfg)
    prompts = [[1, 5, 9], [1, 7]]
    a = generate(model, prompts, 12, Sampling(temperature=0))
    b = generate(model, prompts, 12, Sampling(temperature=0))
    assert a == b and [len(x) for x in a] == [12, 12]
    seq = torch.tensor([prompts[0]])  # recompute the first continuation without a cache
    with torch.no_grad():
        for tok in a[0]:
            assert model(seq)[0, -1].argmax().item() == tok
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)


def test_sampling_is_reproducible_with_a_seed_and_stops_at_eos():
    cfg = tiny()
    model = randomized(cfg)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, epsilon=1e-3)
    a = generate(model, [[1, 2, 3]] * 4, 30, s, seed=7)
    assert a == generate(model, [[1, 2, 3]] * 4, 30, s, seed=7)
    assert len({tuple(x) for x in a}) > 1  # the four samples differ
    eos = a[0][3]
    stopped = generate(model, [[1, 2, 3]] * 4, 30, s, seed=7, eos_id=eos)
    assert stopped[0] == a[0][: a[0].index(eos) + 1]


def test_top_k_one_is_greedy():
    model = randomized(tiny())
    assert generate(model, [[3, 4]], 10, Sampling(temperature=1.0, top_k=1), seed=1) == \
        generate(model, [[3, 4]], 10, Sampling(temperature=0))


def test_generate_rejects_bad_input():
    model = randomized(tiny())
    with pytest.raises(ValueError, match="prompts: expected one or more non-empty"):
        generate(model, [[]], 5)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must lie in \[0, 97\)"):
        generate(model, [[1, 97]], 5)
    with pytest.raises(ValueError, match="max_new_tokens: prompt plus 100 new tokens is 102 positions"):
        generate(model, [[1, 2]], 100)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="cuda_graph: needs a model on a CUDA device"):
        generate(model, [[1, 2]], 3, cuda_graph=True)


@pytest.mark.parametrize("scaling", ["linear", "dynamic"])
def test_rope_scaling_runs_past_the_trained_context(scaling):
    cfg = tiny(max_seq_len=16, rope_scaling=scaling, rope_scaling_factor=2.0)
    model = randomized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (1, 40, cfg.vocab_size) and torch.isfinite(logits).all()
    out = generate(model, [[1, 2, 3]], 30, Sampling(temperature=0))
    assert len(out[0]) == 30
    with pytest.raises(ValueError, match="exceed max_seq_len 16"):
        randomized(tiny(max_seq_len=16))(tokens)


def test_linear_scaling_stretches_positions():
    from llama.model import rope_tables

    cfg = tiny(max_seq_len=16, rope_scaling="linear", rope_scaling_factor=4.0)
    cos, _ = rope_tables(cfg, 32)
    plain, _ = rope_tables(tiny(max_seq_len=64), 32)
    torch.testing.assert_close(cos[8], plain[2])


def test_half_precision_cast_keeps_fp32_rope_tables():
    model = randomized(tiny()).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_meta_build_and_strict_load_weights():
    cfg = tiny(tie_embeddings=True)
    source = randomized(cfg)
    target = build(cfg, init=False)
    assert target.tok_embeddings.weight.is_meta
    sd = {k: v.clone() for k, v in source.state_dict().items() if k != "output.weight"}
    target.load_weights(sd).eval()
    assert target.output.weight is target.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(target(tokens), source(tokens))

    bad = dict(sd)
    del bad["layers.1.ffn_norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.ffn_norm.weight'\]"):
        build(cfg, init=False).load_weights(bad)
    bad = {**sd, "layers.0.attention.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['layers.0.attention.bias'\]"):
        build(cfg, init=False).load_weights(bad)
    bad = {**sd, "layers.0.attention.wk.weight": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight: expected shape \(64, 64\)"):
        build(cfg, init=False).load_weights(bad)


def test_forward_errors_name_the_argument():
    cfg = tiny()
    model = randomized(cfg)
    with pytest.raises(ValueError, match="tokens: expected shape"):
        model(torch.zeros(5, dtype=torch.long))
    cache = KVCache.allocate(cfg, 2, 8)
    with pytest.raises(ValueError, match="cache: holds 2 sequences but tokens has 1"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache: 10 positions needed but its capacity is 8"):
        model(torch.zeros(2, 10, dtype=torch.long), cache=cache)


def test_training_steps_lower_the_loss_and_return_hidden():
    cfg = tiny(dropout=0.1, attn_dropout=0.1)
    model = build(cfg).train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 16, (8, 33))  # a small alphabet: learnable
    losses = []
    for _ in range(30):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    hidden = model.eval()(data[:, :-1], return_hidden=True)
    assert hidden.shape == (8, 32, cfg.dim)


def test_residual_adds_run_inside_the_norms(monkeypatch):
    """Every residual add runs inside the norm after it (two per block, the last block's second in
    the final norm), and gradients are the same with gradient checkpointing."""
    import llama_kernels

    calls, real = [], llama_kernels.add_rms_norm
    monkeypatch.setattr(llama_kernels, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny(n_layers=3)
    model = randomized(cfg).train()
    data = torch.randint(0, cfg.vocab_size, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        loss = model(data[:, :-1], data[:, 1:])
        assert len(calls) == 2 * cfg.n_layers  # checkpointing runs the blocks again in backward
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_a_model_that_generated_still_copies_without_its_decoders():
    import copy

    model = randomized(tiny())
    generate(model, [[1, 2, 3]], 4, Sampling(temperature=0))
    assert "_decoders" in model.__dict__
    clone = copy.deepcopy(model)
    assert "_decoders" not in clone.__dict__
    assert generate(clone, [[1, 2, 3]], 4, Sampling(temperature=0)) == generate(model, [[1, 2, 3]], 4, Sampling(temperature=0))


# ----------------------------------------------------------------------------- joined projections
def test_joined_projections_share_memory_and_keep_the_logits(tmp_path):
    import llama
    from llama import checkpoint as ck

    cfg = tiny(n_kv_heads=2)
    model = randomized(cfg)
    data = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(data)
    names = sorted(model.state_dict())
    params_before = sum(p.numel() for p in model.parameters())
    model.join_projections()
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    base = attn.wq.weight.untyped_storage()
    assert attn.wk.weight.untyped_storage().data_ptr() == base.data_ptr()
    assert attn.wv.weight.untyped_storage().data_ptr() == base.data_ptr()
    assert base.nbytes() == 4 * cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim  # nothing extra
    assert ffn.w1.weight.untyped_storage().data_ptr() == ffn.w3.weight.untyped_storage().data_ptr()
    assert sorted(model.state_dict()) == names and sum(p.numel() for p in model.parameters()) == params_before
    with torch.no_grad():
        torch.testing.assert_close(model(data), before, atol=1e-5, rtol=1e-5)
    for fmt in ("native", "hf", "llama2c-pt"):  # shared storage must not reach the writers
        loaded = llama.load(ck.save(model, tmp_path / fmt, format=fmt)).model
        with torch.no_grad():
            torch.testing.assert_close(loaded(data), before, atol=1e-5, rtol=1e-5)


def test_joined_projections_follow_weight_changes():
    """In-place updates reach the joined weights; replaced weights unjoin the group; training
    (gradients enabled) takes the per-layer path so the layers' weights get their gradients."""
    cfg = tiny()
    model = randomized(cfg).join_projections()
    data = torch.randint(0, cfg.vocab_size, (2, 9))
    wq = model.layers[0].attention.wq
    with torch.no_grad():
        wq.weight.mul_(1.5)  # in place: the joined tensor sees it
        reference = randomized(cfg)
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(data), reference(data), atol=1e-5, rtol=1e-5)

    model.train()
    loss = model(data[:, :-1], data[:, 1:])
    loss.backward()
    assert wq.weight.grad is not None and wq.weight.grad.abs().sum() > 0
    model.eval()

    fresh = randomized(cfg, seed=3)
    model.load_weights({k: v.clone() for k, v in fresh.state_dict().items()})  # new tensors: unjoined
    with torch.no_grad():
        torch.testing.assert_close(model(data), fresh(data), atol=1e-5, rtol=1e-5)
    assert "_joined" not in model.layers[0].attention.wq.__dict__

    model.join_projections()
    with torch.no_grad():  # new memory under the same Parameter object: seen, unjoined
        model.layers[0].attention.wk.weight.data = model.layers[0].attention.wk.weight.data.clone().mul_(0.5)
        fresh.layers[0].attention.wk.weight.mul_(0.5)
        torch.testing.assert_close(model(data), fresh(data), atol=1e-5, rtol=1e-5)
    assert "_joined" not in model.layers[0].attention.wk.__dict__

    model.join_projections()
    model.to(torch.float16)  # new storage under the same parameters: unjoined
    assert not any("_joined" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(data), fresh.to(torch.float16)(data), atol=1e-3, rtol=1e-3)


def test_joined_model_generates_what_an_unjoined_one_does():
    """On the CPU generation leaves the weights alone (the multi-weight kernel call serves); a
    joined model decodes the same greedy tokens as a plain one recomputing every prefix."""
    cfg = tiny()
    model = randomized(cfg)
    plain = randomized(cfg)
    prompts = [[1, 2, 3], [4, 5]]
    generate(model, prompts, 2, Sampling(temperature=0))
    assert "_joined" not in model.layers[0].attention.wq.__dict__
    model.join_projections()
    out = generate(model, prompts, 8, Sampling(temperature=0))
    assert "_joined" in model.layers[0].attention.wq.__dict__
    with torch.no_grad():  # plain greedy decoding by full recompute, nothing joined
        for prompt, got in zip(prompts, out):
            seq = list(prompt)
            for _ in range(8):
                seq.append(int(plain(torch.tensor([seq]))[0, -1].argmax()))
            assert got == seq[len(prompt):]


def test_a_copy_of_a_joined_model_is_unjoined():
    """deepcopy does not keep views sharing memory, so a copy must not keep the joined weight."""
    import copy

    cfg = tiny()
    model = randomized(cfg).join_projections()
    twin = copy.deepcopy(model)
    assert "_joined" in model.layers[0].attention.wq.__dict__
    assert not any("_joined" in m.__dict__ for m in twin.modules())
    data = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        twin.layers[0].attention.wq.weight.mul_(2)
        twin.join_projections()
        changed = twin(data)
        model.layers[0].attention.wq.weight.mul_(2)
        torch.testing.assert_close(changed, model(data), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_step_takes_joined_projections():
    """The compiled one-token step (fullgraph) traces the joined path, dense and 4-bit, and
    decodes what the eager step decodes."""
    from llama.quantize import Int4Config, quantize_

    torch._dynamo.reset()
    model = randomized(tiny(dim=64, multiple_of=32))
    for weights in ("dense", "int4"):
        if weights == "int4":
            quantize_(model, Int4Config(group_size=32))
        model.join_projections()  # what generation does on a GPU
        eager = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), compile=False)
        compiled = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), compile=True)
        assert compiled == eager
        assert "_joined" in model.layers[0].attention.wq.__dict__


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cpu_prefill_into_an_empty_cache_is_the_forward_without_one(n_kv_heads):
    """On the CPU an fp32 prefill rotates q and k once and runs SDPA itself (the keys it rotated
    go to the cache too): the logits are those of the forward without a cache, bit for bit, and the
    cache holds the rotated keys."""
    cfg = tiny(n_kv_heads=n_kv_heads)
    model = randomized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        plain = model(tokens)
        cache = KVCache.allocate(cfg, 2, 16)
        cached = model(tokens, cache=cache)
    assert torch.equal(plain, cached)
    assert cache.seqlens.tolist() == [11, 11] and not cache.k[0][:, 11:].any()
    assert cache.k[0][:, :11].abs().sum() > 0
