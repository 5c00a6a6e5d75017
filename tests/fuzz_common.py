"""What the fuzz modules share: example counts (fast by default, the full counts under `slow`, which CI
runs) and a guard that turns a reader that hangs into a test failure instead of a stuck run."""
import os
import signal
from contextlib import contextmanager

FAST_EXAMPLES = int(os.environ.get("ANYBIT_FUZZ_FAST", "150"))
CI_EXAMPLES = int(os.environ.get("ANYBIT_FUZZ_CI", "2000"))


@contextmanager
def no_hang(seconds: int):
    def fire(*_):
        raise TimeoutError(f"reader hung for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
