"""`synthloop dedup --executor ray`: exact, MinHash-LSH and semantic dedup on a Ray cluster.

No process holds an index of every record. The input is cut into pieces of ``batch_rows`` rows,
each with a global ordinal range (input files in order, rows in order: the order the local
executor streams them in), and Ray Data runs:

- exact: a key per row (filters/normalize.py) -> grouped by key across blocks -> every row
  after the first of its key is a duplicate.
- minhash: signatures and LSH band fingerprints per piece -> rows grouped by fingerprint across
  blocks (a hash-partitioned group-by) -> candidate pairs -> pairs bucketed by their first row,
  each row's check data (sorted shingle hashes, or the signature's low 8 bits with ``verify =
  false``) sent once to every bucket holding one of its pairs (a second group-by) -> pairs checked
  exactly as `LSHIndex` checks them -> verified duplicate pairs.
- semantic: embeddings per piece on actors (the encoder loads once per actor) -> spherical
  k-means fitted on a sample -> every vector goes to its nearest centroid and, as a replica, to
  every centroid within twice the threshold angle of that, so any pair with cosine >= threshold
  meets in the home cluster of one of them -> pairs checked per cluster.

Duplicates are then resolved on the driver from the verified pairs alone (a few ints per
duplicate, never per record): connected components of the pair graph, and inside each the local
executor's keep-first rule, which is what the streaming index computes: in input order, a row is
dropped when a pair links it to an earlier row that was kept; preloaded rows are always kept. The
same input and settings therefore give the same kept ids as the local executor (a test checks
all three methods). A last pass writes each piece's kept rows and rejects. Ray reruns a task
whose worker died (3 times by default); every pass is a pure function of its input blocks, so a
rerun cannot lose or repeat a row.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Piece:
    index: int
    path: str        # Parquet or JSONL file
    start: int       # first row in the file
    rows: int
    ord0: int        # global ordinal of the first row (preload pieces: negative)


def connect(address: str | None = None) -> dict:
    """Join the cluster at `address` (default: $RAY_ADDRESS, the cluster `ray start` last started
    here, else a new local one) unless this process already has; returns its CPU count."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return {"num_cpus": int(ray.cluster_resources().get("CPU", 1))}


def pieces(files: list[tuple[Path, int]], batch_rows: int, ord0: int = 0) -> list[Piece]:
    """Cut (file, rows) in order into pieces of at most `batch_rows` rows with global ordinals.

    >>> [(p.start, p.rows, p.ord0) for p in pieces([(Path("a"), 3), (Path("b"), 2)], 2)]
    [(0, 2, 0), (2, 1, 2), (0, 2, 3)]
    """
    out, o = [], ord0
    for path, rows in files:
        for s in range(0, rows, batch_rows):
            n = min(batch_rows, rows - s)
            out.append(Piece(len(out), str(path), s, n, o))
            o += n
    return out


def read_piece(p: Piece) -> pl.DataFrame:
    """The piece's rows, with a null drop_reason column added when the input has none."""
    path = Path(p.path)
    lf = pl.scan_parquet(path) if path.suffix in (".parquet", ".pq") else \
        pl.scan_ndjson(path, infer_schema_length=None)
    df = lf.slice(p.start, p.rows).collect()
    if "drop_reason" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias("drop_reason"))
    return df


def _piece_of(batch) -> Piece:
    row = {k: batch[k][0].as_py() for k in batch.column_names}
    return Piece(**row)


def _dataset(ps: list[Piece]):
    import ray

    return ray.data.from_items([vars(p) for p in ps], override_num_blocks=max(1, len(ps)))


def _table(**cols):
    import pyarrow as pa

    return pa.table({k: pa.array(v) if not isinstance(v, pa.Array) else v for k, v in cols.items()})


