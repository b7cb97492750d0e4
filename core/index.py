"""A thread-safe Hamming index over FAISS binary indexes with int64 ids (CPU, or GPU with a CPU fallback)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import faiss
import numpy as np
import torch


def pack_codes(codes) -> np.ndarray:
    """±1 codes (n, K) (tensor or array) -> packed bits (n, K/8) uint8 (bit set where code > 0)."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be (n, K) with K a multiple of 8, got {codes.shape}")
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed bits (n, K/8) uint8 -> ±1 float32 codes (n, K)."""
    b = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1)[:, :bits]
    return b.astype(np.float32) * 2 - 1


log = logging.getLogger(__name__)
#: the CPU fallback of a "gpu" index is logged once per process, not at every index a worker builds
_fallback_logged = False


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class HammingIndex:
    """K-bit codes with int64 ids: add, remove, top-k search (ids, Hamming distances), save/load.

    backend: "cpu" (IndexBinaryFlat under IndexBinaryIDMap2), "gpu" (GpuIndexBinaryFlat, which
    holds no ids: a position -> id array is kept beside it), or "auto" (GPU when available).
    Every method takes one lock: FAISS indexes are not thread-safe.
    """

    def __init__(self, bits: int, backend: str = "cpu") -> None:
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {bits}")
        self.bits = bits
        if backend == "auto":
            backend = "gpu" if gpu_available() else "cpu"
        if backend == "gpu" and not gpu_available():
            global _fallback_logged
            if not _fallback_logged:
                _fallback_logged = True
                why = ("this faiss has no GPU support (install the `gpu` extra, faiss-gpu)"
                       if not hasattr(faiss, "StandardGpuResources") else "faiss sees no GPU")
                log.warning("a GPU binary index was asked for but %s: the index stays on the CPU", why)
            backend = "cpu"
        self.backend = backend
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        if self.backend == "gpu":
            self._res = faiss.StandardGpuResources()
            self._index = faiss.GpuIndexBinaryFlat(self._res, self.bits)
            self._gpu_ids = np.zeros(0, dtype=np.int64)
            self._gpu_codes = np.zeros((0, self.bits // 8), dtype=np.uint8)
        else:
            self._index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self.bits))

    def __len__(self) -> int:
        with self._lock:
            return int(self._index.ntotal)

    @property
    def ntotal(self) -> int:
        return len(self)

    def add(self, codes, ids) -> None:
        """Adds ±1 codes (n, K) (or packed uint8 (n, K/8)) under int64 ids (n,).

        An id given twice in one call is refused (ValueError). The index does not look up the ids it already
        holds (FAISS keeps both copies of an id added twice, and a search would return that neighbour twice):
        callers keep ids unique, as the worker's replica does.
        """
        packed = self._as_packed(codes)
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids) != len(packed):
            raise ValueError(f"{len(packed)} codes but {len(ids)} ids")
        if len(ids) == 0:
            return
        if len(ids) > 1:
            ordered = np.sort(ids)
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            if len(repeated):
                raise ValueError(f"ids must be unique: {len(repeated)} repeated in one add (first {int(repeated[0])})")
        with self._lock:
            if self.backend == "gpu":
                self._index.add(packed)
                self._gpu_ids = np.concatenate([self._gpu_ids, ids])
                self._gpu_codes = np.concatenate([self._gpu_codes, packed])
            else:
                self._index.add_with_ids(packed, ids)

    def remove(self, ids) -> int:
        """Removes the given ids; returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        with self._lock:
            if self.backend == "gpu":
                keep = ~np.isin(self._gpu_ids, ids)
                removed = int((~keep).sum())
                if removed:
                    kept_ids, kept_codes = self._gpu_ids[keep], self._gpu_codes[keep]
                    self._reset()
                    self.add(kept_codes, kept_ids)
                return removed
            return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, codes, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k: (ids (n, k) int64, distances (n, k) int32); -1 ids and distance bits+1 pad missing rows.

        The distances are exact. The k results are ordered by (distance, id); when more codes than fit tie at
        the k-th distance, which of them are returned is FAISS's choice, not the lowest ids
        (:meth:`range_search` returns every code within a distance).
        """
        packed = self._as_packed(codes)
        n = len(packed)
        with self._lock:
            total = int(self._index.ntotal)
            kk = min(k, total)
            if n == 0 or kk == 0:
                return np.full((n, k), -1, np.int64), np.full((n, k), self.bits + 1, np.int32)
            d, i = self._index.search(packed, kk)
            if self.backend == "gpu":
                i = np.where(i >= 0, self._gpu_ids[np.clip(i, 0, None)], -1)
        d = d.astype(np.int32)
        i = i.astype(np.int64)
        order = _order_by_distance_then_id(d, i)
        d = np.take_along_axis(d, order, 1)
        i = np.take_along_axis(i, order, 1)
        if kk < k:
            d = np.concatenate([d, np.full((n, k - kk), self.bits + 1, np.int32)], 1)
            i = np.concatenate([i, np.full((n, k - kk), -1, np.int64)], 1)
        return i, d

    def range_search(self, codes, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids, distances) of every code at Hamming distance < radius, sorted by (distance, id)."""
        packed = self._as_packed(codes)
        with self._lock:
            if self.backend == "gpu":
                raise NotImplementedError("range search runs on the CPU index")
            lims, d, i = self._index.range_search(packed, int(radius))
        out = []
        for q in range(len(packed)):
            dd, ii = d[lims[q] : lims[q + 1]].astype(np.int32), i[lims[q] : lims[q + 1]].astype(np.int64)
            o = np.lexsort((ii, dd))
            out.append((ii[o], dd[o]))
        return out

    def reconstruct(self, ids) -> np.ndarray:
        """Packed codes (n, K/8) of stored ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            if self.backend == "gpu":
                pos = {int(v): j for j, v in enumerate(self._gpu_ids)}
                return self._gpu_codes[[pos[int(v)] for v in ids]]
            return np.stack([self._index.reconstruct(int(v)) for v in ids]) if len(ids) else np.zeros(
                (0, self.bits // 8), np.uint8
            )

    def ids(self) -> np.ndarray:
        with self._lock:
            if self.backend == "gpu":
                return self._gpu_ids.copy()
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def save(self, path: str | Path) -> None:
        """Writes the index (as a CPU ID-mapped index) to path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.backend == "gpu":
                cpu = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self.bits))
                if len(self._gpu_ids):
                    cpu.add_with_ids(self._gpu_codes, self._gpu_ids)
            else:
                cpu = self._index
            tmp = path.with_suffix(path.suffix + ".tmp")
            faiss.write_index_binary(cpu, str(tmp))
            tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, backend: str = "cpu") -> "HammingIndex":
        cpu = faiss.read_index_binary(str(path))
        if not isinstance(cpu, faiss.IndexBinaryIDMap2):
            cpu = faiss.downcast_IndexBinary(cpu)
        out = cls(cpu.d, backend)
        ids = faiss.vector_to_array(cpu.id_map).astype(np.int64)
        if out.backend == "gpu":
            codes = np.stack([cpu.reconstruct(int(v)) for v in ids]) if len(ids) else np.zeros((0, cpu.d // 8), np.uint8)
            out.add(codes, ids)
        else:
            out._index = cpu
        return out

    def _as_packed(self, codes) -> np.ndarray:
        if isinstance(codes, np.ndarray) and codes.dtype == np.uint8 and codes.ndim == 2 and codes.shape[1] == self.bits // 8:
            return np.ascontiguousarray(codes)
        packed = pack_codes(codes)
        if packed.shape[1] != self.bits // 8:
            raise ValueError(f"codes have {packed.shape[1] * 8} bits, index has {self.bits}")
        return np.ascontiguousarray(packed)


def _order_by_distance_then_id(d: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Row-wise argsort by (distance, id); missing (-1) ids last."""
    key_i = np.where(i < 0, np.iinfo(np.int64).max, i)
    return np.lexsort((key_i, d), axis=-1)


def hamming_distances(a, b) -> np.ndarray:
    """Brute-force Hamming distances between ±1 codes a (n, K) and b (m, K): (n, m) int."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return ((a.shape[1] - a @ b.T) / 2).round().astype(np.int64)
