"""Stop strings for streamed text: generation ends where one appears, and it is never emitted.

A stop string can arrive split across pieces ("<|e" then "nd|>"), so text that could still become one
is held back until the next piece decides: the longest tail of the pending text that is a prefix of a
stop string waits, the rest goes out.
"""
from __future__ import annotations


class StopText:
    def __init__(self, stops=None):
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"a stop string must be a non-empty str, got {s!r}")
        self.stops = stops
        self.pending = ""
        self.hit: str | None = None      # the stop string that ended the text

    def _first(self, buf: str):
        """The earliest complete stop string in buf: (index, stop), or None."""
        first = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        return first

    def push(self, piece: str) -> str:
        """The text that can be emitted now that `piece` arrived ("" once a stop string was seen)."""
        if self.hit is not None:
            return ""
        buf = self.pending + piece
        first = self._first(buf)
        # the earliest place where a stop string may begin and run past the end of what has arrived:
        # with "b" and "aba" as stops, "aab" must wait, since "aaba" stops at 1, not at 2
        start = len(buf)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    start = min(start, len(buf) - k)
                    break
        if first is not None and first[0] <= start:
            self.hit, self.pending = first[1], ""
            return buf[:first[0]]
        self.pending = buf[start:]
        return buf[:start]

    def flush(self) -> str:
        """What was held back, at the end of the text, up to a stop string it holds."""
        if self.hit is not None:
            self.pending = ""
            return ""
        out, self.pending = self.pending, ""
        first = self._first(out)
        if first is not None:
            self.hit = first[1]
            return out[:first[0]]
        return out
