"""lowalign.kernels: fused ops with a plain-PyTorch reference (the spec and CPU path) and Triton kernels."""
