"""Checks of the files a launch will read, made before anything runs: checkpoints that no reader takes
(a truncated download, a malformed `.nemo`), a tokenizer whose vocabulary does not fit the model's
embedding, a tokenizer vocab_size the training text cannot fill. Each problem names the key and the file.

The files are read with the kit's own readers (modeling.formats, data_prep.nemo_archive,
data_prep.tokenizers, modeling.checkpoint): what they refuse at run time is refused here, before the
stages ahead of the one that reads the file have run. Only small parts are read (a checkpoint's config
and tensor shapes, a tokenizer's vocabulary, the characters of the training text).
"""
from __future__ import annotations

import collections
import functools
import json
import os
import tarfile
from typing import List, Optional, Tuple

from modeling.formats import detect_format

# sentencepiece's byte-fallback BPE as data_prep.tokenizers.train_sentencepiece trains it: 256 byte
# pieces, unk/bos/eos/pad and the user-defined "\n" come before the corpus's characters (those that
# cover character_coverage of the text) and the merges
SPM_META_PIECES = 256 + 4 + 1
SPM_CHARACTER_COVERAGE = 0.9995
SPM_MAX_DOCUMENTS = 100_000  # train_sentencepiece reads only the first this many texts


def _stamp(path: str) -> Tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def checkpoint_problems(key: str, path: str) -> List[str]:
    """An existing path that no checkpoint reader takes: said now, not when the stage loads it."""
    try:
        fmt = detect_format(str(path))
    except (ValueError, OSError) as e:
        return [f"{key}={e}"]
    if fmt in ("nemo", "nemo_dir"):
        return [f"{key}={path}: {p}" for p in _nemo_problems(*_stamp(str(path)), fmt)]
    if fmt == "hf":
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    return [f"{key}={path}: config.json is not a JSON object"]
        except (OSError, ValueError) as e:
            return [f"{key}={path}: config.json cannot be read ({e})"]
    return []


@functools.lru_cache(maxsize=32)
def _nemo_problems(path: str, size: int, mtime: int, fmt: str) -> Tuple[str, ...]:
    """A .nemo's model_config.yaml must parse to a mapping (with a mapping for `tokenizer`); a plain tar
    must hold every member's bytes (a truncated download ends inside the weights)."""
    import yaml

    from data_prep.nemo_archive import read_model_config
    from modeling.nemo_io import NemoArchiveError

    try:
        cfg = read_model_config(path)
    except (tarfile.TarError, EOFError, OSError) as e:
        return (f"not a readable .nemo archive ({type(e).__name__}: {e})",)
    except yaml.YAMLError as e:
        return (f"model_config.yaml is not valid YAML ({str(e).splitlines()[0]})",)
    except NemoArchiveError as e:  # the archive reader's refusal names the file and what is wrong
        msg = str(e).splitlines()[0]
        for lead in (path + "/", path + ": "):  # the caller names the file already
            msg = msg[len(lead):] if msg.startswith(lead) else msg
        return (msg,)
    except Exception as e:  # noqa: BLE001 - a reader's refusal (too large, no config...): its words
        return (f"{type(e).__name__}: {e}",)
    cfg = {} if cfg is None else cfg  # an empty config reads as {} (modeling.nemo_io does the same)
    if not isinstance(cfg, dict):
        return (f"model_config.yaml holds a {type(cfg).__name__}, not a mapping of config keys",)
    for name in ("tokenizer", "optim", "data"):
        if name in cfg and cfg[name] is not None and not isinstance(cfg[name], dict):
            return (f"model_config.yaml: '{name}' holds a {type(cfg[name]).__name__}, not a mapping",)
    if fmt == "nemo":
        return tuple(_truncation(path, size))
    return ()


def _truncation(path: str, size: int) -> List[str]:
    try:
        tar = tarfile.open(path, "r:")  # a gzip .nemo would have to be decompressed whole: not checked
    except tarfile.ReadError:
        return []
    try:
        with tar:
            for m in tar:
                if m.isfile() and m.offset_data + m.size > size:
                    return [f"truncated: member {m.name} needs {m.offset_data + m.size} bytes, the file has {size} "
                            "(an interrupted download or copy?)"]
    except (tarfile.TarError, EOFError, OSError) as e:
        return [f"not a readable .nemo archive ({type(e).__name__}: {e})"]
    return []


@functools.lru_cache(maxsize=32)
def _model_vocab(path: str, size: int, mtime: int) -> Optional[int]:
    """The checkpoint's embedding rows (tensor shapes only: no weights are read)."""
    try:
        from modeling.checkpoint import load_config

        return load_config(path).vocab_size
    except Exception:  # noqa: BLE001 - a checkpoint that cannot be read is checkpoint_problems' to say
        return None


