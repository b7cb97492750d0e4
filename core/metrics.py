"""Retrieval metrics: mAP@R through the FAISS binary index, with multi-label relevance."""

from __future__ import annotations

import numpy as np

from core.index import HammingIndex


def relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(nq, nd) bool: a database image is relevant when it shares a class with the query."""
    return (np.asarray(query_labels, np.float32) @ np.asarray(db_labels, np.float32).T) > 0


def average_precision(rel_sorted: np.ndarray) -> float:
    """AP of one ranked list of relevance flags (the DeepHash convention: 0 when none is relevant)."""
    rel = np.asarray(rel_sorted, dtype=np.float64)
    hits = rel.sum()
    if hits == 0:
        return 0.0
    prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((prec * rel).sum() / hits)


def ranked_ids(index: HammingIndex, query_codes, topk: int) -> list[np.ndarray]:
    """Per query, the ids of the topk nearest codes ordered by (Hamming distance, id).

    FAISS's top-k may cut a group of equal distances anywhere; the range search up to the k-th
    distance returns the whole group, so the cut follows the (distance, id) order exactly.
    """
    n = len(index)
    topk = n if topk is None or topk <= 0 else min(topk, n)
    if topk == n:
        groups = index.range_search(query_codes, index.bits + 1)
        return [g[0] for g in groups]
    _, d = index.search(query_codes, topk)
    out = []
    for q, kth in enumerate(d[:, -1]):
        ids, _ = index.range_search(query_codes[q : q + 1], int(kth) + 1)[0]
        out.append(ids[:topk])
    return out


def mean_average_precision(
    query_codes, query_labels, db_codes, db_labels, topk: int | None = None, db_ids=None
) -> float:
    """mAP@topk (None or 0: all) of ±1 codes, through a FAISS binary index.

    query_codes (nq, K) ±1, query_labels (nq, C) multi-hot, db_codes (nd, K) ±1, db_labels (nd, C).
    """
    query_codes = np.asarray(query_codes)
    db_codes = np.asarray(db_codes)
    index = HammingIndex(db_codes.shape[1])
    ids = np.arange(len(db_codes)) if db_ids is None else np.asarray(db_ids)
    index.add(db_codes, ids)
    pos = {int(v): j for j, v in enumerate(ids)} if db_ids is not None else None
    qlab = np.asarray(query_labels, np.float32)
    dlab = np.asarray(db_labels, np.float32)
    aps = []
    for q, r in enumerate(ranked_ids(index, query_codes, topk or 0)):
        rows = r if pos is None else np.array([pos[int(v)] for v in r], dtype=np.int64)
        rel = (dlab[rows] @ qlab[q]) > 0
        aps.append(average_precision(rel))
    return float(np.mean(aps)) if aps else 0.0


def brute_force_map(query_codes, query_labels, db_codes, db_labels, topk: int | None = None) -> float:
    """Reference mAP@topk with a plain stable sort by (distance, index): for tests."""
    q = np.asarray(query_codes, np.float64)
    d = np.asarray(db_codes, np.float64)
    dist = (q.shape[1] - q @ d.T) / 2
    rel = relevance(query_labels, db_labels)
    aps = []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")
        if topk:
            order = order[:topk]
        aps.append(average_precision(rel[i, order]))
    return float(np.mean(aps))
