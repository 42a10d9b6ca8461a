"""CUDA codegen: one persistent megakernel from a schedule, and nvcc."""
