"""anybit loader: sources (GGUF, HF), the bipolar-INT format, packing, packed directories, tokenizers."""
from loader.errors import AnybitError, FetchError, FormatError, StorageError, UsageError  # noqa: F401
