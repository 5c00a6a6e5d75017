"""The model worker: one thread owns the Model (engine/api.Model is not thread-safe) and runs the
sequences that requests submit, behind a bounded queue.

Each loop iteration admits waiting jobs into free slots (their prompts prefilled together in one step,
which also yields each one's first token), then runs one decode step for every active sequence, then
retires the finished ones. The decode
step is `_decode_step(seqs)`: a decoder with `step_batch(tokens, caches) -> logits (N, V)` (batched
decode, one product for N sequences) gets them all in one call; without it each sequence takes its own
forward, in turn. So up to `slots` sequences advance together, a token each per iteration; with a
device KV cache (GPU) and no batched decode there is one slot, because a decode graph is bound to one
cache and would be captured again at every switch.

A job talks back through `emit(Event)`, called on the worker thread (the server hands it over to its
event loop). A job whose `cancelled` is set (its client went away) is dropped at the next iteration
and its slot freed.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from engine.sampling import Sampler, SamplingParams, TokenLogprob
from engine.stop_text import StopText


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str                                   # "delta" | "done" | "error"
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None            # "stop" | "length" (done)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass
class Job:
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None                 # None: off; else alternatives per token
    cancelled: threading.Event = field(default_factory=threading.Event)
    reused: int = 0                             # prompt rows taken from the prefix cache
    t_submit: float = 0.0
    t_first: float | None = None


class Sequence:
    """One job in a slot: its KV cache, history, sampler, text decoder and stop matcher."""

    def __init__(self, job: Job, tokenizer, cache, reused: int):
        self.job, self.cache = job, cache
        job.reused = reused
        self.history = list(job.ids)
        self.out: list[int] = []
        self.sampler = Sampler(job.params)
        self.text = tokenizer.stream_decoder(skip_special=True)
        self.stops = StopText([s for s in job.stop if s])
        self.eos = set(tokenizer.eos_ids)
        self.pending: list[TokenLogprob] = []   # entries whose text is held back
        self.next_token: int | None = None      # sampled, not yet run through the model
        self.finish: str | None = None

    def accept(self, logits) -> None:
        """Sample from `logits`, emit what became safe to show, decide whether to go on."""
        job = self.job
        tok, lp = self.sampler.step(logits, self.history, job.logprobs)
        if job.t_first is None:
            job.t_first = time.perf_counter()
        if tok in self.eos:
            self._end("stop")
            return
        self.out.append(tok)
        self.history.append(tok)
        if lp is not None:
            self.pending.append(lp)
        self._send(self.stops.push(self.text.push(tok)))
        if self.stops.hit is not None:
            self._end("stop")
        elif len(self.out) >= job.max_tokens or self.cache.n >= self.cache.T:
            self._end("length")
        else:
            self.next_token = tok

    def _send(self, text: str) -> None:
        if text or (self.pending and self.stops.hit is None and not self.stops.held):
            self.job.emit(Event("delta", text, self.pending))
            self.pending = []

    def _end(self, reason: str) -> None:
        if self.stops.hit is None:
            tail = self.stops.push(self.text.flush())
            self._send(tail + (self.stops.flush() if self.stops.hit is None else ""))
            if self.stops.hit is not None:
                reason = "stop"
        self.finish, self.next_token = reason, None
        self.job.emit(Event("done", finish_reason=reason, prompt_tokens=len(self.job.ids),
                            completion_tokens=len(self.out)))


class Scheduler:
    def __init__(self, model, *, slots: int = 1, queue_size: int = 64, prefix_cache=None):
        if slots < 1 or queue_size < 1:
            raise ValueError(f"slots and queue size must be at least 1, got {slots} and {queue_size}")
        self.model, self.decoder = model, model.decoder
        batched = hasattr(self.decoder, "step_batch")
        device_cache = hasattr(model.backend, "kv_store")
        self.slots = slots if (batched or not device_cache) else 1
        self.queue_size = queue_size
        self.prefix_cache = prefix_cache
        self._waiting: deque[Job] = deque()
        self._active: list[Sequence] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="anybit-model-worker", daemon=True)
        self.served = 0

    # ---- the server's side (any thread) ---------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the model worker has stopped")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            job.t_submit = time.perf_counter()
            self._waiting.append(job)
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "active": len(self._active), "slots": self.slots,
                    "queue_size": self.queue_size, "served": self.served}

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._active:
                        self._cv.wait()
                    if self._stop:
                        break
                    admit = []
                    while self._waiting and len(self._active) + len(admit) < self.slots:
                        admit.append(self._waiting.popleft())
                if admit:
                    self._admit_all(admit)
                live = [s for s in self._active if s.next_token is not None and not self._dropped(s)]
                if live:
                    self._decode_step(live)
                self._retire()
        finally:
            with self._cv:
                self._stop = True
                left, self._waiting = list(self._waiting), deque()
            for s in self._active:
                if s.finish is None:
                    left.append(s.job)
                self._free(s)
            for job in left:
                job.emit(Event("error", error=RuntimeError("the model worker has stopped")))
            self._active = []
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def _dropped(self, s: Sequence) -> bool:
        if s.job.cancelled.is_set() and s.finish is None:
            s.finish = "cancelled"
        return s.finish is not None

    def _start(self, job: Job) -> Sequence | None:
        """A slot for `job`: its cache (from the prefix cache when it has one) and sequence."""
        if job.cancelled.is_set():
            return None
        if self.prefix_cache is not None:
            cache, reused = self.prefix_cache.acquire(job.ids)
        else:
            cache, reused = self.decoder.new_cache(), 0
        seq = Sequence(job, self.model.tokenizer, cache, reused)
        self._active.append(seq)
        return seq

    def _admit_all(self, jobs: list[Job]) -> None:
        """Prefill the admitted prompts: together in one step when the decoder takes rows of several
        sequences (each prompt a run of rows on its own cache: every linear reads its weights once for
        all of them, and each prompt's rows come out as they would alone), else one by one. If the
        joint step fails, each prompt is tried alone, so that a bad prompt fails only its own request."""
        seqs = [s for s in (self._start(j) for j in jobs) if s is not None]
        step = getattr(self.decoder, "step", None)
        if len(seqs) > 1 and step is not None and all(len(s.job.ids) > s.job.reused for s in seqs):
            ids, pos, caches, last = [], [], [], []
            for s in seqs:
                new = s.job.ids[s.job.reused:]
                ids += new
                pos += range(s.cache.n, s.cache.n + len(new))
                caches += [s.cache] * len(new)
                last.append(len(ids) - 1)
            try:
                logits = step(ids, pos, caches, last)
            except Exception:
                logits = None
            if logits is not None:
                for s in seqs:
                    s.cache.n += len(s.job.ids) - s.job.reused
                for s, row in zip(seqs, logits):
                    self._accept(s, lambda row=row: row)
                return
        for s in seqs:
            self._accept(s, lambda s=s: self.decoder.forward(s.job.ids[s.job.reused:], s.cache))

    def _accept(self, s: Sequence, logits) -> None:
        """s takes the logits that `logits()` gives; an error there ends s's request, not the worker."""
        try:
            s.accept(logits())
        except Exception as e:
            self._fail(s, e)

    def _decode_step(self, seqs: list[Sequence]) -> None:
        step_batch = getattr(self.decoder, "step_batch", None)
        if step_batch is not None and len(seqs) > 1:
            try:
                logits = step_batch([s.next_token for s in seqs], [s.cache for s in seqs])
            except Exception as e:
                for s in seqs:
                    self._fail(s, e)
                return
            for s, row in zip(seqs, logits):
                self._accept(s, lambda row=row: row)
            return
        for s in seqs:
            self._accept(s, lambda s=s: self.decoder.forward([s.next_token], s.cache))

    def _fail(self, s: Sequence, e: BaseException) -> None:
        s.finish, s.next_token = "error", None
        s.job.emit(Event("error", error=e))

    def _retire(self) -> None:
        keep = []
        for s in self._active:
            if self._dropped(s):
                self._free(s)
                self.served += 1
            else:
                keep.append(s)
        self._active = keep

    def _free(self, s: Sequence) -> None:
        if self.prefix_cache is not None and s.finish != "error":
            self.prefix_cache.release(s.cache, s.job.ids)
        else:
            s.cache.close()
