"""Stop strings over streamed text: the text before the first stop string, never the stop itself.

Text arrives in pieces, and a stop string may span pieces, so the end of the text that could still
grow into a stop string is held back until the next piece decides it. The result is always the text
before the earliest occurrence of any stop string in the whole output (or all of it, when none occurs).
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit: str | None = None         # the stop string found, once found

    def push(self, text: str) -> str:
        """The text that is now safe to emit; after a hit, nothing more."""
        if self.hit is not None:
            return ""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf
        first = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.hit, self.held = first[1], ""
            return buf[:first[0]]
        keep = 0            # the longest tail of buf that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of the output: what was held back (it began a stop string that never finished)."""
        out, self.held = ("" if self.hit is not None else self.held), ""
        return out
