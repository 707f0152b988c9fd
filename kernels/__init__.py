"""Fused Triton kernels for DiT, installed as ``dit_fast.kernels``."""
