"""anybit engine: the decoder (`load`, `python -m engine.generate`) and the embedder
(`load_embedder`, `python -m engine.embed`)."""


def load(*args, **kwargs):
    """See engine.api.load (imported lazily so that `python -m engine.embed` stays light)."""
    from engine.api import load as _load
    return _load(*args, **kwargs)


def load_embedder(*args, **kwargs):
    from engine.embed import load_embedder as _load_embedder
    return _load_embedder(*args, **kwargs)
