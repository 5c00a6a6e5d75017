"""`python -m engine.chat`: an interactive conversation with a model (also `engine.generate --interactive`).

Each line read is a user turn; the reply streams to stdout and its statistics go to stderr. The whole
conversation is rendered with the model's chat template every turn, and the KV cache is kept between
turns, so only the new part of the prompt is computed (the statistics say how much came from the
cache). Commands: /reset forgets the conversation (and the cache), /exit ends; so do end of input
(Ctrl-D) and Ctrl-C at the prompt. Ctrl-C during a reply stops that reply and keeps the conversation.
"""
from __future__ import annotations

import argparse
import sys

HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it"


def parser() -> argparse.ArgumentParser:
    from engine.generate import add_precision_options
    p = argparse.ArgumentParser(prog="python -m engine.chat", description="Chat with a quantized language model.")
    p.add_argument("--model", default=None, help="GGUF file, HF directory or packed directory "
                                                 "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_precision_options(p)
    add_reply_options(p)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="KV-cache length (default min(model, 4096))")
    return p


def add_reply_options(p: argparse.ArgumentParser) -> None:
    """Options of a reply, shared with engine.generate (which defines the sampling ones itself)."""
    names = {a for action in p._actions for a in action.option_strings}
    if "--max-tokens" not in names:
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repeat-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
    if "--stop" not in names:
        p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end a reply where TEXT appears (not printed); repeatable")


def _template_note(source: str) -> str:
    return "the model's own" if source == "model" else "ChatML (fallback: the model has no chat template)"


def interactive(model, args, inp=None, out=None, err=None) -> int:
    """The read-reply loop. Returns the exit status (0; 130 after Ctrl-C at the prompt)."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    system = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
    messages = list(system)
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)
    tty = inp.isatty()
    print(f"[chat template: {_template_note(model.tokenizer.template_source)}; {HELP}]", file=err)
    while True:
        try:
            if tty:
                out.write("> ")
                out.flush()
            line = inp.readline()
        except KeyboardInterrupt:
            print("", file=err)
            return 130
        if not line:                                    # end of input
            return 0
        text = line.rstrip("\r\n")
        cmd = text.strip()
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            messages = list(system)
            model.reset_chat()
            print("[conversation cleared]", file=err)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": text})
        model.last = None
        gen = model.stream_chat(messages, **kw)
        try:
            for piece in gen:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            pass
        except ValueError as e:                         # the template refused, or the context is full
            messages.pop()
            print(f"\nerror: {e}" + (" (/reset starts over)" if "context" in str(e) else ""), file=err)
            continue
        finally:
            gen.close()
        r = model.last
        out.write("\n")
        out.flush()
        if r is None:
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": r.text})
        cached = r.stats.get("cached_prompt_tokens", 0)
        print(f"[{r.prompt_tokens} prompt tokens ({cached} from the cache) at {r.prompt_tok_s:.1f} tok/s, "
              f"{r.generated_tokens} generated at {r.decode_tok_s:.1f} tok/s; stop: {r.stop_reason}]", file=err)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from loader.errors import FetchError, FormatError
    from runtime.errors import CudaError, NoGpuError, OutOfMemoryError
    try:
        import engine
        model = engine.load(args.model, wbits=args.wbits, abits=args.abits, group=args.group,
                            agroup=args.agroup, device=args.device, threads=args.threads, context=args.context)
    except (FormatError, FetchError, NoGpuError, ValueError, OSError, CudaError, OutOfMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    with model:
        return interactive(model, args)


if __name__ == "__main__":
    sys.exit(main())
