"""One optimizer step of sentence-classification training, by fine-tuning method: time, peak memory
and trainable parameters.

Impls, each on the same seeded weights and the same batch, through the library's own path
(``llama.classify.prepare_model`` -> a ``ClassifierModel``: the last real token's final hidden
state, dropout, a linear head to 5 labels; cross-entropy on random labels; ``llama.optim.AdamW``
over the parameters that require grad):

* ``full``: full fine-tuning (method "finetune"): every parameter of the model and the head trains
  (an untied LM output layer, which the head does not use, stays frozen);
* ``lora``: LoRA adapters of rank 8 on wq, wk, wv and wo (``llama.lora.apply_lora``) over the
  frozen dense model: only the adapters and the head train;
* ``qlora``: the same adapters over a frozen NF4 4-bit base (``llama.quantize.quantize_``,
  double-quantized absmax per block of inputs: 32 on stories42M, whose FFN's w2 has 1376 inputs,
  a multiple of 32 but not of 64; 64 on Sheared-LLaMA-1.3B). A tied output head (stories42M's,
  the embedding) stays dense; Sheared-LLaMA-1.3B's untied head is 4-bit too.

The batch holds right-padded sentences of different lengths (``lengths``, the longest filling the
width), token ids drawn at random. CPU: the stories42M shape (dim 512, 8 layers, vocab 32000) at
batch 8 x 128 tokens in fp32 (quick: 2 x 64). GPU: Sheared-LLaMA-1.3B at 4 x 512 in bf16 autocast
over fp32 weights (quick: 1 x 256). tokens = batch x width per step (padding included).

Each call is one step: forward, loss, backward, ``opt.step()``, then ``opt.zero_grad(set_to_none=
True)``; one step runs in set-up, so the optimizer's state exists before the first timed call and
no gradient is held between calls. Peak memory is the runner's: bytes allocated during a step
beyond what was held before it, so the gradients, activations and temporaries of the step, not
the weights and optimizer state the method keeps between steps. Those are in the record's
``extra`` as ``resident_bytes`` (parameters, buffers and optimizer state), beside
``trainable_params`` (the number of elements that train).

Headline: QLoRA's peak memory over full fine-tuning's, per case (the report's headline table),
each the resident bytes plus the step's own peak: what the method needs to train at all.
Target on the GPU: QLoRA at most 0.45x full fine-tuning's peak memory.
"""
from __future__ import annotations

import contextlib

import torch

from bench.common import Bench, Calls, HeadlineRatio, Item, SuiteContext, suite

NUM_LABELS = 5
LORA_RANK = 8
LORA_TARGETS = ("wq", "wk", "wv", "wo")
# impl -> llama.classify's method name
METHODS = {"full": "finetune", "lora": "lora", "qlora": "qlora"}
# The learning rates llama.classify.train_classifier uses by default for each method.
LR = {"finetune": 2e-5, "lora": 2e-4, "qlora": 2e-4}
QLORA_TARGET = 0.45  # QLoRA's peak memory / full fine-tuning's, on the GPU


def _shape(ctx: SuiteContext) -> tuple[str, int, int, torch.dtype | None]:
    """(preset, batch, width in tokens, autocast dtype)."""
    if ctx.is_cuda:
        return "sheared-1.3b", (1 if ctx.quick else 4), (256 if ctx.quick else 512), torch.bfloat16
    return "stories42M", (2 if ctx.quick else 8), (64 if ctx.quick else 128), None


def _batch(vocab: int, batch: int, width: int, device: torch.device):
    """(tokens (B, S) right-padded with 0, lengths (B,), labels (B,)), seeded: the longest sentence
    fills the width, the others are between half of it and all of it."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, width // 2), width + 1, (batch,), generator=g)
    lengths[0] = width
    tokens = torch.randint(1, vocab, (batch, width), generator=g)
    tokens[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    return tokens.to(device), lengths.to(device), labels.to(device)


def _resident_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers and optimizer state (each storage counted once)."""
    tensors = [*net.parameters(), *net.buffers()]
    tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    seen: dict[tuple, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _setup(ctx: SuiteContext, impl: str):
    def setup():
        import torch.nn.functional as F

        from llama.classify import prepare_model
        from llama.config import ModelConfig
        from llama.model import build
        from llama.optim import AdamW

        preset, batch, width, dtype = _shape(ctx)
        method = METHODS[impl]
        torch.manual_seed(0)  # the same base weights for every impl; then the head's and adapters'
        cfg = ModelConfig.preset(preset).replace(max_seq_len=width)
        model = build(cfg, device=ctx.device)
        net = prepare_model(model, method, NUM_LABELS, lora_rank=LORA_RANK, lora_targets=LORA_TARGETS,
                            quant_block_size=64 if ctx.is_cuda else 32).train()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = AdamW(params, lr=LR[method])
        tokens, lengths, labels = _batch(cfg.vocab_size, batch, width, ctx.device)
        autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

        def step():
            with autocast():
                logits = net(tokens, lengths)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # no gradient held between steps: the peak counts them
            return loss

        step()  # the optimizer's state, allocated by its first step, is resident from here on
        if ctx.is_cuda:
            torch.cuda.synchronize()
        return Calls([step], trainable_params=sum(p.numel() for p in params),
                     resident_bytes=_resident_bytes(net, opt))

    return setup


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Every item: one case per device and size of run, every method of it."""
    return True


@suite("finetune", headline=headline,
       ratio=HeadlineRatio("peak_mem_bytes", "qlora", "full", target=QLORA_TARGET, target_device="cuda",
                           label="peak memory (resident + step)", plus="resident_bytes"))
def finetune(ctx: SuiteContext) -> list[Item]:
    preset, batch, width, dtype = _shape(ctx)
    case = {"model": preset, "batch": batch, "seq": width, "labels": NUM_LABELS}
    return [Bench(impl, case, "bf16" if dtype == torch.bfloat16 else "fp32", "step", _setup(ctx, impl),
                  tokens=batch * width) for impl in METHODS]
