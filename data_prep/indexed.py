"""Megatron's mmap indexed dataset (.bin/.idx), written with numpy.

Byte-identical to megatron-core's `IndexedDatasetBuilder` (and NeMo's) for one sequence per
document, which is what `preprocess_data_for_megatron.py` writes for `--json-keys text` without
sentence splitting. Layout (NEMO_FORMATS.md section 3): .bin = tokens back to back; .idx = header,
sizes int32[N], byte pointers int64[N], document index int64[N+1].
"""
from __future__ import annotations

import os
import struct
from array import array
from typing import Optional, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}


def token_dtype(vocab_size: Optional[int]):
    """Megatron's rule (DType.optimal_dtype / NeMo's best_fitting_dtype)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class MMapIndexedWriter:
    """Appends documents (one sequence each) to `<prefix>.bin` and writes `<prefix>.idx` on `finish`.

    Both go to tmp names; `finish` renames them into place, `abort` removes them. Only the
    per-document sizes stay in memory (4 bytes a document), as in megatron-core.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._tag = f".tmp-{os.getpid()}"
        self._bin = open(bin_path(prefix) + self._tag, "wb")
        self._sizes = array("i")  # 4 bytes a document, however they are appended

    def add_batch(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """`tokens`: the concatenated documents of a batch; `sizes`: their lengths (none zero)."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.frombytes(np.asarray(sizes, dtype=np.int32).tobytes())

    def add_document(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.add_batch(arr, np.array([arr.size], dtype=np.int32))

    @property
    def sizes(self) -> np.ndarray:
        return np.frombuffer(self._sizes, dtype=np.int32).copy() if self._sizes else np.zeros(0, np.int32)

    def finish(self) -> np.ndarray:
        self._bin.close()
        sizes = self.sizes
        n = len(sizes)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path(self.prefix) + self._tag, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())  # one sequence per document
        os.replace(bin_path(self.prefix) + self._tag, bin_path(self.prefix))
        os.replace(idx_path(self.prefix) + self._tag, idx_path(self.prefix))
        return sizes

    def abort(self) -> None:
        """Never raises: on a full disk the close fails too (its flush), and the files must still go."""
        try:
            self._bin.close()
        except OSError:
            pass
        finally:
            for p in (bin_path(self.prefix) + self._tag, idx_path(self.prefix) + self._tag):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass


def read_index(prefix: str):
    """(dtype, sizes, pointers, doc_idx) of an .idx file; for checks and the report."""
    with open(idx_path(prefix), "rb") as f:
        assert f.read(9) == INDEX_HEADER, f"{idx_path(prefix)}: not a Megatron mmap index"
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        n, m = struct.unpack("<QQ", f.read(16))
        dtype = {v: k for k, v in DTYPE_CODES.items()}[code]
        sizes = np.frombuffer(f.read(4 * n), dtype="<i4")
        pointers = np.frombuffer(f.read(8 * n), dtype="<i8")
        doc_idx = np.frombuffer(f.read(8 * m), dtype="<i8")
    return dtype, sizes, pointers, doc_idx
