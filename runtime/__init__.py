"""anybit runtime: CPU backend (C through cffi) and GPU backend (CUDA driver API)."""
from runtime.errors import CudaError, NoGpuError, OutOfMemoryError  # noqa: F401
