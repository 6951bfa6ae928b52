"""Sheared-LLaMA structured pruning: hard-concrete masks and their Lagrangian (masks.py), the
forward under masks (masked.py) and the compaction into a smaller dense model (compact.py).
`python -m llama.prune compact CKPT --out OUT` runs the compaction (__main__.py)."""
from .compact import OUTPUT_FORMATS, compact, compact_checkpoint, compact_config
from .masked import check_masks, masked_forward, masked_linear
from .masks import (LOG_ALPHA_LIMIT, MASKS_CONFIG, MASKS_FORMAT, MASKS_VERSION, MASKS_WEIGHTS, MODULE_KINDS,
                    HardConcrete, PruningMasks, expected_params, gate_shapes, load_masks, mask_files,
                    param_groups, save_masks, target_params)

__all__ = ["HardConcrete", "PruningMasks", "MODULE_KINDS", "LOG_ALPHA_LIMIT", "expected_params", "target_params",
           "param_groups", "gate_shapes", "MASKS_CONFIG", "MASKS_WEIGHTS", "MASKS_FORMAT", "MASKS_VERSION",
           "mask_files", "save_masks", "load_masks", "check_masks", "masked_forward", "masked_linear", "compact",
           "compact_checkpoint", "compact_config", "OUTPUT_FORMATS"]
