"""Fused GPU kernels (Triton) for the ToMe hot path; each has a CPU implementation in plain PyTorch."""
