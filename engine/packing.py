"""Sequence packing shared by every stage that packs: which sequences share a row of at most a token budget.

rm and dpo pack whole pairs (chosen and rejected together), sft packs samples, eval packs the sequences it
scores; all of them lay the chosen items end to end and attend block-diagonally (modeling.layers)."""
from typing import List

import numpy as np


def pack_balanced(indices: np.ndarray, lengths: np.ndarray, packed_tokens: int) -> List[np.ndarray]:
    """The fewest rows of at most `packed_tokens` tokens that a balanced greedy packing finds (longest item
    first into the least-filled row; more rows until none overflows). `lengths[k]` is item k's tokens; an item
    longer than the budget gets a row of its own. Deterministic: the same input gives the same rows."""
    idx = np.asarray(indices)
    if len(idx) == 0:
        return []
    order = idx[np.argsort(-lengths[idx], kind="stable")]
    big = [np.array([k]) for k in order if lengths[k] > packed_tokens]
    rest = [int(k) for k in order if lengths[k] <= packed_tokens]
    rows: List[List[int]] = []
    if rest:
        k = max(1, -(-int(lengths[rest].sum()) // packed_tokens))
        while True:
            rows, fill = [[] for _ in range(k)], np.zeros(k, np.int64)
            for p in rest:
                j = int(np.argmin(fill))
                rows[j].append(p)
                fill[j] += lengths[p]
            if fill.max() <= packed_tokens or k >= len(rest):
                break
            k += 1
    return big + [np.array(r, dtype=np.int64) for r in rows if r]