def _packed(rows: np.ndarray, off: np.ndarray | None = None, idx: np.ndarray | None = None):
    """Binary column of raw bytes: one per matrix row, or with `off` (and row numbers `idx`) the
    ragged rows ``rows[off[i]:off[i+1]]`` of a flat array, gathered without a Python loop."""
    import pyarrow as pa

    if off is None:                                   # a matrix: fixed-width rows
        off = np.arange(rows.shape[0] + 1, dtype=np.int64) * rows.shape[1]
        rows = rows.ravel()
    if idx is not None:
        sizes = off[idx + 1] - off[idx]
        new_off = np.zeros(idx.size + 1, np.int64)
        new_off[1:] = np.cumsum(sizes)
        rows = rows[np.arange(new_off[-1]) - np.repeat(new_off[:-1] - off[idx], sizes)]
        off = new_off
    size = rows.itemsize
    data = np.ascontiguousarray(rows).view(np.uint8)
    return pa.Array.from_buffers(pa.large_binary(), off.size - 1,
                                 [None, pa.py_buffer((off - off[0]) * size),
                                  pa.py_buffer(data[off[0] * size:off[-1] * size])])


def _unpacked(col, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets in elements) of a binary column written by `_packed`."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.large_binary())
    _, off_buf, data_buf = arr.buffers()
    off = np.frombuffer(off_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    size = np.dtype(dtype).itemsize
    flat = data[off[0]:off[-1]].view(dtype)
    return flat, (off - off[0]) // size


# ---------------------------------------------------------------- per-method row data


def minhasher(cfg):
    """The `MinHasher` that `MinHashDedup(cfg)` uses (same bands, rows and seed)."""
    from synthloop.filters.lsh import optimal_bands_rows
    from synthloop.filters.minhash import MinHasher

    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else optimal_bands_rows(
        cfg.threshold, cfg.num_perm, fp_weight=cfg.fp_weight, fn_weight=cfg.fn_weight)
    return MinHasher(num_perm=cfg.num_perm, ngram=cfg.ngram, shingle=cfg.shingle, bands=bands,
                     rows=rows, seed=cfg.seed)


def _live(df: pl.DataFrame, p: Piece) -> np.ndarray:
    """Rows the stage looks at: all preloaded rows, stream rows nobody dropped before."""
    return np.ones(df.height, bool) if p.ord0 < 0 else df["drop_reason"].is_null().to_numpy()


def _exact_rows(batch, columns, parts):
    from synthloop.filters.normalize import exact_keys

    p = _piece_of(batch)
    df = read_piece(p)
    idx = np.flatnonzero(_live(df, p))
    keys = exact_keys(df, columns)[idx]
    return _table(part=(keys % np.uint64(parts)).astype(np.int64), key=keys,
                  ord=(p.ord0 + idx).astype(np.int64))


def _exact_dups(group: dict) -> dict:
    order = np.lexsort((group["ord"], group["key"]))
    key, ords = group["key"][order], group["ord"][order]
    later = np.zeros(key.size, bool)
    later[1:] = key[1:] == key[:-1]
    later &= ords >= 0            # preloaded rows are never re-emitted and never dropped here
    return {"ord": ords[later]}


def _minhash_rows(batch, columns, cfg, mh):
    """Per live row with shingles: its band fingerprints and its check data (binary)."""
    import pyarrow as pa

    from synthloop.filters.normalize import joined_text

    p = _piece_of(batch)
    df = read_piece(p)
    texts = joined_text(df, columns)
    sig, keys, counts, *sets = mh.hash(texts, sets=cfg.verify)
    idx = np.flatnonzero(_live(df, p) & (counts > 0))   # no shingles: never a near-dup, never indexed
    fp = (keys[idx] >> np.uint64(32)).astype(np.uint32)
    fp[fp == 0] = 1                              # as hashtable.fingerprint: the table's key
    if cfg.verify:
        flat, off = sets[0]
        check = _packed(flat, off, idx)
    else:
        check = _packed((sig[idx] & np.uint32(0xFF)).astype(np.uint8))
    return _table(ord=(p.ord0 + idx).astype(np.int64), check=check,
                  fps=pa.FixedSizeListArray.from_arrays(pa.array(fp.ravel()), fp.shape[1]))


def _explode(batch, parts):
    import pyarrow as pa

    fps = batch["fps"].combine_chunks() if isinstance(batch["fps"], pa.ChunkedArray) else batch["fps"]
    bands = fps.type.list_size
    fp = fps.flatten().to_numpy().astype(np.int64)
    ords = np.repeat(batch["ord"].to_numpy(), bands)
    return _table(part=fp % parts, fp=fp, ord=ords)


def _candidate_pairs(group: dict) -> dict:
    """All pairs (a < b) of rows sharing a band fingerprint in this group."""
    order = np.lexsort((group["ord"], group["fp"]))
    fp, ords = group["fp"][order], group["ord"][order]
    starts = np.flatnonzero(np.r_[True, fp[1:] != fp[:-1]])
    sizes = np.diff(np.r_[starts, fp.size])
    two = starts[sizes == 2]
    a, b = [ords[two]], [ords[two + 1]]
    for s, m in zip(starts[sizes > 2], sizes[sizes > 2]):   # rare: more than two rows share it
        i, j = np.triu_indices(m, 1)
        a.append(ords[s + i])
        b.append(ords[s + j])
    a, b = np.concatenate(a), np.concatenate(b)
    keep = a != b                               # one row's two bands can share a fingerprint
    key = np.unique(a[keep] * (1 << 32) + (b[keep] - a[keep]))   # rows sharing several bands
    return {"a": key >> 32, "b": (key >> 32) + (key & 0xFFFFFFFF)}


def _got(x):
    """A value passed to tasks by reference (one copy in the object store, not one per task)."""
    import ray

    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _route(batch, dest):
    """Each row's check data once for every bucket holding one of its candidate pairs."""
    d_ord, d_bucket = _got(dest)
    ords = batch["ord"].to_numpy()
    lo, hi = np.searchsorted(d_ord, ords), np.searchsorted(d_ord, ords, side="right")
    n = hi - lo
    row = np.repeat(np.arange(ords.size), n)
    at = np.arange(row.size) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    return _table(bucket=d_bucket[at], ord=ords[row], check=batch["check"].take(row))


def _verify_bucket(group, pairs, verify: bool, threshold: float, cut: int):
    """The candidate pairs of one bucket, checked as `LSHIndex` checks them; the verified ones."""
    from synthloop.filters.lsh import jaccard_pairs

    a, b, bucket = _got(pairs)
    ords = group["ord"].to_numpy()
    mine = bucket == int(group["bucket"][0].as_py())
    a, b = a[mine], b[mine]
    order = np.argsort(ords)
    ia, ib = order[np.searchsorted(ords, a, sorter=order)], order[np.searchsorted(ords, b, sorter=order)]
    if verify:
        flat, off = _unpacked(group["check"], np.uint64)
        ok = jaccard_pairs(flat, off, ia, ib) >= threshold
    else:
        flat, _ = _unpacked(group["check"], np.uint8)
        sig8 = flat.reshape(ords.size, -1)
        ok = (sig8[ia] == sig8[ib]).sum(axis=1) >= cut
    return _table(a=a[ok], b=b[ok])


# ---------------------------------------------------------------- semantic


class _Encoder:
    """A Ray actor's encoder: loaded once, then one piece of rows per call."""

    def __init__(self, columns, cfg):
        from synthloop.filters.embed_dedup import encoder

        import ray
        import torch

        # one CPU per actor: torch's default (all cores in every actor) would oversubscribe
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.columns, self.cfg = columns, cfg
        self.model = encoder(cfg.model or None, cfg.device or None)

    def __call__(self, batch):
        from synthloop.filters.embed_dedup import embed
        from synthloop.filters.normalize import joined_text

        p = _piece_of(batch)
        df = read_piece(p)
        idx = np.flatnonzero(_live(df, p))
        emb = embed(joined_text(df[idx], self.columns).to_list(), model=self.model,
                    batch_size=self.cfg.encode_batch_size)
        return _table(ord=(p.ord0 + idx).astype(np.int64), emb=_packed(emb))


def _assign(batch, centroids, reach):
    """Home cluster of each vector plus replicas within `reach` radians beyond the home angle."""
    flat, off = _unpacked(batch["emb"], np.float32)
    ords = batch["ord"].to_numpy()
    emb = flat.reshape(len(ords), -1)
    ang = np.arccos(np.clip(emb @ centroids.T, -1.0, 1.0))
    home = ang.argmin(axis=1)
    r, c = np.nonzero(ang <= ang[np.arange(len(ords)), home][:, None] + reach)
    return _table(cluster=c.astype(np.int64), ord=ords[r], home=(c == home[r]),
                  emb=_packed(emb[r]))


def _cluster_pairs(group: dict, threshold: float) -> dict:
    from synthloop.filters.embed_dedup import _EPS

    raw = group["emb"]
    emb = np.stack([np.frombuffer(x, np.float32) for x in raw]) if len(raw) else np.zeros((0, 1), np.float32)
    ords, home = group["ord"], group["home"].astype(bool)
    a, b = [], []
    for s in range(0, int(home.sum()), 2048):
        h = np.flatnonzero(home)[s:s + 2048]
        sim = emb[h] @ emb.T
        i, j = np.nonzero(sim >= threshold - _EPS)
        oi, oj = ords[h[i]], ords[j]
        keep = oi != oj
        a.append(np.minimum(oi, oj)[keep])
        b.append(np.maximum(oi, oj)[keep])
    if not a:
        return {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64)}
    return {"a": np.concatenate(a), "b": np.concatenate(b)}


