"""Glue for the CUDA kernels of llama_kernels._C (csrc/cuda/), one module per op: each turns
validated tensors into the arguments of an entry point (descriptors built by
llama_kernels.dispatch.tensor_arg, which carry each tensor's address, dtype, device, sizes and
strides; the true scalars; the device's current stream), raises the error the entry point
returns, and says which calls its kernels cannot take (`unsupported`). Imported by the op modules
in llama_kernels/ops/, which choose when these run."""
