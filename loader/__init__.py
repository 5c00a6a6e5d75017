"""anybit loader: sources (GGUF, HF), the bipolar-INT format, packing, packed directories, tokenizers."""
from loader.errors import FetchError, FormatError  # noqa: F401