# ---------------------------------------------------------------- resolve and write


def keep_first(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Dropped ordinals under keep-first over duplicate pairs (a < b), and the component count.

    Rows with negative ordinals (preloaded) are always kept. Components are independent, so the
    order-dependent rule runs on each alone; together it equals one pass in ordinal order.

    >>> keep_first(np.array([0, 1, 5]), np.array([1, 2, 6]))[0].tolist()   # 0-1-2 chain: 2 stays
    [1, 6]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if a.size == 0:
        return np.zeros(0, np.int64), 0
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[:a.size], inv[a.size:]
    n = nodes.size
    n_comp, _ = connected_components(coo_matrix((np.ones(a.size, np.int8), (ia, ib)), shape=(n, n)),
                                     directed=False)
    order = np.argsort(ib, kind="stable")          # pairs by their later row
    ia, ib = ia[order], ib[order]
    bounds = np.searchsorted(ib, np.arange(n + 1))
    kept = np.ones(n, bool)
    for v in np.unique(ib):                        # nodes ascending = input order
        if nodes[v] >= 0 and kept[ia[bounds[v]:bounds[v + 1]]].any():
            kept[v] = False
    return nodes[~kept], int(n_comp)


def _write_piece(batch, dropped_ref, reason: str, stage: str, had_reason: bool):
    from synthloop.outputs.shards import write_parquet_atomic

    p = _piece_of(batch)
    dropped = _got(dropped_ref)
    df = read_piece(p)
    ords = np.arange(p.ord0, p.ord0 + df.height)
    dup = np.isin(ords, dropped[(dropped >= p.ord0) & (dropped < p.ord0 + df.height)])
    df = df.with_columns(pl.when(pl.Series(dup)).then(pl.lit(reason)).otherwise(pl.col("drop_reason"))
                         .alias("drop_reason"))
    is_kept = df["drop_reason"].is_null()
    kept, rej = df.filter(is_kept), df.filter(~is_kept)
    files = {"kept": "", "rejects": ""}
    if kept.height:
        files["kept"] = f"kept-{p.index:05d}.parquet"
        write_parquet_atomic(kept if had_reason else kept.drop("drop_reason"), Path(stage) / files["kept"])
    if rej.height:
        files["rejects"] = f"rejects-{p.index:05d}.parquet"
        write_parquet_atomic(rej, Path(stage) / files["rejects"])
    counts = rej["drop_reason"].value_counts()
    return _table(piece=[p.index], kept=[kept.height], kept_file=[files["kept"]],
                  rejects_file=[files["rejects"]],
                  reasons=[";".join(f"{r}={c}" for r, c in counts.iter_rows())])


REASONS = {"exact": "exact_duplicate", "minhash": "near_duplicate", "semantic": "semantic_duplicate"}


def dedup(method: str, cfg, inputs: list[tuple[Path, int]], preload: list[str], *,
          columns: list[str], batch_rows: int, stage: Path, had_reason: bool,
          address: str | None = None) -> dict:
    """Dedup `inputs` ((file, rows) in order) on Ray, writing per-piece files into `stage`.

    Returns counts for the summary: records, kept, dropped (by reason), files, and what the
    distributed passes found (candidate and verified pairs, components).
    """
    import ray

    from synthloop.filters.preload import expand_paths

    info = connect(address)
    parts = max(2, 2 * info["num_cpus"])
    stream = pieces(inputs, batch_rows)
    pre_files = [(Path(p), pl.scan_parquet(p).select(pl.len()).collect().item())
                 for p in expand_paths(preload)]
    n_pre = sum(r for _, r in pre_files)
    pre = pieces(pre_files, batch_rows, ord0=-n_pre) if n_pre else []
    for i, p in enumerate(pre):
        pre[i] = Piece(len(stream) + i, p.path, p.start, p.rows, p.ord0)
    work = _dataset(stream + pre)
    stats: dict = {"num_cpus": info["num_cpus"], "pieces": len(stream)}
    t0 = time.perf_counter()

    if method == "exact":
        rows = work.map_batches(_exact_rows, batch_size=1, batch_format="pyarrow",
                                fn_args=(columns, parts))
        out = rows.groupby("part", num_partitions=parts).map_groups(_exact_dups, batch_format="numpy")
        (dropped,) = _columns(out, "ord")
    elif method == "minhash":
        a, b, stats = _minhash_pairs(work, cfg, columns, parts, stats)
        dropped, stats["components"] = keep_first(a, b)
    else:
        a, b, stats = _semantic_pairs(work, cfg, columns, parts, info, stats)
        dropped, stats["components"] = keep_first(a, b)
    dropped = np.sort(dropped[dropped >= 0])
    stats["find_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()

    ref = ray.put(dropped)
    written = _dataset(stream).map_batches(
        _write_piece, batch_size=1, batch_format="pyarrow",
        fn_args=(ref, REASONS[method], str(stage), had_reason)).take_all()
    written.sort(key=lambda r: r["piece"])
    stats["write_seconds"] = round(time.perf_counter() - t0, 2)
    reasons: Counter = Counter()
    for r in written:
        for part in filter(None, r["reasons"].split(";")):
            k, v = part.rsplit("=", 1)
            reasons[k] += int(v)
    return {"records": sum(p.rows for p in stream), "kept": sum(r["kept"] for r in written),
            "dropped": dict(sorted(reasons.items())),
            "kept_files": [r["kept_file"] for r in written if r["kept_file"]],
            "rejects_files": [r["rejects_file"] for r in written if r["rejects_file"]],
            "ray": stats}


def _columns(ds, *names: str) -> list[np.ndarray]:
    """Int64 columns of a dataset, gathered on the driver in one execution."""
    got: dict = {n: [] for n in names}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for n in names:
            got[n].append(b[n])
    return [np.concatenate(got[n]).astype(np.int64) if got[n] else np.zeros(0, np.int64) for n in names]


def _minhash_pairs(work, cfg, columns, parts, stats):
    import ray

    from synthloop.filters.lsh import signature_cut

    t = time.perf_counter()
    rows = work.map_batches(_minhash_rows, batch_size=1, batch_format="pyarrow",
                            fn_args=(columns, cfg, minhasher(cfg))).materialize()
    stats["hash_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    cand = (rows.map_batches(_explode, batch_size=None, batch_format="pyarrow", fn_args=(parts,))
            .groupby("part", num_partitions=parts).map_groups(_candidate_pairs, batch_format="numpy"))
    a, b = _columns(cand, "a", "b")
    key = np.unique(a * (1 << 32) + (b - a))      # the same pair comes from several bands
    a, b = key >> 32, (key >> 32) + (key & 0xFFFFFFFF)
    stats["candidate_pairs"] = int(a.size)
    stats["candidates_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    if a.size == 0:
        stats["verified_pairs"] = 0
        return a, b, stats
    # every pair goes to bucket a % parts; each row's check data travels once to every bucket
    # holding one of its pairs (a hash-partitioned group-by, no join of the whole table)
    bucket = a % parts
    dest = np.unique(np.concatenate([a, b]) * parts + np.concatenate([bucket, bucket]))
    dest_ref = ray.put((dest // parts, dest % parts))
    pairs_ref = ray.put((a, b, bucket))
    cut = signature_cut(cfg.threshold, cfg.num_perm, cfg.check_margin)
    ver = (rows.map_batches(_route, batch_size=None, batch_format="pyarrow", fn_args=(dest_ref,))
           .groupby("bucket", num_partitions=parts)
           .map_groups(_verify_bucket, batch_format="pyarrow",
                       fn_args=(pairs_ref, cfg.verify, float(cfg.threshold), cut)))
    a, b = _columns(ver, "a", "b")
    stats["verified_pairs"] = int(a.size)
    stats["verify_seconds"] = round(time.perf_counter() - t, 2)
    return a, b, stats


def _semantic_pairs(work, cfg, columns, parts, info, stats):
    from synthloop.filters.embed_dedup import _EPS, kmeans_assign

    emb = work.map_batches(_Encoder, batch_size=1, batch_format="pyarrow",
                           fn_constructor_args=(columns, cfg), concurrency=info["num_cpus"]).materialize()
    sample = [b for b in emb.limit(20_000).iter_batches(batch_format="pyarrow", batch_size=None)]
    flat = np.concatenate([_unpacked(b["emb"], np.float32)[0] for b in sample]) if sample else np.zeros(0, np.float32)
    n = emb.count()
    dim = flat.size // max(sum(b.num_rows for b in sample), 1)
    vecs = flat.reshape(-1, dim) if dim else np.zeros((0, 1), np.float32)
    k = cfg.n_clusters if cfg.n_clusters > 0 else max(1, int(math.sqrt(max(n, 1)) / 4))
    assign = kmeans_assign(vecs, k, cfg.seed, 20) if len(vecs) else np.zeros(0, np.int64)
    cents = np.stack([vecs[assign == c].mean(axis=0) for c in np.unique(assign)]) if len(vecs) \
        else np.zeros((1, 1))
    cents = (cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    reach = 2 * math.acos(max(-1.0, min(1.0, cfg.threshold - _EPS))) + 1e-4
    members = emb.map_batches(_assign, batch_size=None, batch_format="pyarrow", fn_args=(cents, reach))
    pairs = members.groupby("cluster", num_partitions=parts).map_groups(
        _cluster_pairs, batch_format="numpy", fn_args=(float(cfg.threshold),))
    a, b = _columns(pairs, "a", "b")
    key = np.unique(a * (1 << 32) + (b - a)) if a.size else np.zeros(0, np.int64)
    stats.update(clusters=int(len(cents)), replicas_per_row=round(members.count() / max(n, 1), 2))
    a, b = key >> 32, (key >> 32) + (key & 0xFFFFFFFF)
    stats["verified_pairs"] = int(a.size)
    return a, b, stats
