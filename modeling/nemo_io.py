"""`.nemo` archives (NEMO_FORMATS.md section 2): read in place, write atomically.

Reading never unpacks the archive: members are opened inside the tar (`tarfile.extractfile` gives a
seekable view of an uncompressed member, which is what `torch.load` needs for the zip-format
checkpoint), so a 9 GB GPT-2B-001 archive costs no temp disk. An extracted directory is read with
`torch.load(mmap=True)`. Headers are read only as far as the member asked for (the config is the
first member NeMo writes), so a gzip archive is not inflated to its end to read its config.

An archive is input from anywhere, so reading it cannot reach outside it or fill the disk: a
`nemo:` reference must name a member inside (no absolute path, no `..`, no link out of an extracted
folder); a member copied out is at most RLHF_KIT_NEMO_MAX_MEMBER_MB (default 256 MiB: tokenizers are
a few MB) and leaves no partial file; model_config.yaml is read only when it is at most
RLHF_KIT_NEMO_MAX_CONFIG_MB (default 4 MiB: NeMo's are a few KB), so a gzip bomb fails at once.

Writing produces NeMo's layout: `./model_config.yaml`, `./model_weights.ckpt` (a `torch.save`d
state dict with legacy `model.` keys) and the tokenizer as `./<uuid4hex>_<basename>`, referenced
from the config as `nemo:<that name>`.
"""
from __future__ import annotations

import gzip
import io
import os
import posixpath
import tarfile
import tempfile
import time
import uuid
import zlib
from typing import IO, TYPE_CHECKING, Any, Dict, Iterator, List, Optional

import yaml

if TYPE_CHECKING:  # torch loads only when weights are read or written: prep reads tokenizers without it
    import torch

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
NEMO_PREFIX = "nemo:"
# Single-rank spellings NeMo has used for the weights; tp>1 / pp>1 archives hold several and are refused.
_WEIGHTS_CANDIDATES = (WEIGHTS_NAME, "mp_rank_00/" + WEIGHTS_NAME, "tp_rank_00_pp_rank_000/" + WEIGHTS_NAME)
MAX_MEMBER_ENV, MAX_CONFIG_ENV = "RLHF_KIT_NEMO_MAX_MEMBER_MB", "RLHF_KIT_NEMO_MAX_CONFIG_MB"
_DEFAULT_MAX_MEMBER_MB, _DEFAULT_MAX_CONFIG_MB = 256, 4
_BROKEN = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)  # a cut or corrupt archive


class NemoArchiveError(ValueError):
    """A .nemo that cannot be read safely: corrupt, a reference leaving it, a member over its cap."""

    user_facing = True  # the message says it all: runners log it without a traceback


