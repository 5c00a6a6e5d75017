"""CPU backend: C kernels on the packed bit planes, compiled through cffi on first use."""
from runtime.cpu.backend import CpuBackend, LinearHandle, a16_block, available_isas  # noqa: F401
