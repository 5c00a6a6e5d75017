"""CUDA graphs: capture the launches one decode step makes on a stream, replay them with one call.

A decode step is dozens of small kernels whose launch overhead (a few microseconds each from Python)
rivals their run time at batch 1; a captured graph replays the whole step with one cuGraphLaunch.
Captured launches keep the argument values and device addresses they were captured with, so the
buffers a graph touches must stay allocated (and at the same address) for as long as it is replayed.
"""
from __future__ import annotations

from runtime.driver import check, driver, init, stream_handle


class Graph:
    """An instantiated graph. Build it with Graph.capture(stream, fn)."""

    def __init__(self, graph, exec_handle):
        self.graph, self.exec = graph, exec_handle

    @classmethod
    def capture(cls, stream, fn) -> "Graph":
        """Record everything `fn()` enqueues on `stream` (which must not be the legacy default stream:
        capture needs a real stream) and instantiate it. If fn raises, capture is ended and dropped."""
        init()  # NoGpuError here, before anything else, when there is no GPU
        if stream is None:
            raise ValueError("Graph.capture needs a created Stream; the legacy default stream "
                             "cannot be captured")
        d = driver()
        h = stream_handle(stream)
        mode = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(d.cuStreamBeginCapture(h, mode), "cuStreamBeginCapture")
        try:
            fn()
        except BaseException:
            res = d.cuStreamEndCapture(h)   # leave the stream usable, drop the partial graph
            if int(res[0]) == 0 and res[1] is not None:
                d.cuGraphDestroy(res[1])
            raise
        graph = check(d.cuStreamEndCapture(h), "cuStreamEndCapture")
        try:
            exe = check(d.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        except BaseException:
            d.cuGraphDestroy(graph)
            raise
        return cls(graph, exe)

    def node_count(self) -> int:
        d = driver()
        _, n = check(d.cuGraphGetNodes(self.graph, 0), "cuGraphGetNodes")
        return int(n)

    def replay(self, stream) -> None:
        if self.exec is None:
            raise RuntimeError("graph is closed")
        check(driver().cuGraphLaunch(self.exec, stream_handle(stream)), "cuGraphLaunch")

    def close(self) -> None:
        """Destroy the executable graph and the graph, both even if the first destroy fails (after a
        device fault every call does); the first error is raised."""
        from runtime.driver import Releaser
        rel = Releaser()
        e, g, self.exec, self.graph = self.exec, self.graph, None, None
        if e is not None:
            rel(lambda: check(driver().cuGraphExecDestroy(e), "cuGraphExecDestroy"))
        if g is not None:
            rel(lambda: check(driver().cuGraphDestroy(g), "cuGraphDestroy"))
        rel.done()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