def _norm(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _cap_bytes(env: str, default_mb: float) -> int:
    raw = os.environ.get(env)
    if raw in (None, ""):
        return int(default_mb * (1 << 20))
    try:
        mb = float(raw)
    except ValueError:
        raise NemoArchiveError(f"{env}={raw!r}: expected a size in MiB (e.g. {default_mb * 4:g})") from None
    if mb <= 0:
        raise NemoArchiveError(f"{env}={raw!r}: expected a size in MiB above 0")
    return int(mb * (1 << 20))


def max_member_bytes() -> int:
    """The cap on one member copied out of an archive (RLHF_KIT_NEMO_MAX_MEMBER_MB raises it)."""
    return _cap_bytes(MAX_MEMBER_ENV, _DEFAULT_MAX_MEMBER_MB)


def max_config_bytes() -> int:
    """The cap on model_config.yaml (RLHF_KIT_NEMO_MAX_CONFIG_MB raises it)."""
    return _cap_bytes(MAX_CONFIG_ENV, _DEFAULT_MAX_CONFIG_MB)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= (1 << 20) else f"{n} bytes"


def member_name(ref: str, where: str) -> str:
    """`nemo:<name>` (or a bare name) -> the member name, refused when it could leave the archive.

    `where` says whose reference it is (the config file and key) for the error."""
    name = ref[len(NEMO_PREFIX):] if ref.startswith(NEMO_PREFIX) else ref
    parts = name.replace("\\", "/").split("/")
    if (not name or "\x00" in name or name.startswith(("/", "\\")) or os.path.isabs(name)
            or (len(name) > 1 and name[1] == ":") or ".." in parts):
        raise NemoArchiveError(f"{where} = {ref!r}: refused, it points outside the archive (an absolute path "
                               "or '..'); a .nemo names its own files as nemo:<member name>")
    return _norm(posixpath.normpath(name.replace("\\", "/")))


class NemoArchive:
    """A `.nemo` tar (plain or gzip) or an extracted directory, with members addressed by their
    names without the leading `./`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.is_dir = os.path.isdir(self.path)
        self._tar: Optional[tarfile.TarFile] = None
        self._members: Dict[str, Any] = {}  # tar: the TarInfo of each regular file read so far
        self._headers: Optional[Iterator[tarfile.TarInfo]] = None
        self._all = self.is_dir
        if self.is_dir:
            self._root = os.path.realpath(self.path)
            for root, _, files in os.walk(self.path):
                for f in files:
                    full = os.path.join(root, f)
                    self._members[os.path.relpath(full, self.path).replace(os.sep, "/")] = full
            return
        try:  # NeMo writes uncompressed tars; older archives are gzip
            try:
                self._tar = tarfile.open(self.path, "r:")
            except tarfile.ReadError:
                self._tar = tarfile.open(self.path, "r:gz")
        except _BROKEN as e:
            raise NemoArchiveError(f"{self.path}: not a readable .nemo archive (a tar, plain or gzip; "
                                   f"truncated or corrupt?): {e}") from None
        self._headers = iter(self._tar)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def _scan(self, until: Optional[str] = None) -> None:
        """Read tar headers until member `until` is seen (None: to the end). Links, devices and
        folders are never members: only regular files can be opened."""
        if self._all:
            return
        try:
            for m in self._headers:
                if m.isfile():
                    self._members.setdefault(_norm(m.name), m)
                    if until is not None and _norm(m.name) == until:
                        return
        except _BROKEN as e:
            raise NemoArchiveError(f"{self.path}: .nemo archive is truncated or corrupt: {e}") from None
        self._all = True

    def _find(self, name: str) -> Optional[Any]:
        if name not in self._members:
            self._scan(until=name)
        return self._members.get(name)

    def names(self) -> List[str]:
        self._scan()
        return sorted(self._members)

    def __contains__(self, name: str) -> bool:
        return self._find(_norm(name)) is not None

    def size(self, name: str) -> int:
        m = self._find(_norm(name))
        if m is None:
            raise FileNotFoundError(f"{self.path}: no member {name!r}")
        return os.path.getsize(m) if self.is_dir else m.size

    def open(self, name: str) -> IO[bytes]:
        name = _norm(name)
        m = self._find(name)
        if m is None:
            raise FileNotFoundError(f"{self.path}: no member {name!r} (members: {', '.join(self.names())})")
        if self.is_dir:
            real = os.path.realpath(m)
            if os.path.commonpath([real, self._root]) != self._root:
                raise NemoArchiveError(f"{m}: refused, a link to {real}, outside the extracted .nemo {self.path}")
            return open(real, "rb")
        return self._tar.extractfile(m)

    def read_config(self) -> Dict[str, Any]:
        where = os.path.join(self.path, CONFIG_NAME)
        cap = max_config_bytes()
        size = self.size(CONFIG_NAME) if CONFIG_NAME in self else None
        if size is None:
            raise NemoArchiveError(f"{self.path}: no {CONFIG_NAME}; is this a .nemo checkpoint?")
        if size > cap:
            raise NemoArchiveError(f"{where}: {_mib(size)}, over the {_mib(cap)} cap on a .nemo config (NeMo's are "
                                   f"a few KB); set {MAX_CONFIG_ENV} to raise it if this archive is trusted")
        try:
            with self.open(CONFIG_NAME) as f:
                data = f.read(cap + 1)
        except _BROKEN as e:
            raise NemoArchiveError(f"{where}: cannot be read, the archive is truncated or corrupt: {e}") from None
        if len(data) > cap:  # a folder's file that grew after the size check
            raise NemoArchiveError(f"{where}: over the {_mib(cap)} cap on a .nemo config; set {MAX_CONFIG_ENV}")
        try:
            cfg = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise NemoArchiveError(f"{where}: not valid YAML: {e}") from None
        if cfg is None:
            return {}
        if not isinstance(cfg, dict):
            raise NemoArchiveError(f"{where}: expected a mapping of NeMo keys, got a {type(cfg).__name__}")
        return cfg

    def weights_member(self) -> str:
        names = self.names()
        if any(n.startswith(("mp_rank_01/", "tp_rank_01_")) for n in names):
            raise NotImplementedError(f"{self.path}: tensor/pipeline-parallel checkpoint; only tp1/pp1 is supported")
        for cand in _WEIGHTS_CANDIDATES:
            if cand in self._members:
                return cand
        if any(n.startswith("model_weights/") for n in names):
            raise NotImplementedError(f"{self.path}: megatron-core distributed checkpoint (model_weights/); "
                                      "only the legacy single-file model_weights.ckpt is supported")
        raise FileNotFoundError(f"{self.path}: no {WEIGHTS_NAME} among {names}")

    def load_weights(self, shapes_only: bool = False) -> Dict[str, "torch.Tensor"]:
        """The checkpoint's state dict (CPU tensors; mmap'd for directories). shapes_only returns
        meta tensors without reading the tensor bytes (sizing a model without loading it)."""
        import torch

        name = self.weights_member()
        if shapes_only:
            with self.open(name) as f, torch.serialization.skip_data():
                return torch.load(f, map_location="meta", weights_only=True)
        if self.is_dir:
            with self.open(name):  # refuses a link out of the folder
                pass
            return torch.load(self._members[name], map_location="cpu", mmap=True, weights_only=True)
        with self.open(name) as f:
            return torch.load(f, map_location="cpu", weights_only=True)

    def _where(self, key: Optional[str]) -> str:
        return f"{os.path.join(self.path, CONFIG_NAME)}: {key or 'a nemo: reference'}"

    def resolve(self, ref: str, key: Optional[str] = None) -> str:
        """`nemo:<name>` -> the member name, failing clearly when it leaves the archive or the archive
        lacks it. `key` (e.g. "tokenizer.model") names the config key the reference came from."""
        name = member_name(ref, self._where(key))
        if name not in self:
            raise FileNotFoundError(f"{self._where(key)} = {ref!r}, but that is not in the archive (no such "
                                    f"member; members: {', '.join(self.names())})")
        return name

    def extract(self, ref: str, dest: str, key: Optional[str] = None) -> str:
        """Copy one member (`nemo:<name>` or a plain name) to `dest` (a directory or a file path),
        atomically and within the member cap (nothing is written for a member over it)."""
        name = self.resolve(ref, key)
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(name))
        cap = max_member_bytes()
        over = (f"{self.path}: member {name!r} ({self._where(key)} = {ref!r}) is over the {_mib(cap)} cap on a file "
                f"copied out of a .nemo; set {MAX_MEMBER_ENV}=<MiB> to raise it if this archive is trusted")
        size = self.size(name)
        if size > cap:
            raise NemoArchiveError(over.replace("is over", f"is {_mib(size)}, over"))
        tmp = f"{dest}.tmp-{os.getpid()}"
        try:
            with self.open(name) as src, open(tmp, "wb") as out:
                copied = 0
                while chunk := src.read(1 << 22):
                    copied += len(chunk)
                    if copied > cap:  # a folder's file that grew after the size check
                        raise NemoArchiveError(over)
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException as e:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, _BROKEN):
                raise NemoArchiveError(f"{self.path}: member {name!r} cannot be read, the archive is truncated "
                                       f"or corrupt: {e}") from None
            raise
        return dest


def extract_member(nemo_path: str, ref: str, dest: str, key: Optional[str] = None) -> str:
    """Extract one member (e.g. the `nemo:` tokenizer of model_config.yaml) to a path."""
    with NemoArchive(nemo_path) as a:
        return a.extract(ref, dest, key)


def _tarinfo(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, mode, int(time.time())
    return ti


def write_nemo(path: str, config: Dict[str, Any], state_dict: Dict[str, "torch.Tensor"],
               artifacts: Optional[Dict[str, str]] = None) -> str:
    """Write a `.nemo` atomically (tmp file in the destination directory, then os.replace).

    artifacts: {member name: source file}. The weights are saved to a temp file first because a
    tar header needs the member's size before its bytes (NeMo itself tars a temp directory)."""
    import torch

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
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        from engine.io import disk_full_error

        raise disk_full_error(e, path, out_dir) or e
    finally:
        for p in (tmp_ckpt, tmp_tar):
            if os.path.exists(p):
                os.remove(p)
    return path


def artifact_name(src: str) -> str:
    """NeMo's artifact naming: `<uuid4 hex>_<basename>`."""
    return f"{uuid.uuid4().hex}_{os.path.basename(src)}"
