"""The tokenizer inside a `.nemo` checkpoint: the hands-on's `tar -xvf`, done for the user.

A .nemo is a tar (uncompressed; older ones gzip) whose `./model_config.yaml` names its tokenizer
as `tokenizer.model: nemo:<member>`, the member being stored as `./<uuid hex>_<basename>`.
Only the tokenizer members are read, never the (multi-GB) weights. The reading (and what it
refuses: references that leave the archive, members over the size cap, oversized configs) is
modeling.nemo_io's, the one reader of .nemo archives and folders.
"""
from __future__ import annotations

from typing import Tuple

from modeling.nemo_io import NEMO_PREFIX, NemoArchive, NemoArchiveError  # noqa: F401 (re-exported)

# tokenizer keys that may hold files, in the order a reader needs them
_FILE_KEYS = ("model", "tokenizer_model", "vocab_file", "merge_file")


def read_model_config(nemo_path: str) -> dict:
    with NemoArchive(nemo_path) as a:
        return a.read_config()


def _library(tok_cfg: dict, file_name: str) -> str:
    lib = (tok_cfg.get("library") or "").lower()
    if lib in ("sentencepiece", "huggingface"):
        return lib
    return "sentencepiece" if file_name.endswith(".model") else "huggingface"


def extract_tokenizer(nemo_path: str, out_dir: str) -> Tuple[str, str]:
    """Extract the tokenizer file `model_config.yaml` points at into `out_dir`.

    Returns (path, library). The file keeps its member name (`<uuid>_<basename>`), as after the
    hands-on's `tar -xvf`, so the commands that follow it work on it unchanged.
    """
    import os

    with NemoArchive(nemo_path) as a:
        cfg = a.read_config()
        tok_cfg = cfg.get("tokenizer") or {}
        if not isinstance(tok_cfg, dict):
            raise NemoArchiveError(f"{os.path.join(nemo_path, 'model_config.yaml')}: tokenizer: expected a "
                                   f"mapping, got {tok_cfg!r}")
        refs = [(k, tok_cfg.get(k)) for k in _FILE_KEYS if isinstance(tok_cfg.get(k), str)]
        if not refs:
            raise ValueError(f"{nemo_path}: model_config.yaml has no tokenizer file "
                             f"(tokenizer: {tok_cfg})")
        key, ref = refs[0]
        os.makedirs(out_dir, exist_ok=True)
        dst = a.extract(ref, out_dir, key=f"tokenizer.{key}")
    return dst, _library(tok_cfg, dst)
