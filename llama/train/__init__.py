"""Training on the fast kernels: `Trainer(model, TrainConfig(...), data).fit()`.

    from llama.train import TrainConfig, Trainer, build_run
    trainer = build_run(TrainConfig.from_spec("configs/train/botchan-tiny.yaml"))
    trainer.fit()

    python -m llama.train --config configs/train/botchan-tiny.yaml max_steps=200   # see __main__.py

One step: `grad_accum` micro-batches of contiguous token windows (llama.data.WindowLoader),
the loss under autocast (fp32 master weights; `dtype` bf16 or fp16 for the activations), fused
SwiGLU and the chunked linear + cross-entropy (no full logits) unless `fused` is false, gradient
clipping, then our AdamW (llama.optim) with per-group decay and layer-wise LR, on a cosine
schedule with linear warmup and a floor.

What a run leaves in `out_dir`:
    checkpoints/step_XXXXXXXX/   model.safetensors + config.json (llama.load reads it as a native
                                 checkpoint; with LoRA, trainable.safetensors holds only what
                                 trains), trainer.safetensors (optimizer moments, RNG and data
                                 positions) and trainer_state.json; written atomically
                                 (llama.atomic), the last `keep_last` kept
    metrics.jsonl                one JSON object per logged step and per validation
    loss.png                     the loss curves, drawn at the end
    final/                       the trained model (native), or the adapters with LoRA

Under `torchrun --nproc_per_node N` the run is data-parallel with FSDP2 (distributed.py): every
rank trains on its share of each global batch of `batch_size` rows, and checkpoints are sharded
with torch.distributed.checkpoint (model + optimizer moments in `*.distcp` files beside the same
trainer_state.json); they resume at any world size, a single process included.

`resume=true` continues from the newest checkpoint with the model, optimizer, schedule, data
position and RNG states, so that on a CPU the losses after resuming equal those of a run that
was never stopped. SIGINT and SIGTERM finish the current step, save and return. A NaN or inf
loss stops the run before the optimizer step (TrainingDiverged), so no checkpoint ever holds the
diverged state.
"""
from __future__ import annotations

from .config import TrainConfig
from .run import build as build_run
from .trainer import Trainer, TrainingDiverged, latest_checkpoint

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "build_run", "latest_checkpoint"]
