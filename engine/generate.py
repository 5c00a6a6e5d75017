"""`python -m engine.generate PROMPT ...`: stream text from a quantized model (SPEC.md section 7).

A model with a chat template gets a plain-text prompt wrapped in it (`--raw` for plain completion).
Text goes to stdout as it is produced; statistics go to stderr; `--json` prints one JSON object on
stdout at the end instead. Bad input exits with status 2 and one clear line, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys


def _bits(s: str) -> int:
    v = int(s)
    if v != 16 and not 1 <= v <= 8:
        raise argparse.ArgumentTypeError(f"must be 1..8 or 16, got {v}")
    return v


def _abits(s: str):
    from loader.precision import parse_abits
    return parse_abits(s)


def _wbits(s: str):
    from loader.precision import parse_wbits
    return parse_wbits(s)


def _group(s: str) -> int:
    v = int(s)
    if v <= 0 or v % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32, got {v}")
    return v


def _agroup(s: str):
    return "token" if s == "token" else _group(s)


def wants_chat(model, prompt: str) -> bool:
    """Whether a prompt goes through the model's chat template by default: when the model has one and the
    prompt is plain text, as llama.cpp's CLI enters conversation mode for a model with a template. An
    instruct model fed a bare "The capital of France is" completes it as a document and wanders off
    (" Paris.\n\nThe answer is: 2018-01-22"). A prompt that already holds the tokenizer's special tokens
    (e.g. "<|im_start|>") is taken as formatted by the caller."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        return False
    specials = (tok.id_to_token(i) for i in getattr(tok, "special_ids", ()))
    return not any(s and s in prompt for s in specials)


def chat_text(model, prompt: str, system: str | None) -> str:
    """The prompt as one user turn of the model's chat template, after a system turn of `system`.

    With no --system the system turn is empty, which is what llama.cpp's CLI sends (no system prompt): a
    template's own default prompt is then left out. Measured on the default model, SmolLM2's default
    ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") turns the answer to "The
    capital of France is" into French small talk ("L'aujourcé! I am your friendly AI ..."), at 16 bits as
    at 4, while no system prompt, an empty one or a generic one all give "The capital of France is Paris."
    A template that refuses a system turn gets the user turn alone."""
    user = [{"role": "user", "content": prompt}]
    try:
        return model.tokenizer.apply_chat_template([{"role": "system", "content": system or ""}] + user)
    except (ValueError, LookupError):
        if system:
            raise
        return model.tokenizer.apply_chat_template(user)


def add_precision_options(p: argparse.ArgumentParser) -> None:
    """--wbits, --abits, --group, --agroup: the decoder CLIs' precision options (engine.generate, chat,
    serve), with engine.load's defaults."""
    p.add_argument("--wbits", type=_wbits, default=4,
                   help="weight bits 1..8, 16 for unquantized, or 'source': each tensor at its source type's own "
                        "bits (GGUF Q5_0 at 5, Q6_K at 6, ...; default 4)")
    p.add_argument("--abits", type=_abits, default=16,
                   help="activation bits 1..8, 16 (default), or 'q8': each linear's input rounded to 8 bits as "
                        "llama.cpp's CPU dot products do (per 32 or 256 lanes by the weight's GGUF type; CPU only)")
    p.add_argument("--group", type=_group, default=None,
                   help="weight group size (default: the source's block where exact, else 128)")
    p.add_argument("--agroup", type=_agroup, default=None,
                   help="activation group size, or 'token' for one scale per token (default: = group)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.generate",
                                description="Generate text with a 1-8 bit quantized language model.")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--model", default=None, help="GGUF file, HF directory or packed directory "
                                                 "(default: SmolLM2-135M-Instruct)")
    add_precision_options(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true",
                      help="wrap the prompt in the model's chat template (the default where the model has one)")
    mode.add_argument("--raw", action="store_true",
                      help="plain completion: the prompt text as it is, no chat template")
    p.add_argument("--system", default=None, help="system prompt of the chat turn, or of the --interactive "
                                                  "conversation (default: none)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="KV-cache length (default min(model, 4096))")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of text")
    p.add_argument("--interactive", action="store_true",
                   help="chat: read user turns from stdin, keep the conversation (as python -m engine.chat)")
    from engine.chat import add_reply_options
    add_reply_options(p)             # --stop
    return p


def main(argv=None) -> int:
    from engine.cli_common import GENERATE_BOUNDS, check_ranges, checked_argv, report
    from loader.errors import AnybitError, FetchError, FormatError
    from runtime.errors import CudaError, NoGpuError
    try:
        argv = checked_argv(argv)
    except AnybitError as e:
        return report(e)
    p = parser()
    args = p.parse_args(argv)
    check_ranges(p, args, GENERATE_BOUNDS)
    if args.prompt is None and not args.interactive:
        p.error("the prompt is required (or --interactive)")
    from runtime.errors import OutOfMemoryError

    prompt = args.prompt
    try:
        if prompt == "-":
            prompt = sys.stdin.buffer.read().decode("utf-8")
        import engine
        model = engine.load(args.model, wbits=args.wbits, abits=args.abits, group=args.group,
                            agroup=args.agroup, device=args.device, threads=args.threads,
                            context=args.context)
    except UnicodeDecodeError as e:
        print(f"error: the prompt on stdin is not valid UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except (FormatError, FetchError, NoGpuError, ValueError, OSError, CudaError, MemoryError) as e:
        return report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    with model:
        if args.interactive:
            from engine.chat import interactive
            return interactive(model, args)
        model.last = None
        chat, text = False, prompt
        if args.chat or (not args.raw and wants_chat(model, prompt)):
            try:
                text, chat = chat_text(model, prompt, args.system), True
            except (ValueError, LookupError) as e:          # FormatError is a ValueError
                if args.chat or args.system:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                print(f"anybit: the model's chat template cannot be applied ({e}); running the prompt as plain "
                      "completion (--raw)", file=sys.stderr)
        gen = model.stream(text, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                           truncate=args.truncate, stop=args.stop)
        interrupted = False
        try:
            for piece in gen:
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except (ValueError, FormatError, OSError, MemoryError) as e:
            return report(e)
        except KeyboardInterrupt:            # Ctrl-C while printing: stop cleanly, keep the statistics
            interrupted = True
        finally:
            gen.close()
        r = model.last
        if r is None:
            print("\ninterrupted", file=sys.stderr)
            return 130
        if interrupted:
            r.stop_reason = "interrupted"
        if args.json:
            print(json.dumps({"text": r.text, "ids": r.ids, "prompt_tokens": r.prompt_tokens,
                              "generated_tokens": r.generated_tokens, "prompt_tok_s": r.prompt_tok_s,
                              "decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s, "stop_reason": r.stop_reason,
                              "chat": chat,
                              **r.stats}))
        else:
            sys.stdout.write("\n")
        print(f"[{r.prompt_tokens} prompt tokens at {r.prompt_tok_s:.1f} tok/s, {r.generated_tokens} generated "
              f"at {r.decode_tok_s:.1f} tok/s, first token after {r.ttft_s * 1000:.0f} ms; device "
              f"{r.stats['device']}, W{r.stats['wbits']}A{r.stats['abits']}, "
              f"{r.stats['weight_bytes'] / 2**20:.1f} MiB weights, stop: {r.stop_reason}"
              + ("; chat template: ChatML (fallback: the model has none)"
                 if r.stats.get("chat_template") == "chatml-fallback" else "") + "]", file=sys.stderr)
        return 130 if r.stop_reason == "interrupted" else 0


if __name__ == "__main__":
    from engine.cli_common import run
    sys.exit(run(main))
