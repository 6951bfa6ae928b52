"""Sheared-LLaMA structured pruning: hard-concrete masks and their Lagrangian (masks.py)."""
from .masks import (LOG_ALPHA_LIMIT, MODULE_KINDS, HardConcrete, PruningMasks, expected_params, param_groups,
                    target_params)

__all__ = ["HardConcrete", "PruningMasks", "MODULE_KINDS", "LOG_ALPHA_LIMIT", "expected_params", "target_params",
           "param_groups"]
