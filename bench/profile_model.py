"""Where the model's time goes: a torch.profiler table for a prefill and for one decode step.

    python bench/profile_model.py --out DIR [--device cuda] [--preset sheared-1.3b] [--int4] [--hf]

Random weights in the preset's shape (bf16 on a GPU, fp32 on the CPU). Phases:

* `prefill`: one forward over a batch of prompts into an empty KV cache (what the `decode`
  suite's prefill times);
* `decode`: one-token steps of the eager step, which a CUDA graph then replays unchanged (the
  kernels, and so their count per step, are the same); on a GPU the projections are joined, as
  generation joins them;
* on the CPU, `decode-plan`: the decode plan's step (one C++ call, what generation runs there),
  timed op by op by the plan itself (greedy: the head's argmax), with each projection's weight
  bytes per second against the host's copy and read-only bandwidths measured in the same run;
* with `--hf`, `hf-prefill`: Hugging Face's model on the same shape, for the peer's kernel mix.

For each phase, DIR/profile_<phase>.txt holds the operators and kernels sorted by self time,
preceded by a summary (time per iteration, device kernels launched per iteration), and
DIR/profile_<phase>.json a Chrome trace (open it in Perfetto). The summaries also go to stdout
and to DIR/profile_summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP, ITERS = 3, 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(name: str, call, device: torch.device, out: Path, iters: int = ITERS) -> dict:
    """Run `call` WARMUP times, then profile `iters` calls; write the table and trace."""
    with torch.inference_mode():
        for _ in range(WARMUP):
            call()
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(iters):
                call()
            _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / iters
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    summary = {
        "phase": name,
        "wall_ms_per_iter": round(wall_ms, 3),
        "device_kernels_per_iter": len(kernels) / iters,
        "device_ms_per_iter": round(sum(e.device_time for e in kernels) / 1e3 / iters, 3),
    }
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
    (out / f"profile_{name}.txt").write_text(json.dumps(summary, indent=1) + "\n\n" + table + "\n")
    prof.export_chrome_trace(str(out / f"profile_{name}.json"))
    print(json.dumps(summary))
    return summary


def _projection_bytes(model) -> dict[str, int]:
    """Bytes of weights each of the plan's projection ops reads per step (all layers): fp32
    weights, or 4-bit codes with their fp16 scales and zeros."""
    from llama.quantize import QuantLinear

    def nbytes(layer) -> int:
        tensors = [layer.packed, layer.scales, layer.zeros] if isinstance(layer, QuantLinear) else [layer.weight]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    out = {"qkv": 0, "wo": 0, "gate_up": 0, "down": 0, "head": nbytes(model.output)}
    for block in model.layers:
        a, f = block.attention, block.feed_forward
        out["qkv"] += nbytes(a.wq) + nbytes(a.wk) + nbytes(a.wv)
        out["wo"] += nbytes(a.wo)
        out["gate_up"] += nbytes(f.w1) + nbytes(f.w3)
        out["down"] += nbytes(f.w2)
    return out


def _bandwidths(numel: int = 32 * 2**20) -> tuple[float, float]:
    """The host's memory bandwidth now, GB/s, the fastest of 5 calls over 128 MiB of fp32: a copy
    as the bench's roofline measures it (dst.copy_(src), read + written bytes), and a read-only
    stream (src.sum()), which is what a GEMV does."""
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    src.sum()
    copy = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    read = min(_timed(src.sum) for _ in range(5))
    return 2 * numel * 4 / copy / 1e9, numel * 4 / read / 1e9


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _plan_ops(model, cache, prefill, tokens: torch.Tensor, out: Path, steps: int = 20) -> dict:
    """`decode-plan`: the CPU decode plan's step (what generation runs on the CPU), op by op, as
    the plan times them (microseconds per step, summed over layers); `outside_ops_us` is the rest
    of a step's wall time (Python, the call, the checks)."""
    from llama.generate import plan

    why = plan.unsupported(model, cache)
    if why is not None:
        summary = {"phase": "decode-plan", "skipped": why}
        print(json.dumps(summary))
        return summary
    with torch.inference_mode():
        prefill()
        decode_plan = plan.build(model, cache)
        argmax = torch.empty_like(tokens)
        for _ in range(WARMUP):
            decode_plan.step(tokens, argmax=argmax)
        decode_plan.time_ops(True)
        start = time.perf_counter()
        for _ in range(steps):
            decode_plan.step(tokens, argmax=argmax)
        wall_us = (time.perf_counter() - start) * 1e6 / steps
    ops = decode_plan.op_times()
    weights = _projection_bytes(model)
    copy_gbps, read_gbps = _bandwidths()
    gbps = {op: weights[op] / (ops[op] * 1e-6) / 1e9 for op in weights if ops[op] > 0}
    summary = {"phase": "decode-plan", "wall_ms_per_iter": round(wall_us / 1e3, 3),
               "op_us_per_step": {op: round(us, 1) for op, us in ops.items()},
               "outside_ops_us": round(wall_us - sum(ops.values()), 1),
               # the projections' weight bytes over their time, against a copy measured now
               "weights_gbps": {op: round(v, 1) for op, v in gbps.items()},
               "copy_gbps": round(copy_gbps, 1), "read_gbps": round(read_gbps, 1),
               "fraction_of_copy": {op: round(v / copy_gbps, 2) for op, v in gbps.items()},
               "fraction_of_read": {op: round(v / read_gbps, 2) for op, v in gbps.items()}}
    (out / "profile_decode-plan.txt").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the tables and traces")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="model shape (default: sheared-1.3b on a GPU, stories42M on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=None, help="prefill length (default: 1024 on a GPU, 128 on CPU)")
    p.add_argument("--int4", action="store_true", help="quantize every linear layer to int4, group 32")
    p.add_argument("--untied", action="store_true",
                   help="an output layer of its own (the decode suite's stories42M-untied), which --int4 quantizes too")
    p.add_argument("--hf", action="store_true", help="also profile Hugging Face's prefill on the same shape")
    args = p.parse_args(argv)

    from llama import KVCache, ModelConfig, build
    from llama.generate import cache_dtype

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("sheared-1.3b" if cuda else "stories42M")
    cfg = ModelConfig.preset(preset)
    if args.untied:
        cfg = cfg.replace(tie_embeddings=False)
    dtype = torch.bfloat16 if cuda else torch.float32
    prompt = args.prompt or (1024 if cuda else 128)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build(cfg, device=device, dtype=dtype).eval()
    if args.int4:
        from llama.quantize import Int4Config, quantize_

        quantize_(model, Int4Config(group_size=32))
    if cuda:
        model.join_projections()  # as generation does on a GPU
    tokens = torch.randint(3, cfg.vocab_size, (args.batch, prompt), device=device)
    # room for every phase's steps; the dtype generation gives the cache (fp16 for an fp32 model on the CPU)
    kv_dtype = cache_dtype(model.tok_embeddings.weight)
    cache = KVCache.allocate(cfg, args.batch, prompt + 64, device=device, dtype=kv_dtype)

    def prefill():
        cache.reset()
        return model(tokens, cache=cache, last_only=True)

    step_tokens = tokens[:, -1:].clone()

    def decode_step():
        return model(step_tokens, cache=cache, last_only=True)

    summaries = [_profile("prefill", prefill, device, args.out)]
    prefill()
    summaries.append(_profile("decode", decode_step, device, args.out))
    if not cuda:
        summaries.append(_plan_ops(model, cache, prefill, step_tokens[:, 0].contiguous(), args.out))
    if args.hf:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as exc:
            print(f"hf-prefill: skipped, transformers is not importable ({exc})")
        else:
            hf_cfg = LlamaConfig(
                hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            )
            with device:
                hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
            summaries.append(_profile("hf-prefill", lambda: hf(tokens, use_cache=True, logits_to_keep=1), device,
                                      args.out))
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": preset, "batch": args.batch,
            "prompt": prompt, "int4": args.int4, "dtype": str(dtype), "torch": torch.__version__}
    (args.out / "profile_summary.json").write_text(json.dumps({"meta": meta, "phases": summaries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
