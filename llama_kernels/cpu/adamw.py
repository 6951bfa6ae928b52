"""The C++ CPU entry point behind adamw_step_ (csrc/cpu/adamw.cpp).

Inputs arrive validated by llama_kernels/ops/adamw.py: contiguous fp32 parameters and moments,
gradients of one dtype, all on the CPU.
"""
from __future__ import annotations

import torch

from .. import dispatch


def step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, bias_correction1,
         bias_correction2_sqrt):
    dispatch.ext().adamw_step_cpu(
        [t.data_ptr() for t in params], [t.data_ptr() for t in grads], [t.data_ptr() for t in exp_avgs],
        [t.data_ptr() for t in exp_avg_sqs], [t.numel() for t in params], dispatch.DTYPE_CODES[grads[0].dtype],
        lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
        torch.get_num_threads(),
    )
