"""The tokenizer inside a `.nemo` checkpoint: the hands-on's `tar -xvf`, done for the user.

A .nemo is a tar (uncompressed; older ones gzip) whose `./model_config.yaml` names its tokenizer
as `tokenizer.model: nemo:<member>`, the member being stored as `./<uuid hex>_<basename>`.
Only the tokenizer members are read, never the (multi-GB) weights.
"""
from __future__ import annotations

import os
import shutil
import tarfile
from typing import Optional, Tuple

import yaml

NEMO_PREFIX = "nemo:"
# tokenizer keys that may hold files, in the order a reader needs them
_FILE_KEYS = ("model", "tokenizer_model", "vocab_file", "merge_file")


def _open_tar(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError:
        return tarfile.open(path, "r:gz")


def _bare(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _find_member(tar: tarfile.TarFile, name: str) -> Optional[tarfile.TarInfo]:
    """Members are `./x` when written with arcname="."; references may omit the `./`."""
    want = _bare(name)
    for m in tar:  # iterating stops reading headers once found (no scan of a 9 GB tar's tail)
        if m.isfile() and _bare(m.name) == want:
            return m
    return None


def read_model_config(nemo_path: str) -> dict:
    if os.path.isdir(nemo_path):
        with open(os.path.join(nemo_path, "model_config.yaml"), encoding="utf-8") as f:
            return yaml.safe_load(f)
    with _open_tar(nemo_path) as tar:
        member = _find_member(tar, "./model_config.yaml")
        if member is None:
            raise ValueError(f"{nemo_path}: no model_config.yaml; is this a .nemo checkpoint?")
        return yaml.safe_load(tar.extractfile(member))


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
    cfg = read_model_config(nemo_path)
    tok_cfg = cfg.get("tokenizer") or {}
    refs = [(k, tok_cfg.get(k)) for k in _FILE_KEYS if isinstance(tok_cfg.get(k), str)]
    if not refs:
        raise ValueError(f"{nemo_path}: model_config.yaml has no tokenizer file "
                         f"(tokenizer: {tok_cfg})")
    key, ref = refs[0]
    name = ref[len(NEMO_PREFIX):] if ref.startswith(NEMO_PREFIX) else ref
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, os.path.basename(name))
    if os.path.isdir(nemo_path):
        src = os.path.join(nemo_path, _bare(name))
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{nemo_path}: tokenizer.{key} = {ref} is not in the folder")
        shutil.copyfile(src, dst + ".tmp")
    else:
        with _open_tar(nemo_path) as tar:
            member = _find_member(tar, name)
            if member is None:
                names = [m.name for m in tar.getmembers() if not m.name.endswith(".ckpt")]
                raise FileNotFoundError(f"{nemo_path}: tokenizer.{key} = {ref} is not in the "
                                        f"archive (members: {names[:20]})")
            with tar.extractfile(member) as src, open(dst + ".tmp", "wb") as out:
                shutil.copyfileobj(src, out)
    os.replace(dst + ".tmp", dst)
    return dst, _library(tok_cfg, dst)
