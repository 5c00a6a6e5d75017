"""Errors raised by the PTX interpreter.

SimError: the PTX cannot be executed faithfully (syntax, an instruction / modifier / type outside
the implemented subset, a launch that does not match the entry).  SanitizerError (a SimError) means
the kernel itself misbehaved: out-of-bounds or misaligned access, shared-memory race, read of
unwritten or in-flight (cp.async) shared memory, divergence at a barrier or at a warp-synchronous
instruction.  Both name the PTX file and line of the instruction.
"""


class SimError(Exception):
    """The interpreter cannot execute this PTX (names the instruction and its line)."""


class SanitizerError(SimError):
    """The kernel did something invalid at run time (names thread, address and PTX line)."""
