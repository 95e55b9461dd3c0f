"""esm-index: choose intermediate tasks for transfer learning with Embedding Space Maps, an LMDB store
and a FAISS prefilter. `from esm_index import ESMIndex` is the API other systems embed."""

from .errors import ESMIndexError

__all__ = ["ESMIndex", "ESMIndexError", "Ranking", "Result"]
__version__ = "0.1.0"


def __getattr__(name):
    """Import the API on first use, so `import esm_index.data` stays light."""
    if name == "ESMIndex":
        from .index import ESMIndex

        return ESMIndex
    if name in ("Ranking", "Result"):
        from . import query

        return getattr(query, name)
    raise AttributeError(f"module 'esm_index' has no attribute {name!r}")
