"""Bridges from other libraries' MoE models to ``moe_kernels``."""
