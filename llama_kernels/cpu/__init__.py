"""Glue for the C++ CPU kernels of llama_kernels._C (csrc/cpu/), one module per op: each turns
validated tensors into the addresses, sizes, strides and dtype codes an entry point takes.
Imported by the op modules in llama_kernels/ops/, which choose when these run."""
