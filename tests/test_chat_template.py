"""Chat templates: real models' templates rendered by loader.chat_template against plain jinja2 renderings
and against the prompts written out by hand; the sandbox; BOS handling; the ChatML fallback."""
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from loader.chat_template import CHATML, TemplateError, render
from loader.gguf_reader import read_gguf_metadata
from loader.tokenizer import Tokenizer
from tests.data_gen.tiny_models import tiny_vocab

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
THREE_TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
               {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."},
               {"role": "user", "content": "Thanks! Bye."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}] + THREE_TURNS


def plain_jinja(template, messages, add_generation_prompt=True, **kw):
    """The reference: jinja2 itself, configured as Hugging Face's apply_chat_template configures it."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, documents=None, **kw)


@pytest.fixture(scope="module")
def smol_template(default_gguf):
    return read_gguf_metadata(default_gguf)["tokenizer.chat_template"]


def test_smollm2_three_turns(smol_template):
    got = render(smol_template, THREE_TURNS)
    assert got == plain_jinja(smol_template, THREE_TURNS)
    sys_ = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert got == (sys_ + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
                   "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
                   "<|im_start|>user\nThanks! Bye.<|im_end|>\n<|im_start|>assistant\n")
    with_sys = render(smol_template, WITH_SYSTEM, add_generation_prompt=False)
    assert with_sys == plain_jinja(smol_template, WITH_SYSTEM, add_generation_prompt=False)
    assert with_sys.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n") and "SmolLM" not in with_sys


def test_qwen25_default_system_prompt():
    tpl = (TEMPLATES / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    got = render(tpl, THREE_TURNS)
    assert got == plain_jinja(tpl, THREE_TURNS)
    assert got == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
                   "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
                   "<|im_start|>user\nThanks! Bye.<|im_end|>\n<|im_start|>assistant\n")
    own = render(tpl, WITH_SYSTEM)
    assert own == plain_jinja(tpl, WITH_SYSTEM)
    assert own.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n") and "Qwen" not in own


def test_gemma3_three_turns_not_chatml():
    tpl = (TEMPLATES / "gemma3-it.jinja").read_text(encoding="utf-8")
    got = render(tpl, WITH_SYSTEM, bos_token="<bos>")
    assert got == plain_jinja(tpl, WITH_SYSTEM, bos_token="<bos>")
    assert got == ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?<end_of_turn>\n"
                   "<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                   "<start_of_turn>model\n6.<end_of_turn>\n<start_of_turn>user\nThanks! Bye.<end_of_turn>\n"
                   "<start_of_turn>model\n")
    # its own raise_exception: roles must alternate
    with pytest.raises(TemplateError, match="roles must alternate"):
        render(tpl, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], bos_token="<bos>")


def test_sandbox_keeps_templates_from_python_internals():
    with pytest.raises(TemplateError):
        render("{{ messages.append({'role': 'x'}) }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_helpers_and_variables():
    out = render("{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{{ bos_token }}{{ eos_token }}",
                 [{"role": "user", "content": "héllo"}], bos_token="<s>", eos_token="</s>")
    assert out == f'{datetime.now().year}|{{"role": "user", "content": "héllo"}}|<s></s>'
    with pytest.raises(ValueError, match="str 'role' and 'content'"):
        render(CHATML, [{"role": "user"}])


def test_bos_written_by_the_template_is_not_doubled():
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}
    tk = Tokenizer.from_gguf_metadata(meta)
    assert tk.bos_id == 1 and tk.bos_token == tokens[1]
    ids = tk.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == 1 and ids[1] != 1
    meta["tokenizer.chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    ids2 = Tokenizer.from_gguf_metadata(meta).encode_chat([{"role": "user", "content": "hello"}])
    assert ids2 == ids                    # BOS added when the template does not write it


def test_bad_template_is_one_clear_error():
    from loader.errors import FormatError
    with pytest.raises(FormatError, match="not valid Jinja"):
        render("{% for x in %}", [])


@pytest.mark.slow
def test_gemma3_vocabulary_encodes_its_template():
    """Gemma 3's template through the Gemma 3 file's own tokenizer: one BOS, the turn markers as their
    special ids, and the ids decode back to the rendered text."""
    from tests.data_gen import llama_vocab as lv
    from tests.test_tokenizer_llama import gemma_path
    path = gemma_path()
    if path is None or not path.is_file():
        pytest.skip("the Gemma 3 270M GGUF is not here (set ANYBIT_GEMMA_GGUF or put it in the anybit cache)")
    meta = lv.read_meta(path)
    meta["tokenizer.chat_template"] = (TEMPLATES / "gemma3-it.jinja").read_text(encoding="utf-8")
    tk = Tokenizer.from_gguf_metadata(meta, str(path))
    text = tk.apply_chat_template(WITH_SYSTEM)
    assert text == plain_jinja(meta["tokenizer.chat_template"], WITH_SYSTEM, bos_token="<bos>")
    ids = tk.encode_chat(WITH_SYSTEM)
    assert ids[0] == tk.bos_id == 2 and ids.count(2) == 1
    start, end = tk.token_to_id("<start_of_turn>"), tk.token_to_id("<end_of_turn>")
    assert ids.count(start) == 6 and ids.count(end) == 5
    assert tk.decode(ids) == text
