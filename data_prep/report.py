"""What the prep stage read, kept and dropped, and token statistics: the content of report.json."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List

import numpy as np

# Line numbers kept per (reason, source): enough to find and fix a bad file, bounded on a huge one.
MAX_LINES_PER_REASON = 1000


class DropLog:
    """Counts dropped records by reason, keeping where they were (source file or split, 1-based line)."""

    def __init__(self, max_lines: int = MAX_LINES_PER_REASON):
        self.max_lines = max_lines
        self.counts: Dict[str, int] = OrderedDict()
        self.where: Dict[str, Dict[str, List[int]]] = OrderedDict()

    def add(self, reason: str, source: str, line: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.where.setdefault(reason, OrderedDict()).setdefault(source, [])
        if len(lines) < self.max_lines:
            lines.append(int(line))

    def merge(self, other: "DropLog") -> None:
        for reason, by_source in other.where.items():
            for source, lines in by_source.items():
                for line in lines:
                    self.add(reason, source, line)
            # counts beyond the kept line numbers
            extra = other.counts[reason] - sum(len(v) for v in by_source.values())
            if extra:
                self.counts[reason] = self.counts.get(reason, 0) + extra

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(self.counts),
            "lines": {r: dict(s) for r, s in self.where.items()},
            "lines_kept_per_reason_and_source": self.max_lines,
        }


def token_stats(sizes: np.ndarray) -> dict:
    """Per-document token counts (EOD included) -> summary numbers for report.json."""
    if len(sizes) == 0:
        return {"documents": 0, "tokens": 0}
    s = np.asarray(sizes, dtype=np.int64)
    return {
        "documents": int(len(s)),
        "tokens": int(s.sum()),
        "min": int(s.min()),
        "mean": round(float(s.mean()), 2),
        "p50": int(np.percentile(s, 50)),
        "p95": int(np.percentile(s, 95)),
        "p99": int(np.percentile(s, 99)),
        "max": int(s.max()),
    }


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
