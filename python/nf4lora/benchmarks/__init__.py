"""Measuring code shared by the bench/ scripts and the `nf4lora bench` command (not tests).

common.py  timing (median of repeats, rotated inputs), machine ceilings, tables and plots
quant.py   NF4 quantize / dequantize vs bitsandbytes
linear.py  the fused linear (GEMV / GEMM forward, forward + backward) vs dense torch,
           bitsandbytes and torch's int4 CPU kernel
layer.py   one QLoRALinear training step vs bitsandbytes Linear4bit + PEFT LoRA
optim.py   PagedAdamW vs torch's AdamW (foreach, fused) and bitsandbytes
"""
