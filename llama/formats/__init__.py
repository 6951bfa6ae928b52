"""The checkpoint formats, one module each; `llama.checkpoint` is the front door that uses them.

    common        what they share: FORMATS, RoPE permutations, `Source` (a checkpoint's tensors
                  before they become parameters) and the strict `gather` of them, safetensors I/O
    detect        which format a path holds, by content
    native        this project's directory format (dense or 4-bit weights)
    hf            Hugging Face LlamaForCausalLM directories (safetensors, sharded or not)
    llama2c_pt    llama2.c and minllama `.pt` training checkpoints
    llama2c_bin   llama2.c `.bin` exports, versions 0, 1 and 2 (Q8_0)
    gguf          llama.cpp's GGUF (F32, F16, Q8_0, Q4_0; int4 layers as Q4_1): written, not read

Each format module documents its own layout, and reads (`open_*`, yielding a `Source`) and
writes (`save_*`, atomically through llama.atomic) it. Reading treats every file as hostile:
each size a header or config declares is checked against the bytes and tensors actually there
before anything is allocated for it, every config field is type-checked, and paths that are
neither regular files nor directories are refused unopened (see common.py).
"""
