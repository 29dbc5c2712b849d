"""Triton kernels for VisualRWKV (installed as `visualrwkv_kernels`)."""
from .wkv6 import wkv6_triton

__all__ = ["wkv6_triton"]
