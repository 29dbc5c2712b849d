"""Triton kernels for VisualRWKV (installed as `visualrwkv_kernels`)."""
