"""The CPU decode plan (llama_kernels.cpu.decode_plan, llama.generate.plan): a whole decode step in
one C++ call gives what the eager step gives, bit for bit (the same kernels in the same order),
falls back where it cannot run a model, and refuses bad input by name."""
import copy

import pytest
import torch

import llama.generate as gen
from llama import KVCache, ModelConfig, build
from llama.generate import Decoder, Sampling, generate
from llama.generate import plan as plan_mod
from llama.lora import apply_lora
from llama.quantize import Int4Config, NF4Config, quantize_
from llama_kernels.cpu.decode_plan import DecodePlan, LayerWeights

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=64, multiple_of=16)


def model_of(seed=0, quant=None, **kw):
    torch.manual_seed(seed)
    model = build(ModelConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if quant is not None:
        quantize_(model, quant)
    return model


@pytest.fixture
def eager_only(monkeypatch):
    """A context in which decoders run the eager step."""
    def use(flag: bool):
        monkeypatch.setattr(gen, "CPU_DECODE_PLAN", flag)
    return use


def steps(model, prompts, tokens_per_step, use_plan, eager_only):
    """Prefill of right-padded `prompts`, then one step per entry of tokens_per_step: the logits of
    each step, and the caches and positions at the end."""
    eager_only(use_plan)
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    decoder = Decoder(model, batch, 32)
    out = []
    with torch.inference_mode():
        decoder.prefill(padded, lengths)
        assert (decoder._plan is not None) == use_plan
        for toks in tokens_per_step:
            out.append(decoder.step(torch.tensor(toks)))
    return out, [t.clone() for t in decoder.cache.k + decoder.cache.v], decoder.cache.seqlens.clone()


CASES = {
    "fp32": dict(),
    "gqa-tied": dict(n_kv_heads=2, tie_embeddings=True),
    "int4-g32": dict(quant=Int4Config(group_size=32)),
    "int4-g64-gqa": dict(quant=Int4Config(group_size=64), n_kv_heads=1),
    "nf4": dict(quant=NF4Config(32, double_quant=False)),
    "ragged-ffn": dict(hidden_dim=80, dim=96, n_heads=3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cache", [torch.float16, None, torch.bfloat16], ids=["fp16-cache", "fp32-cache", "bf16-cache"])
def test_plan_steps_equal_the_eager_steps(case, batch, cache, eager_only, monkeypatch):
    """The generation default on the CPU (an fp16 cache), a cache in the model's fp32, and bf16."""
    monkeypatch.setattr(gen, "CPU_CACHE_DTYPE", cache)
    model = model_of(**CASES[case])
    prompts = [[1, 5, 9, 4], [2, 7], [3, 3, 8, 1, 6]][:batch]
    tokens = [[(5 * s + b) % 97 for b in range(batch)] for s in range(6)]
    plan_logits, plan_caches, plan_pos = steps(model, prompts, tokens, True, eager_only)
    eager_logits, eager_caches, eager_pos = steps(model, prompts, tokens, False, eager_only)
    assert plan_caches[0].dtype == (cache or torch.float32)
    assert plan_pos.tolist() == eager_pos.tolist() == [len(p) + 6 for p in prompts]
    for a, b in zip(plan_logits, eager_logits):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    for a, b in zip(plan_caches, eager_caches):
        assert torch.equal(a, b)
    # and the eager step is the model: a fresh forward over the whole sequence agrees
    seq = torch.tensor([prompts[0] + [t[0] for t in tokens]])
    with torch.inference_mode():
        whole = model(seq)[0, len(prompts[0]):]
    tol = 5e-2 if cache == torch.bfloat16 else 2e-2
    torch.testing.assert_close(torch.stack([lg[0] for lg in plan_logits]), whole[:6], atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["fp32", "int4-g32", "nf4"])
def test_generate_with_the_plan_gives_the_eager_tokens(case, eager_only):
    model = model_of(seed=1, **CASES[case])
    prompts = [[1, 5, 9, 4], [2, 7], [3, 3, 8, 1, 6]]
    runs = []
    for flag in (True, False):
        eager_only(flag)
        runs.append((generate(model, prompts, 20, Sampling(temperature=0)),
                     generate(model, prompts, 20, Sampling(temperature=0.9, top_p=0.9), seed=4)))
    assert runs[0] == runs[1]
    assert all(len(x) == 20 for x in runs[0][0])


def test_greedy_plan_step_is_the_argmax_of_its_logits(eager_only):
    """The fused head (dense: linear_argmax; 4-bit: logits then argmax) picks the logits' argmax."""
    for quant in (None, Int4Config(group_size=32)):
        model = model_of(quant=quant)
        eager_only(True)
        a, b = Decoder(model, 2, 32), Decoder(model, 2, 32)
        with torch.inference_mode():
            for d in (a, b):
                d.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([3, 3]))
            assert a.greedy_fusable() and a._plan is not None
            chosen = a.greedy_step(torch.tensor([7, 8]))
            logits = b.step(torch.tensor([7, 8]))
        assert chosen.tolist() == logits.argmax(-1).tolist()


def test_plan_follows_replaced_weights(eager_only):
    """A decoder kept on the model rebuilds its plan when the weights moved (quantize_ after a
    first generation), so the next generation uses the new weights."""
    model = model_of()
    eager_only(True)
    generate(model, [[1, 2, 3]], 4, Sampling(temperature=0))
    quantize_(model, Int4Config(group_size=32))
    planned = generate(model, [[1, 2, 3]], 12, Sampling(temperature=0))
    eager_only(False)
    assert planned == generate(model, [[1, 2, 3]], 12, Sampling(temperature=0))


@pytest.mark.parametrize("change,reason", [
    (lambda m: apply_lora(m, rank=2), "projection"),
    (lambda m: m.to(torch.bfloat16), "float32"),
    (lambda m: m.layers[0].attention.wq.register_forward_hook(lambda *a: None), "hooks"),
])
def test_models_the_plan_does_not_run_fall_back(change, reason, eager_only):
    model = model_of()
    change(model)
    cache = KVCache.allocate(model.config, 1, 16, dtype=model.tok_embeddings.weight.dtype)
    why = plan_mod.unsupported(model, cache)
    assert why is not None and reason in why
    assert plan_mod.build(model, cache) is None
    eager_only(True)
    assert len(generate(model, [[1, 2, 3]], 5, Sampling(temperature=0))[0]) == 5


def test_other_configs_fall_back():
    for kw, reason in ((dict(norm="layer"), "RMSNorm"), (dict(mlp="gelu"), "SwiGLU")):
        model = model_of(**kw)
        assert reason in plan_mod.unsupported(model, KVCache.allocate(model.config, 1, 16))
    model = model_of()
    assert "batch" in plan_mod.unsupported(model, KVCache.allocate(model.config, 17, 16))
    assert "training" in plan_mod.unsupported(model.train(), KVCache.allocate(model.config, 1, 16))


def plan_for(model, batch=2, capacity=8):
    cache = KVCache.allocate(model.config, batch, capacity)
    return plan_mod.build(model, cache), cache


def test_plan_step_refuses_bad_tokens_and_positions():
    model = model_of()
    plan, cache = plan_for(model)
    out = torch.empty(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens\[1\]: expected an id in \[0, 97\)"):
        plan.step(torch.tensor([3, 97]), argmax=out)
    with pytest.raises(ValueError, match=r"tokens\[0\]"):
        plan.step(torch.tensor([-1, 3]), argmax=out)
    with pytest.raises(ValueError, match="tokens: expected a contiguous int64"):
        plan.step(torch.tensor([3, 4], dtype=torch.int32), argmax=out)
    with pytest.raises(ValueError, match="logits, argmax"):
        plan.step(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="logits: expected shape"):
        plan.step(torch.tensor([3, 4]), logits=torch.empty(2, 96))
    assert cache.seqlens.tolist() == [0, 0]  # nothing ran
    cache.seqlens[1] = 8  # the cache is full
    with pytest.raises(ValueError, match="cache: sequence 1 is at position 8"):
        plan.step(torch.tensor([3, 4]), argmax=out)
    assert cache.seqlens.tolist() == [0, 8]
    cache.seqlens[1] = 7
    plan.step(torch.tensor([3, 4]), argmax=out)
    assert cache.seqlens.tolist() == [1, 8] and 0 <= out.min() and out.max() < 97


def test_plan_refuses_bad_weights_by_name():
    model = model_of()
    _, cache = plan_for(model)
    def w(layer):
        return layer.weight.detach()

    layers = [LayerWeights(w(b.attention_norm), w(b.ffn_norm),
                           [w(b.attention.wq), w(b.attention.wk), w(b.attention.wv)], [w(b.attention.wo)],
                           [w(b.feed_forward.w1), w(b.feed_forward.w3)], [w(b.feed_forward.w2)])
              for b in model.layers]
    base = dict(embedding=model.tok_embeddings.weight.detach(), final_norm=model.norm.weight.detach(),
                head=model.output.weight.detach(), layers=layers, cos=model.rope_cos, sin=model.rope_sin,
                k_caches=cache.k, v_caches=cache.v, seqlens=cache.seqlens, heads=4, eps=1e-5)
    DecodePlan(**base)  # as given, it builds
    bad = copy.copy(layers[1])
    bad.down = [layers[1].down[0][:, :32]]
    with pytest.raises(ValueError, match=r"layers\[1\].down\[0\]: expected a contiguous float32"):
        DecodePlan(**{**base, "layers": [layers[0], bad]})
    bad.down = [layers[1].down[0][:, :32].contiguous()]
    with pytest.raises(ValueError, match=r"layers\[1\].down\[0\]: expected \(out_features, 176\)"):
        DecodePlan(**{**base, "layers": [layers[0], bad]})
    bad.down = layers[1].down
    bad.qkv = layers[1].qkv[:2]
    with pytest.raises(ValueError, match=r"layers\[1\].qkv: expected Q, K, V"):
        DecodePlan(**{**base, "layers": [layers[0], bad]})
    with pytest.raises(ValueError, match="head: expected"):
        DecodePlan(**{**base, "head": model.output.weight.detach()[:50]})
    with pytest.raises(ValueError, match="embedding: expected a contiguous float32"):
        DecodePlan(**{**base, "embedding": model.tok_embeddings.weight.detach().half()})
    with pytest.raises(ValueError, match="seqlens: expected a contiguous int64"):
        DecodePlan(**{**base, "seqlens": cache.seqlens.int()})
    with pytest.raises(ValueError, match=r"v_caches\[1\]: expected a contiguous torch.float32 CPU tensor of shape"):
        DecodePlan(**{**base, "v_caches": [cache.v[0], cache.v[1][:, :4].contiguous()]})
    with pytest.raises(ValueError, match=r"k_caches\[0\]: .* non-contiguous"):
        DecodePlan(**{**base, "k_caches": [cache.k[0].transpose(2, 3), cache.k[1]]})
    with pytest.raises(ValueError, match=r"v_caches\[0\]: expected a contiguous torch.float32"):
        DecodePlan(**{**base, "v_caches": [cache.v[0].half(), cache.v[1]]})
    with pytest.raises(ValueError, match=r"k_caches\[0\]: expected one of"):
        DecodePlan(**{**base, "k_caches": [k.double() for k in cache.k]})
    with pytest.raises(ValueError, match="heads: expected a positive multiple"):
        DecodePlan(**{**base, "heads": 0})
    with pytest.raises(ValueError, match="cos: expected a float32 CPU table"):
        DecodePlan(**{**base, "cos": model.rope_cos.double()})
    mixed = copy.copy(layers[0])
    mixed.gate_up = [layers[0].gate_up[0], Int4Config(32).quantize(layers[0].gate_up[1])]
    with pytest.raises(ValueError, match=r"layers\[0\].gate_up: expected dense tensors or QuantizedWeights"):
        DecodePlan(**{**base, "layers": [mixed, layers[1]]})


def test_plan_runs_on_the_threads_torch_uses(eager_only):
    """One thread or two: the same tokens (the kernels split rows, never a sum)."""
    model = model_of(quant=Int4Config(group_size=32))
    eager_only(True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate(model, [[1, 2, 3]], 10, Sampling(temperature=0))
        torch.set_num_threads(2)
        two = generate(model, [[1, 2, 3]], 10, Sampling(temperature=0))
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_plan_times_its_ops_when_asked():
    model = model_of(quant=Int4Config(group_size=32))
    plan, cache = plan_for(model, batch=1, capacity=16)
    out = torch.empty(1, dtype=torch.long)
    plan.step(torch.tensor([3]), argmax=out)
    assert all(v == 0 for v in plan.op_times().values())  # off by default
    plan.time_ops(True)
    for t in range(4):
        plan.step(torch.tensor([t]), argmax=out)
    times = plan.op_times()
    assert list(times) == ["embedding", "rms_norm", "qkv", "attention", "wo", "gate_up", "swiglu", "down", "head"]
    assert all(v >= 0 for v in times.values()) and times["qkv"] > 0 and times["head"] > 0
    plan.time_ops(False)
    assert all(v == 0 for v in plan.op_times().values())


@pytest.mark.parametrize("quant", [None, Int4Config(group_size=32)], ids=["dense", "int4"])
def test_plan_writes_every_output_it_is_given(quant):
    """The plan's outputs poisoned first: logits and tokens both written (the head then the argmax),
    or the tokens alone (a dense head: linear_argmax), equal to the eager model's one-token step."""
    model = model_of(quant=quant)
    tokens = torch.tensor([3, 4])
    with torch.inference_mode():
        eager = model(tokens[:, None], cache=KVCache.allocate(model.config, 2, 8), last_only=True)
    plan, _ = plan_for(model)
    logits, chosen = torch.full((2, 97), float("nan")), torch.full((2,), -1)
    plan.step(tokens, logits=logits, argmax=chosen)
    assert torch.equal(logits, eager) and chosen.tolist() == eager.argmax(-1).tolist()
    plan, _ = plan_for(model)
    alone = torch.full((2,), -1)
    plan.step(tokens, argmax=alone)
    assert alone.tolist() == chosen.tolist()
