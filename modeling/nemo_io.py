"""`.nemo` archives (NEMO_FORMATS.md section 2): read in place, write atomically.

Reading never unpacks the archive: members are opened inside the tar (`tarfile.extractfile` gives a
seekable view of an uncompressed member, which is what `torch.load` needs for the zip-format
checkpoint), so a 9 GB GPT-2B-001 archive costs no temp disk. An extracted directory is read with
`torch.load(mmap=True)`.

Writing produces NeMo's layout: `./model_config.yaml`, `./model_weights.ckpt` (a `torch.save`d
state dict with legacy `model.` keys) and the tokenizer as `./<uuid4hex>_<basename>`, referenced
from the config as `nemo:<that name>`.
"""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
import uuid
from typing import IO, Any, Dict, List, Optional

import torch
import yaml

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
# Single-rank spellings NeMo has used for the weights; tp>1 / pp>1 archives hold several and are refused.
_WEIGHTS_CANDIDATES = (WEIGHTS_NAME, "mp_rank_00/" + WEIGHTS_NAME, "tp_rank_00_pp_rank_000/" + WEIGHTS_NAME)


def _norm(name: str) -> str:
    return name[2:] if name.startswith("./") else name


class NemoArchive:
    """A `.nemo` tar (plain or gzip) or an extracted directory, with members addressed by their
    names without the leading `./`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.is_dir = os.path.isdir(self.path)
        self._tar: Optional[tarfile.TarFile] = None
        self._members: Dict[str, Any] = {}
        if self.is_dir:
            for root, _, files in os.walk(self.path):
                for f in files:
                    full = os.path.join(root, f)
                    self._members[os.path.relpath(full, self.path).replace(os.sep, "/")] = full
        else:
            try:  # NeMo writes uncompressed tars; older archives are gzip
                self._tar = tarfile.open(self.path, "r:")
            except tarfile.ReadError:
                self._tar = tarfile.open(self.path, "r:gz")
            self._members = {_norm(m.name): m for m in self._tar.getmembers() if m.isfile()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def names(self) -> List[str]:
        return sorted(self._members)

    def __contains__(self, name: str) -> bool:
        return _norm(name) in self._members

    def open(self, name: str) -> IO[bytes]:
        name = _norm(name)
        if name not in self._members:
            raise FileNotFoundError(f"{self.path}: no member {name!r} (members: {', '.join(self.names())})")
        if self.is_dir:
            return open(self._members[name], "rb")
        return self._tar.extractfile(self._members[name])

    def read_config(self) -> Dict[str, Any]:
        with self.open(CONFIG_NAME) as f:
            return yaml.safe_load(f) or {}

    def weights_member(self) -> str:
        if any(n.startswith(("mp_rank_01/", "tp_rank_01_")) for n in self._members):
            raise NotImplementedError(f"{self.path}: tensor/pipeline-parallel checkpoint; only tp1/pp1 is supported")
        for cand in _WEIGHTS_CANDIDATES:
            if cand in self._members:
                return cand
        if any(n.startswith("model_weights/") for n in self._members):
            raise NotImplementedError(f"{self.path}: megatron-core distributed checkpoint (model_weights/); "
                                      "only the legacy single-file model_weights.ckpt is supported")
        raise FileNotFoundError(f"{self.path}: no {WEIGHTS_NAME} among {self.names()}")

    def load_weights(self, shapes_only: bool = False) -> Dict[str, torch.Tensor]:
        """The checkpoint's state dict (CPU tensors; mmap'd for directories). shapes_only returns
        meta tensors without reading the tensor bytes (sizing a model without loading it)."""
        name = self.weights_member()
        if shapes_only:
            with self.open(name) as f, torch.serialization.skip_data():
                return torch.load(f, map_location="meta", weights_only=True)
        if self.is_dir:
            return torch.load(self._members[name], map_location="cpu", mmap=True, weights_only=True)
        with self.open(name) as f:
            return torch.load(f, map_location="cpu", weights_only=True)

    def resolve(self, ref: str) -> str:
        """`nemo:<name>` -> the member name, failing clearly when the archive lacks it."""
        name = ref[len("nemo:"):] if ref.startswith("nemo:") else ref
        if name not in self:
            raise FileNotFoundError(f"{self.path}: config references {ref!r} but the archive has no such member "
                                    f"(members: {', '.join(self.names())})")
        return _norm(name)

    def extract(self, ref: str, dest: str) -> str:
        """Copy one member (`nemo:<name>` or a plain name) to `dest` (a directory or a file path)."""
        name = self.resolve(ref)
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(name))
        with self.open(name) as src, open(dest + ".tmp", "wb") as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)
        os.replace(dest + ".tmp", dest)
        return dest


def extract_member(nemo_path: str, ref: str, dest: str) -> str:
    """Extract one member (e.g. the `nemo:` tokenizer of model_config.yaml) to a path."""
    with NemoArchive(nemo_path) as a:
        return a.extract(ref, dest)


def _tarinfo(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, mode, int(time.time())
    return ti


def write_nemo(path: str, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
               artifacts: Optional[Dict[str, str]] = None) -> str:
    """Write a `.nemo` atomically (tmp file in the destination directory, then os.replace).

    artifacts: {member name: source file}. The weights are saved to a temp file first because a
    tar header needs the member's size before its bytes (NeMo itself tars a temp directory)."""
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp_tar = tempfile.mkstemp(prefix=".tmp_", suffix=".nemo", dir=out_dir)
    os.close(fd)
    fd, tmp_ckpt = tempfile.mkstemp(prefix=".tmp_", suffix=".ckpt", dir=out_dir)
    os.close(fd)
    try:
        torch.save(state_dict, tmp_ckpt)
        cfg_bytes = yaml.safe_dump(config, sort_keys=False).encode()
        with tarfile.open(tmp_tar, "w:") as tar:
            root = tarfile.TarInfo(".")
            root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(root)
            tar.addfile(_tarinfo("./" + CONFIG_NAME, len(cfg_bytes)), io.BytesIO(cfg_bytes))
            with open(tmp_ckpt, "rb") as f:
                tar.addfile(_tarinfo("./" + WEIGHTS_NAME, os.path.getsize(tmp_ckpt)), f)
            for name, src in (artifacts or {}).items():
                with open(src, "rb") as f:
                    tar.addfile(_tarinfo("./" + name, os.path.getsize(src)), f)
        os.replace(tmp_tar, path)
    finally:
        for p in (tmp_ckpt, tmp_tar):
            if os.path.exists(p):
                os.remove(p)
    return path


def artifact_name(src: str) -> str:
    """NeMo's artifact naming: `<uuid4 hex>_<basename>`."""
    return f"{uuid.uuid4().hex}_{os.path.basename(src)}"
