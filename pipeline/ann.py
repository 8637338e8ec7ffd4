"""Approximate nearest-neighbour index for big galleries: faiss IVF over inner product.

The gallery keeps every template as an exact float32 row; this index only proposes a small
candidate pool of template ids, which the gallery re-scores exactly before aggregating per
subject. So the index may be lossy (8-bit scalar-quantised codes, a quarter of the float32
size) without changing any score the match decision sees: an approximation can only *miss* a
template, never mis-score one.

Why IVF rather than HNSW: on this 2-core machine an IVF with 4*sqrt(N) lists trains and fills
1M templates in well under a minute, supports cheap ``remove_ids`` (with a hash-table direct
map) and searches one probe in under a millisecond at nprobe 64; graph indexes build for
many minutes on 2 cores and cannot delete in place. See docs/gallery.md for the measurements.

Threading: faiss searches may run concurrently with each other but not with ``add`` or
``remove``; the gallery serialises them with its lock. ``IvfIndex`` itself has no lock.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from pipeline.types import FloatArray

Codec = Literal["sq8", "flat"]
IdArray = npt.NDArray[np.int64]

# k-means iterations for the coarse quantiser. Ten is faiss' own IVF default; more barely moves
# recall on face-like data but costs training time proportionally.
TRAIN_ITERATIONS = 10
# faiss wants at least 39 training points per list; 40 keeps training about 25 s at 1M.
TRAIN_POINTS_PER_LIST = 40
MIN_LISTS = 16

# One OpenMP thread for every faiss call in this process. Serving handles one probe (or one
# enrolment's few templates) at a time, which threads cannot speed up, while an OpenMP team
# spin-waits for its members: on the 2-core machine shared with the video pipeline a 3-vector
# add took 25 ms with 2 threads and 0.04 ms with 1, and training was 3x slower too.
faiss.omp_set_num_threads(1)


def lists_for(n: int, factor: float) -> int:
    """Number of inverted lists for ``n`` templates: ``factor * sqrt(n)``.

    About sqrt(N) lists balances the two costs of a probe (comparing against every centroid,
    then scanning ``nprobe`` lists of ~N/nlist codes); a factor of 4 trades a little centroid
    time for shorter lists, so a fixed nprobe scans fewer codes. Capped so that every list
    gets ``TRAIN_POINTS_PER_LIST`` training points, and at least ``MIN_LISTS``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return max(MIN_LISTS, min(round(factor * math.sqrt(n)), n // TRAIN_POINTS_PER_LIST))


class IvfIndex:
    """A trained faiss IVF index (inner product) over template ids; see the module doc."""

    def __init__(self, index: faiss.Index, nlist: int, codec: Codec) -> None:
        self._index = index
        self.nlist = nlist
        self.codec: Codec = codec
        self.dim = int(index.d)

    @classmethod
    def train(cls, sample: FloatArray, nlist: int, codec: Codec = "sq8") -> IvfIndex:
        """A new, empty index whose centroids (and SQ8 ranges) are learnt from ``sample``."""
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[0] < nlist:
            raise ValueError(f"need at least nlist={nlist} training vectors, got {sample.shape}")
        spec = f"IVF{nlist},{'SQ8' if codec == 'sq8' else 'Flat'}"
        index = faiss.index_factory(sample.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = TRAIN_ITERATIONS
        ivf.cp.seed = 1234  # reproducible builds
        index.train(sample)
        # A hash-table direct map makes remove_ids cost O(removed) instead of a scan of
        # every list (the default array map cannot remove at all).
        hashtable = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]  # not in the stubs
        ivf.set_direct_map_type(hashtable)
        return cls(index, nlist, codec)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: FloatArray, ids: IdArray) -> None:
        """Add unit vectors under the given (unique, not yet present) template ids."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: IdArray) -> int:
        """Remove template ids (absent ones are ignored); returns how many were removed.

        Their codes are zeroed, not only unlisted: faiss removes an entry by moving its
        list's last entry into its slot and shrinking the list, which leaves the last slot's
        code in memory past the list's end (an SQ8 code is the template to 8 bits, enough
        to match a face). So before each removal the entry's own code and that last slot
        are zeroed, and the moved code is put back after.
        """
        ivf = faiss.extract_index_ivf(self._index)
        lists: Any = ivf.invlists  # the faiss stubs lack most of InvertedLists
        direct = ivf.direct_map
        zeros = np.zeros(lists.code_size, dtype=np.uint8)  # kept alive: faiss reads it
        zero = faiss.swig_ptr(zeros)
        removed = 0
        for tid in np.unique(np.asarray(ids, dtype=np.int64)).tolist():
            try:
                at = direct.get(tid)
            except RuntimeError:  # not in the index
                continue
            list_no, offset = at >> 32, at & 0xFFFFFFFF  # faiss' lo_listno / lo_offset
            last = lists.list_size(list_no) - 1
            lists.update_entry(list_no, offset, tid, zero)
            if offset < last:
                moved_id = lists.get_single_id(list_no, last)
                ptr = lists.get_single_code(list_no, last)
                moved = faiss.rev_swig_ptr(ptr, lists.code_size).copy()
                lists.release_codes(list_no, ptr)
                lists.update_entry(list_no, last, moved_id, zero)
            removed += int(self._index.remove_ids(faiss.IDSelectorArray(np.array([tid]))))
            if offset < last:  # faiss moved (moved_id, zeros) into ``offset``
                lists.update_entry(list_no, offset, moved_id, faiss.swig_ptr(moved))
        return removed

    def search(self, probe: FloatArray, pool: int, nprobe: int) -> IdArray:
        """Ids of up to ``pool`` templates with the highest approximate inner product."""
        params = faiss.SearchParametersIVF()
        params.nprobe = min(nprobe, self.nlist)
        query = np.ascontiguousarray(probe, dtype=np.float32).reshape(1, self.dim)
        _, ids = self._index.search(query, pool, params=params)
        found: IdArray = ids[0]
        return found[found >= 0]

    def memory_bytes(self) -> int:
        """Approximate heap size: codes, ids, centroids and the id hash table."""
        per_vector = self.dim if self.codec == "sq8" else 4 * self.dim
        # codes + stored id (8) + direct-map hash entry (~16 with load factor)
        return len(self) * (per_vector + 8 + 16) + self.nlist * self.dim * 4
