"""The fast path on CUDA GPUs: fused Triton merge kernels, proportional-attention formulations and the measured
table of which design a GPU runs; each has a portable PyTorch equivalent that the CPU and exports use."""
