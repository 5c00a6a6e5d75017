"""The OpenAI wire format: request bodies checked into GenRequest, and the response objects.

Every bad request becomes an ApiError carrying the HTTP status and OpenAI's error shape
({"error": {"message", "type", "param", "code"}}); the message names the field and what was wrong.
Fields this server does not implement are refused when set to anything but their neutral value (n,
best_of, echo, suffix, logit_bias, tools), never silently ignored; fields that do not change the
output (user, metadata, store, ...) are accepted and ignored.
"""
from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass

import numpy as np

from engine.sampling import SamplingParams, TokenLogprob


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None,
                 code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenRequest:
    kind: str                   # "chat" | "completion"
    model: str
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    logprobs: int | None        # None: off; else how many alternatives per token
    stream: bool
    include_usage: bool


# ---- field checks ----------------------------------------------------------------------------------

def _number(body: dict, name: str, default, lo=None, hi=None, *, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"'{name}' must be {kind}, got {v!r}", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise bad(f"'{name}' must be {' and '.join(x for x in (lo_s, hi_s) if x)}, got {v!r}", name)
    return v


def _neutral(body: dict, name: str, neutral_values) -> None:
    if name in body and body[name] not in neutral_values:
        raise bad(f"'{name}' = {body[name]!r} is not supported by this server", name)


def check_model(body: dict, served: str) -> str:
    m = body.get("model")
    if m is None:
        return served
    if not isinstance(m, str):
        raise bad(f"'model' must be a string, got {m!r}", "model")
    if m != served:
        raise ApiError(404, f"The model '{m}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")
    return m


def _stops(body: dict) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(s) > 16:
        raise bad(f"'stop' holds at most 16 strings, got {len(s)}", "stop")
    return [x for x in s if x]


def _message_text(m, i: int) -> dict:
    if not isinstance(m, dict):
        raise bad(f"messages[{i}] must be an object", "messages")
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}",
                  "messages")
    if content is None:
        content = ""
    if isinstance(content, list):           # content parts: only text is understood here
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def prompt_ids(body: dict, kind: str, model) -> list[int]:
    tok = model.tokenizer
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad("'messages' must be a non-empty list", "messages")
        msgs = [_message_text(m, i) for i, m in enumerate(msgs)]
        try:
            text = tok.apply_chat_template(msgs)
        except (ValueError, TypeError) as e:    # FormatError is a ValueError: no usable template
            raise bad(f"cannot render the chat: {e}", "messages") from None
        ids = model.tokenize(text)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]                            # a batch of one prompt
        if isinstance(p, str):
            ids = model.tokenize(p)
        elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            V = model.config.vocab_size
            badid = [x for x in p if not 0 <= x < V]
            if badid:
                raise bad(f"prompt token {badid[0]} is outside the vocabulary (0..{V - 1})", "prompt")
            ids = list(p)
        elif isinstance(p, list) and len(p) > 1:
            raise bad("one prompt per request is supported (got a list of several)", "prompt")
        else:
            raise bad("'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise bad("the prompt is empty", "messages" if kind == "chat" else "prompt")
    return ids


def parse_generation(body, kind: str, model, served: str) -> GenRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    name = check_model(body, served)
    for f, ok in (("n", (1,)), ("best_of", (1,)), ("echo", (False,)), ("suffix", (None, "")),
                  ("logit_bias", (None, {})), ("tools", (None, [])), ("functions", (None, []))):
        _neutral(body, f, ok)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    top_k = _number(body, "top_k", 0, -1, integer=True)
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),      # OpenAI's default
        top_k=max(top_k, 0),                    # -1 means off, as in vLLM
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0, lo_open=True),
        seed=_number(body, "seed", None, integer=True),
        min_p=_number(body, "min_p", 0.0, 0, 1),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2))
    if params.seed is not None and params.seed < 0:
        raise bad(f"'seed' must be >= 0, got {params.seed}", "seed")
    if kind == "chat":
        lp = body.get("logprobs", False)
        if not isinstance(lp, bool):
            raise bad(f"'logprobs' must be true or false, got {lp!r}", "logprobs")
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not lp:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if lp else None
        max_tokens = _number(body, "max_completion_tokens", None, 1, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", None, 1, integer=True)
    else:
        logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
        max_tokens = _number(body, "max_tokens", 16, 1, integer=True)
    ids = prompt_ids(body, kind, model)
    ctx = model.decoder.context
    if len(ids) >= ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens, but the prompt has {len(ids)} "
                  f"tokens; shorten it", "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = ctx - len(ids)
    elif len(ids) + max_tokens > ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                  f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                  f"completion). Reduce the prompt or the completion length", "max_tokens",
                  "context_length_exceeded")
    return GenRequest(kind, name, ids, params, int(max_tokens), _stops(body), logprobs, stream,
                      bool(so.get("include_usage", False)))


# ---- responses ------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tok(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


def chat_logprobs(entries: list[TokenLogprob], tokenizer) -> dict:
    def one(i, lp):
        t = _tok(tokenizer, i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [dict(one(e.id, e.logprob), top_logprobs=[one(i, lp) for i, lp in e.top])
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], tokenizer, offset: int = 0) -> dict:
    tokens, offsets, pos = [], [], offset
    for e in entries:
        t = _tok(tokenizer, e.id)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_tok(tokenizer, i): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets}


def chat_response(rid: str, model: str, text: str, finish: str, u: dict, lps) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                         "finish_reason": finish}], "usage": u}


def chat_chunk(rid: str, model: str, delta: dict, finish=None, lps=None, u=None) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
         "choices": [] if u is not None else [{"index": 0, "delta": delta, "logprobs": lps,
                                               "finish_reason": finish}]}
    if u is not None:
        d["usage"] = u
    return d


def completion_response(rid: str, model: str, text: str, finish, u=None, lps=None, chunk=False) -> dict:
    d = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": [] if (chunk and u is not None) else
                    [{"index": 0, "text": text, "logprobs": lps, "finish_reason": finish}]}
    if u is not None:
        d["usage"] = u
    return d


def parse_embedding_input(body, served: str) -> tuple[str, list[str], str]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    name = check_model(body, served)
    x = body.get("input")
    if isinstance(x, str):
        texts = [x]
    elif isinstance(x, list) and x and all(isinstance(t, str) for t in x):
        texts = x
    elif isinstance(x, list) and x:
        raise bad("'input' must be a string or a list of strings (token arrays are not supported)", "input")
    else:
        raise bad("'input' must be a non-empty string or list of strings", "input")
    if len(texts) > 2048:
        raise bad(f"'input' holds at most 2048 texts, got {len(texts)}", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad(f"'encoding_format' must be float or base64, got {fmt!r}", "encoding_format")
    _neutral(body, "dimensions", (None,))
    return name, texts, fmt


def embedding_response(model: str, vectors: np.ndarray, fmt: str, n_tokens: int) -> dict:
    def enc(v):
        v = np.ascontiguousarray(v, "<f4")
        return base64.b64encode(v.tobytes()).decode() if fmt == "base64" else [float(x) for x in v]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
