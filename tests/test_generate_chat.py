"""When engine.generate wraps a prompt in the chat template (engine/generate.py), without a model."""
import pytest

from engine.generate import chat_text, parser, wants_chat
from loader.tokenizer import Tokenizer

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
            "system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOKENIZER = ('{"version":"1.0","added_tokens":[{"id":0,"content":"<|im_start|>","single_word":false,"lstrip":false,'
             '"rstrip":false,"normalized":false,"special":true},{"id":1,"content":"<|im_end|>","single_word":false,'
             '"lstrip":false,"rstrip":false,"normalized":false,"special":true}],'
             '"model":{"type":"BPE","vocab":{"<|im_start|>":0,"<|im_end|>":1,"a":2},"merges":[]}}')


class FakeModel:
    def __init__(self, template):
        self.tokenizer = Tokenizer.from_json(TOKENIZER, chat_template=template)


def test_plain_prompt_of_a_model_with_a_template_goes_through_it():
    assert wants_chat(FakeModel(TEMPLATE), "The capital of France is")
    assert not wants_chat(FakeModel(None), "The capital of France is")                 # no template
    assert not wants_chat(FakeModel(TEMPLATE), "<|im_start|>user\nhi<|im_end|>\n")     # already formatted


def test_chat_text_has_an_empty_system_turn_unless_given():
    m = FakeModel(TEMPLATE)
    text = chat_text(m, "The capital of France is", None)
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nThe capital of France is<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "SmolLM" not in text                     # the template's default system prompt stays out
    assert chat_text(m, "hi", "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_raw_and_chat_exclude_each_other(capsys):
    assert parser().parse_args(["x", "--raw"]).raw
    with pytest.raises(SystemExit):
        parser().parse_args(["x", "--raw", "--chat"])
