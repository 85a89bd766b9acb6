"""JSONL -> Megatron mmap (.bin/.idx): what NeMo's `preprocess_data_for_megatron.py` does, streamed
and batch-encoded.

The reference scripts encode one document per call across a process pool and hand each through
`torch.IntTensor` to the builder; here the input is read in fixed-size chunks, each chunk is encoded
in one call (sentencepiece's own threads, `workers` of them, which release the GIL) while the main
thread parses the next chunk, and tokens go to disk as one numpy array per chunk. Chunks are
processed in order, so the output is the same for any worker count; at most two chunks are in
memory, whatever the input size.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from data_prep.errors import PrepError
from data_prep.indexed import MMapIndexedWriter, token_dtype
from data_prep.report import DropLog, token_stats

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # input bytes per encode call: large enough to amortize, small in memory


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Tuple[int, List[bytes]]]:
    """(first line number, raw lines) in chunks of about `chunk_bytes`."""
    with open(path, "rb") as f:
        line_no = 1
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                return
            yield line_no, lines
            line_no += len(lines)


def parse_chunk(first_line: int, lines: List[bytes], json_key: str, label: str,
                drops: DropLog) -> List[str]:
    texts = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            text = json.loads(raw)[json_key]
        except ValueError:  # bad JSON or bad UTF-8
            drops.add("bad_json", label, first_line + i)
            continue
        except (KeyError, TypeError):
            drops.add(f"missing_{json_key}", label, first_line + i)
            continue
        if not isinstance(text, str):
            drops.add(f"{json_key}_not_a_string", label, first_line + i)
            continue
        texts.append(text)
    return texts


def ids_to_arrays(ids: List[List[int]], eod: Optional[int], dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Encoded documents -> (concatenated tokens, per-document sizes), empty documents dropped and
    EOD appended to the rest, as NeMo/Megatron do."""
    docs = [d for d in ids if d]
    if eod is not None:
        for d in docs:
            d.append(eod)
    sizes = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(sizes.sum()))
    return tokens, sizes


def jsonl_to_mmap(input_path: str, output_prefix: str, tokenizer, json_key: str = "text",
                  workers: int = 2, append_eod: bool = True, drops: Optional[DropLog] = None,
                  chunk_bytes: int = CHUNK_BYTES, progress: bool = True) -> dict:
    """Tokenize `input_path` (JSONL, one document per line) into `{output_prefix}.bin/.idx`.

    `tokenizer` is a data_prep.tokenizers tokenizer. Returns stats for report.json.
    """
    t0 = time.time()
    drops = drops if drops is not None else DropLog()
    dtype = token_dtype(tokenizer.vocab_size)
    eod = tokenizer.eos_id if append_eod else None
    label = os.path.basename(input_path)
    writer = MMapIndexedWriter(output_prefix, dtype)
    empty = 0
    bar = tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenize {label}", mininterval=1.0, smoothing=0.1)
    tokens_done = 0
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None  # (future of encoded ids, number of bytes in its chunk)

            def drain(p):
                nonlocal empty, tokens_done
                ids = p[0].result()
                empty += sum(1 for d in ids if not d)
                tokens, sizes = ids_to_arrays(ids, eod, dtype)
                writer.add_batch(tokens, sizes)
                tokens_done += tokens.size
                bar.update(p[1])
                bar.set_postfix_str(f"{tokens_done / max(time.time() - t0, 1e-9) / 1e6:.2f}M tok/s",
                                    refresh=False)

            for first, lines in read_chunks(input_path, chunk_bytes):
                texts = parse_chunk(first, lines, json_key, label, drops)
                nbytes = sum(map(len, lines))
                # encode this chunk in the background while the previous one is written
                fut = pool.submit(tokenizer.encode_batch, texts, workers)
                if pending is not None:
                    drain(pending)
                pending = (fut, nbytes)
            if pending is not None:
                drain(pending)
        if not len(writer.sizes):  # Megatron cannot even mmap an empty .bin: say why here, not in rm
            raise PrepError(f"{input_path}: no document to tokenize (dropped: {dict(drops.counts) or 'none'}; "
                            f"{empty} documents encode to no tokens); nothing was written")
        sizes = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if empty:
        log.warning("%s: %d documents encode to no tokens; skipped (as Megatron does)", label, empty)
    seconds = time.time() - t0
    stats = token_stats(sizes)
    stats.update({"empty_documents_skipped": empty, "dtype": np.dtype(dtype).name,
                  "append_eod": bool(append_eod), "eod_id": eod, "seconds": round(seconds, 3),
                  "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9))})
    log.info("%s -> %s.{bin,idx}: %d documents, %d tokens, %.1fs", label, output_prefix,
             stats["documents"], stats["tokens"], seconds)
    return stats
