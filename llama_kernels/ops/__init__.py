"""The ops, one module per op family: rms_norm.py (rms_norm, add_rms_norm), linear.py,
int4_matmul.py (int4_matmul, dequantize) and rope_attention.py (rope_attention,
rope_decode_attention). llama_kernels re-exports their public functions.

An op module holds the PyTorch reference, the input checks, the backend choice (through
llama_kernels.dispatch), the custom-op and autograd registration, and the public function. Each
backend's code lives beside it under the same name:

* llama_kernels/cpu/<op>.py    - the C++ CPU entry points of llama_kernels._C (tensors to addresses)
* llama_kernels/cuda/<op>.py   - the CUDA entry points of llama_kernels._C, and what they cannot take
* llama_kernels/triton/<op>.py - the Triton kernels and their launchers, imported on first use

rope_decode_attention's backends are named after its kernels, rope_decode.py (as in csrc/).
"""
