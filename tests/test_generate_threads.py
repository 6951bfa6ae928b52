"""generate() on one model from several threads: each call gets the tokens it would get alone.

The model keeps its decoders (KV cache, captured CUDA graph) for reuse across calls; calls that
ran at once on one model used to share a cache and return wrong tokens without an error.
"""
import sys
import threading

import torch

import llama
from llama.generate import Sampling, generate

GREEDY = Sampling(temperature=0)
PROMPTS = [[1, 5, 9, 13], [1, 200, 100, 50, 25, 12, 6], [1, 400], [1, 77, 78, 79, 80, 81, 82, 83, 84]]
NEW_TOKENS = 40
ROUNDS = 12


def context_sensitive_model():
    """stories260K with weights of unit-variance outputs: the default init's small weights make a
    random model repeat its last token whatever came before, which would hide a corrupted cache."""
    torch.manual_seed(0)
    model = llama.build(llama.ModelConfig.preset("stories260K"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def test_concurrent_generate_on_one_model_matches_single_threaded():
    model = context_sensitive_model()
    expected = [generate(model, [p], NEW_TOKENS, GREEDY) for p in PROMPTS]
    assert len({str(e) for e in expected}) == len(PROMPTS)  # different prompts, different outputs

    got: list[list] = [[] for _ in PROMPTS]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(ROUNDS):
            try:
                got[i].append(generate(model, [PROMPTS[i]], NEW_TOKENS, GREEDY))
            except Exception as e:  # reported below; the thread goes on
                errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the shared state is hit mid-generation
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)

    wrong = [sum(r != expected[i] for r in runs) for i, runs in enumerate(got)]
    assert not errors and wrong == [0] * len(PROMPTS) and all(len(r) == ROUNDS for r in got), (
        f"runs per prompt that differ from the single-threaded tokens: {wrong}; errors: {errors[:3]}")


def test_generate_from_on_token_on_the_same_model_does_not_deadlock():
    # A callback may itself generate on the same model (the per-model lock is reentrant), and the
    # nested call must not disturb the outer one's cache.
    model = context_sensitive_model()
    outer_alone = generate(model, [PROMPTS[0]], 8, GREEDY)
    inner_alone = generate(model, [PROMPTS[1]], 8, GREEDY)
    inner: list = []

    def on_token(_i: int, _tok: int) -> None:
        inner.append(generate(model, [PROMPTS[1]], 8, GREEDY))

    assert generate(model, [PROMPTS[0]], 8, GREEDY, on_token=on_token) == outer_alone
    assert inner == [inner_alone] * 8
