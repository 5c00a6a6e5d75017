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
    "[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]")
# (escapes, not literal characters: an editor's Unicode normalization would silently change the ranges)
_DEEPSEEK_PUNCT = "[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK3_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
# Qwen 3.5: letters with their combining marks
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o / Tekken style: a word is capitals then lower case; llama.cpp writes "upper" as [^a-z] and
# "lower" as [^A-Z] behind a letter lookahead, which these patterns keep (L: the letter class)
def _cased(L: str, tail: str, suffix: str) -> str:
    up, low = f"((?=[{L}])([^a-z]))", f"((?=[{L}])([^A-Z]))"
    return (rf"[^\r\n\p{{L}}\p{{N}}]?{up}*{low}+{suffix}|[^\r\n\p{{L}}\p{{N}}]?{up}+{low}*{suffix}|{tail}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_TEKKEN = _cased(r"\p{L}", r"\p{N}", "")
_GPT4O = _cased(r"\p{L}", r"\p{N}{1,3}", _CONTRACTIONS + "?")
_GRANITE_MULTI = _cased(r"\p{L}\p{M}", r"\p{N}{1,3}", _CONTRACTIONS + "?")
_CASED_M = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?")


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
_DEEPSEEK3 = PreTokenizer((r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_MAIN))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3_PT),
    "dbrx": PreTokenizer((_LLAMA3,)),
    "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "chatglm-bpe": PreTokenizer((_LLAMA3,)),
    "glm4": PreTokenizer((_LLAMA3,)),
    "deepseek-llm": PreTokenizer(("[\r\n]", r"\s?" + _DEEPSEEK_LETTERS + "+", r"\s?" + _DEEPSEEK_PUNCT + "+",
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
    **dict.fromkeys(("kormo", "f2llmv2", "solar-open"), _QWEN2_PT),
    "qwen35": PreTokenizer((_QWEN35,)),
    "jina-v5-nano": _LLAMA3_PT,
    "modern-bert": _GPT2_PT,
    "mellum2": _STARCODER,
    "glm4": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "glm5": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
    "jais-2": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                            r"|\s*[\r\n]+" + "".join(rf"|\s{{{k}}}(?!\S)" for k in (512, 256, 128, 64, 32, 16, 8, 4))
                            + r"|\s{1,2}(?!\S)|\s{1}",)),
    "laguna": PreTokenizer((r"[^\n]+|[\n]+", _QWEN2)),
    "exaone-moe": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                                r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",)),
    "ufakzeka": PreTokenizer((r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                              r"|\s+(?!\S)|\s+",)),
    **dict.fromkeys(("hy_v4", "joyai-llm"), _DEEPSEEK3),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), PreTokenizer((_GPT4O,))),
    "granite-embed-multi-97m": PreTokenizer((_GRANITE_MULTI,), ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"),
                    PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _CASED_M + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"))),
    "chameleon": PreTokenizer(("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )",
                               r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", _GPT2), add_bos=True),
}

# known to llama.cpp, but split by code of its own rather than by patterns (or not byte-level at all)
NOT_SUPPORTED = ("kimi-k2", "afmoe", "superbpe", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "whitespace",
                 "spark2_5", "youtu")


def lookup(name: str, source: str) -> PreTokenizer:
    if name in NOT_SUPPORTED:
        raise FormatError(f"{source}: tokenizer.ggml.pre {name!r} is known to llama.cpp but not supported by "
                          f"anybit (llama.cpp splits it with code of its own)")
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
