"""The BPE pre-tokenizers llama.cpp knows, by their GGUF `tokenizer.ggml.pre` name.

llama.cpp splits text with an ordered list of regular expressions: each one splits every piece the
previous ones left, and both its matches and the text between matches become pieces. That is
`tokenizers`' Split(pattern, behavior="isolated") applied in sequence, which is what `pre_tokenizer`
builds; the byte-level mapping follows with its own regex turned off. The patterns are those of
llama.cpp's vocabulary loader (src/llama-vocab.cpp), in Oniguruma syntax; `$` there means the end of
the piece, written `\\z` here because Oniguruma's `$` also matches before a newline.

Each name also sets the flags llama.cpp attaches to it: `ignore_merges` (a piece that is a whole
vocabulary entry is taken as is, before any merge) and whether a BOS is added by default.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from loader.errors import FormatError

# the GPT-2 pattern, the base of most entries
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3 (tiktoken style), with the case-insensitive contractions spelled out as llama.cpp does
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# Qwen2: as Llama 3 but every digit alone
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
# DeepSeek's Latin/Greek/Cyrillic/... letter class (from its tokenizer definition) and its CJK class
_DEEPSEEK_LETTERS = (
    "[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώ"
    "ᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ"
    "𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]")
_CJK_HANGUL = "[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK3_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizer:
    patterns: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False           # llama.cpp's default when the GGUF has no add_bos_token key


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_LLAMA3_PT = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER = PreTokenizer((r"\p{N}", _GPT2))
_GPT2_PT = PreTokenizer((_GPT2,))
_QWEN2_PT = PreTokenizer((_QWEN2,))
_BLOOM_PT = PreTokenizer((_BLOOM,))
_DEEPSEEK3 = PreTokenizer((r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_MAIN))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3_PT),
    "dbrx": PreTokenizer((_LLAMA3,)),
    "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "chatglm-bpe": PreTokenizer((_LLAMA3,)),
    "glm4": PreTokenizer((_LLAMA3,)),
    "deepseek-llm": PreTokenizer(("[\r\n]", r"\s?" + _DEEPSEEK_LETTERS + "+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
                                  r"\s+\z", _CJK_HANGUL, r"\p{N}+")),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")),
    "deepseek-v3": _DEEPSEEK3,
    "hunyuan-dense": _DEEPSEEK3,
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    _STARCODER),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                     "jina-v1-en", "jina-v2-code", "roberta-bpe", "a.x-4.0", "mellum", "mpt", "olmo", "jais",
                     "exaone4", "trillion", "granite-docling"), _GPT2_PT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), _QWEN2_PT),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _BLOOM_PT),
    "viking": PreTokenizer((_BLOOM, r"\p{N}")),
    "seed-coder": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                                r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"),
                    PreTokenizer((r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",))),
    "grok-2": _QWEN2_PT,
}


def lookup(name: str, source: str) -> PreTokenizer:
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        raise FormatError(f"{source}: tokenizer.ggml.pre {name!r} is not a pre-tokenizer anybit knows "
                          f"(known: {', '.join(sorted(PRE_TOKENIZERS))})") from None


def pre_tokenizer(pt: PreTokenizer):
    """The `tokenizers` pre-tokenizer: each pattern splits in turn, then the byte-level mapping."""
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in pt.patterns]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)
