"""Where HH records come from: the embedded sample, local HH-format files, or the Hugging Face Hub.

Every source yields `(source, line, record)` one at a time (memory stays flat), with `line` 1-based
in its file (or row number for the hub). A line that cannot become a record yields a `BadRecord`
instead of raising, so the caller counts it by reason and keeps going.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import socket
import zlib
from typing import Iterator, List, Tuple
from urllib.parse import urlparse

from data_prep.errors import PrepError

log = logging.getLogger(__name__)

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
SOURCES = ("sample", "local", "hub")
_warned = set()  # say once per file that it serves every split


class BadRecord:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


Record = Tuple[str, int, object]


def data_split(split: str) -> str:
    """HH has no validation split; the hands-on substitutes test (and says so)."""
    if split == "validation":
        log.warning("anthropic HHH has no validation set, so using test set instead")
        return "test"
    return split


def _cut(path: str, line: int, why: str, allow_truncated: bool) -> BadRecord:
    """A file that ends before its data does: the stage fails, unless the user keeps what was read."""
    if not allow_truncated:
        raise PrepError(f"{path}: unreadable after line {line}: {why}. The file is cut short or corrupt: fetch it "
                        f"again, or set data.allow_truncated_input=true to keep the {line} lines read")
    log.error("%s: unreadable after line %d: %s; keeping the lines read (data.allow_truncated_input=true)",
              path, line, why)
    return BadRecord("unreadable_file")


def read_jsonl(path: str, label: str = None, allow_truncated: bool = False) -> Iterator[Record]:
    """Lines of a .jsonl or .jsonl.gz file as records; bad lines become BadRecord, never exceptions.

    A file cut short (a gzip stream without its end, a bad CRC or length, a last line cut mid-record)
    raises PrepError, or with `allow_truncated` becomes one BadRecord("unreadable_file") after what was read."""
    label = label or path
    opener = gzip.open if path.endswith(".gz") else open
    line = 0
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines are not records (a trailing newline, say)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield label, line, BadRecord("bad_utf8")
                    continue
                try:
                    yield label, line, json.loads(text)
                except ValueError:
                    if not raw.endswith(b"\n"):  # only the file's last line can: cut mid-record
                        yield label, line, _cut(path, line - 1, f"line {line} ends mid-record", allow_truncated)
                    else:
                        yield label, line, BadRecord("bad_json")
    except (EOFError, OSError, zlib.error) as e:  # a cut or corrupt gzip
        yield label, line + 1, _cut(path, line, f"{type(e).__name__}: {e}", allow_truncated)


def split_files(data, split: str) -> List[str]:
    """The local/sample files that make up one split, in a fixed (sorted subset) order."""
    split = data_split(split)
    if data.source == "sample":
        return [os.path.join(SAMPLE_DIR, f"{split}.jsonl.gz")]
    if not data.path:
        raise ValueError("data.source=local needs data.path: a .jsonl[.gz] file (use {split} in the "
                         "name to pick a file per split) or a directory laid out as HH "
                         "(<subset>/train.jsonl.gz, <subset>/test.jsonl.gz)")
    path = os.path.abspath(os.path.expanduser(data.path))
    if "{split}" in path:
        path = path.replace("{split}", split)
    elif os.path.isfile(path) and path not in _warned:
        _warned.add(path)
        log.warning("data.path is one file: it is used for every split (%s now); put {split} in "
                    "its name to use one file per split", split)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={data.path!r} does not exist")
    here = _split_file(path, split)
    if here and not data.subsets:
        return [here]  # a single subset's folder
    subsets = list(data.subsets) or sorted(
        d for d in os.listdir(path) if _split_file(os.path.join(path, d), split))
    files = []
    for subset in subsets:
        f = _split_file(os.path.join(path, subset), split)
        if f is None:
            raise FileNotFoundError(f"{os.path.join(path, subset)}: no {split}.jsonl.gz or {split}.jsonl")
        files.append(f)
    if not files:
        raise FileNotFoundError(f"{path}: no <subset>/{split}.jsonl.gz (HH's layout) found")
    return files


def _split_file(folder: str, split: str):
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def iter_records(data, split: str) -> Iterator[Record]:
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r}: choose from {', '.join(SOURCES)}")
    if data.source == "hub":
        yield from _iter_hub(data, data_split(split))
        return
    for path in split_files(data, split):
        yield from read_jsonl(path, allow_truncated=data.allow_truncated_input)


def source_fingerprint(data, split: str) -> str:
    """Identity of a split's input: the content hash of local files, or the hub dataset's own."""
    h = hashlib.sha256()
    if data.source == "hub":
        for subset, ds in _hub_datasets(data, data_split(split)):
            h.update(f"{data.hub_name}/{subset}:{getattr(ds, '_fingerprint', '')}".encode())
        return h.hexdigest()
    for path in split_files(data, split):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _hub_reachable(timeout: float = 5.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(data) -> str:
    return (f"data.source=hub: cannot reach the Hugging Face Hub for {data.hub_name}. Offline, use "
            "data.source=local data.path=<a folder laid out as HH: harmless-base/train.jsonl.gz, "
            "harmless-base/test.jsonl.gz, ...> (or one .jsonl[.gz] file, {split} in its name for "
            "one file per split), or data.source=sample for the embedded sample. If the dataset "
            "is already in your datasets cache, set HF_HUB_OFFLINE=1.")


def _hub_datasets(data, split: str):
    import datasets  # heavy import, only for this source

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    # a local folder (or a mirror checkout) as hub_name needs no network
    if not offline and not os.path.isdir(data.hub_name) and not _hub_reachable():
        raise RuntimeError(_offline_message(data))
    subsets = list(data.subsets) or [None]  # None: the whole repo, as the hands-on loads it
    for subset in subsets:
        try:
            ds = datasets.load_dataset(data.hub_name, data_dir=subset, split=split)
        except ConnectionError as e:
            raise RuntimeError(_offline_message(data)) from e
        yield subset or "all", ds


def _iter_hub(data, split: str) -> Iterator[Record]:
    for subset, ds in _hub_datasets(data, split):
        label = f"{data.hub_name}/{subset}:{split}"
        for row, rec in enumerate(ds, 1):
            yield label, row, rec