@functools.lru_cache(maxsize=32)
def _tokenizer_vocab(path: str, size: int, mtime: int, library: Optional[str]) -> Optional[int]:
    import tempfile

    from data_prep.tokenizers import load_tokenizer

    try:
        with tempfile.TemporaryDirectory(prefix="kit_tokenizer_check_") as tmp:
            return load_tokenizer(path, library, extract_dir=tmp).vocab_size
    except Exception:  # noqa: BLE001 - the prep stage says why a tokenizer cannot be loaded
        return None


def vocab_problems(cfg, stages) -> List[str]:
    """The tokenizer the training stages will use against the embedding of the checkpoint they restore:
    a larger vocabulary indexes past the embedding (IndexError mid-stage); a much smaller one is another
    model's tokenizer (the checkpoint's token ids would mean other text)."""
    restore = cfg.model.restore_from_path
    if not restore or str(restore).startswith(("pkg:", "nemo:", "hf:")) or not os.path.exists(str(restore)):
        return []  # random init (its vocab is the tokenizer's), or a path the other checks refuse
    tok = cfg.data.tokenizer
    if tok.model is not None and os.path.abspath(str(tok.model)) == os.path.abspath(str(restore)):
        return []  # the checkpoint's own tokenizer
    if tok.model is None and tok.library == "nemo":
        return []  # prep extracts the tokenizer of model.restore_from_path
    vocab = _model_vocab(*_stamp(str(restore)))
    if vocab is None:
        return []
    if tok.model is not None:
        if str(tok.model).startswith("pkg:") or not os.path.exists(str(tok.model)):
            return []
        size = _tokenizer_vocab(*_stamp(str(tok.model)), tok.library)
        what = f"data.tokenizer.model={tok.model}: its vocabulary has {size} tokens"
    else:
        size = tok.vocab_size
        what = f"data.tokenizer.vocab_size={size}: prep would train a new BPE of up to {size} tokens (data.tokenizer.model is null)"
    if size is None:
        return []
    where = f"the embedding of model.restore_from_path={restore} has {vocab} rows"
    if size > vocab:
        return [f"{what}, but {where}: token ids past {vocab - 1} do not fit (the stage would fail with an "
                "IndexError); use the checkpoint's own tokenizer (data.tokenizer.library=nemo for a .nemo)"]
    if vocab - size > max(128, vocab // 100):
        return [f"{what}, but {where}: a tokenizer of another model (the checkpoint's token ids would mean "
                "other text); use the checkpoint's own tokenizer (data.tokenizer.library=nemo for a .nemo)"]
    return []


def trainable_vocab_problems(cfg) -> List[str]:
    """prep trains a sentencepiece BPE of data.tokenizer.vocab_size when no tokenizer is given: it needs
    room for the byte pieces, the special pieces and every character of the text (sentencepiece's
    "Vocabulary size is smaller than required_chars" after the JSONL step ran). A vocab_size above what
    the text supports is lowered by prep itself (with a warning), so only the lower bound is checked."""
    tok = cfg.data.tokenizer
    if tok.model is not None or tok.library not in (None, "sentencepiece"):
        return []
    v = tok.vocab_size
    if v >= SPM_META_PIECES + 1000:  # no text of the kit's sources needs this many characters
        return []
    if v <= SPM_META_PIECES:
        return [f"data.tokenizer.vocab_size={v}: a byte-fallback BPE needs more than {SPM_META_PIECES} pieces "
                "(256 bytes, 4 special pieces, newline) plus one per character of the text"]
    need = _required_pieces(cfg.data)
    if need is not None and v < need:
        return [f"data.tokenizer.vocab_size={v}: the training text needs at least {need} pieces ({SPM_META_PIECES} "
                f"byte and special pieces + {need - SPM_META_PIECES} characters covering "
                f"{SPM_CHARACTER_COVERAGE:.2%} of it); set data.tokenizer.vocab_size={need} or more"]
    return []


def _required_pieces(data) -> Optional[int]:
    """sentencepiece's required_chars for the train split's dialogues, as train_sentencepiece sees them."""
    from data_prep.sources import iter_records

    if data.source not in ("sample", "local"):
        return None  # the hub: not read before prep runs
    counts: collections.Counter = collections.Counter()
    texts = 0
    try:
        for _, _, record in iter_records(data, "train"):
            if not isinstance(record, dict):
                continue
            for field in ("chosen", "rejected"):
                if isinstance(record.get(field), str):
                    counts.update(record[field])
                    texts += 1
            if texts >= SPM_MAX_DOCUMENTS or data.max_pairs and texts >= 2 * data.max_pairs:
                break
    except (OSError, ValueError):
        return None
    counts.pop("\n", None)  # a user-defined piece, counted among the meta pieces
    if " " in counts:
        counts["\u2581"] += counts.pop(" ")  # sentencepiece's whitespace symbol
    total, covered, chars = sum(counts.values()), 0, 0
    for _, n in counts.most_common():
        if covered >= SPM_CHARACTER_COVERAGE * total:
            break
        covered += n
        chars += 1
    return SPM_META_PIECES + chars if total else None
