"""ptxsim: a CPU interpreter for the PTX subset of docs/PTX_SUBSET.md (issue 7).

    from tools.ptxsim import Module, GlobalMemory, SimError, SanitizerError
    mem = GlobalMemory(); x = mem.alloc_from(np_array)
    mod = Module(ptx_text, filename="k.ptx")
    mod.launch("kernel", grid=(gx, gy, gz), block=(bx, by, bz), args=[x, 16, 1.5], smem=0, mem=mem)

Execution model and accuracy notes: see launch.py (scheduling), sanitizer.py (checks),
ops_float.py (rounding) and ops_warp.py (mma fragment layout).
"""
from .errors import SimError, SanitizerError
from .machine import GlobalMemory
from .launch import Module

__all__ = ["Module", "GlobalMemory", "SimError", "SanitizerError"]
