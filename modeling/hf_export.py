"""Export to a Hugging Face folder (config.json, safetensors, tokenizer) that transformers loads
with no code of ours, computing exactly what the kit computes.

Which transformers class represents a kit model exactly (transformers 5.x):
  rmsnorm, full rotary, SwiGLU (Llama family)         -> Llama{ForCausalLM, ForSequenceClassification}
  layernorm / layernorm1p, rotary on a part of each   -> StableLm{...}: LayerNorm with bias, rotary on
  head, SwiGLU, no linear biases (GPT-2B-001)            the first partial_rotary_factor of each head
                                                         (rotate-half, as Megatron), gate/up/down MLP,
                                                         no bias on o_proj or the MLP. layernorm1p's
                                                         norm(x) * (1 + w) + b is folded: weight = 1 + w.
Reward models -> *ForSequenceClassification (head as `score`, num_labels=1, read at the rightmost
token that is not pad_token_id: the tokenizer gets a pad id that real inputs never hold, see
hf_tokenizer). Critics likewise, or *ForTokenClassification (a value per token, `score` with bias).
`score` has no bias in *ForSequenceClassification: a LayerNorm family takes the head's bias into the
final norm's bias; an RMSNorm family with a non-zero head bias is refused (or exported as tokens).
What has no exact counterpart is refused with the list of what differs.

Tensors stream: each is converted and written in turn, its source dropped once written, so the
peak is the loaded checkpoint plus a layer (a .nemo's weights are read whole by torch.load; an
extracted .nemo folder is memory-mapped).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .config import ModelConfig
from .state_dict import HEAD_PREFIX, split_qkv

DEFAULT_SHARD = 5 * 2 ** 30
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
             torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class ExportError(ValueError):
    """The model has no exact transformers counterpart; the message lists every difference."""


def family(cfg: ModelConfig) -> Tuple[str, List[str]]:
    """-> ('llama' | 'stablelm', differences that make it inexact)."""
    diffs: List[str] = []
    fam = "llama" if cfg.normalization == "rmsnorm" else "stablelm"
    if cfg.position_embedding_type != "rope":
        diffs.append(f"position_embedding_type={cfg.position_embedding_type!r} (both classes use rope)")
    if cfg.activation not in ("fast-swiglu", "swiglu"):
        diffs.append(f"activation={cfg.activation!r}: Llama and StableLm have a gated SiLU MLP (swiglu) only")
    if fam == "llama":
        if cfg.rotary_dim != cfg.head_dim:
            diffs.append(f"rotary on {cfg.rotary_dim} of {cfg.head_dim} dims per head with rmsnorm: "
                         "Llama rotates the whole head (StableLm has partial rotary but LayerNorm, not RMSNorm)")
    else:
        if cfg.bias:
            diffs.append("bias=true: StableLm has biases on q/k/v only (use_qkv_bias), none on o_proj or the MLP")
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            diffs.append(f"kv_channels={cfg.kv_channels}: StableLm's head dim is hidden_size / num_attention_heads")
        if cfg.rotary_dim == 0 or cfg.rotary_dim % 2:
            diffs.append(f"rotary_dim={cfg.rotary_dim}: StableLm rotates an even, non-zero part of each head")
    return fam, diffs


def _class_name(fam: str, head: Optional[str], head_class: str) -> str:
    base = {"llama": "Llama", "stablelm": "StableLm"}[fam]
    if head is None:
        return base + "ForCausalLM"
    return base + ("ForTokenClassification" if head_class == "token" else "ForSequenceClassification")


def hf_config(cfg: ModelConfig, fam: str, arch: str, rows: int, dtype: torch.dtype, ids: Dict[str, Optional[int]],
              head: Optional[str]):
    """The transformers config object (built by transformers itself, so config.json is canonical)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    kw = dict(vocab_size=rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.query_groups, hidden_act="silu",
              max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_method_std,
              tie_word_embeddings=bool(cfg.share_embeddings_and_output_weights), attention_dropout=0.0,
              bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if fam == "llama":
        kw.update(rms_norm_eps=cfg.layernorm_epsilon, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                  head_dim=cfg.head_dim, rope_parameters=rope)
        c = transformers.LlamaConfig(**kw)
    else:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        kw.update(layer_norm_eps=cfg.layernorm_epsilon, use_qkv_bias=False, qk_layernorm=False,
                  use_parallel_residual=False, hidden_dropout=0.0, rope_parameters=rope,
                  partial_rotary_factor=cfg.rotary_dim / cfg.head_dim)
        c = transformers.StableLmConfig(**kw)
    c.architectures = [arch]
    c.dtype = str(dtype).replace("torch.", "")
    if head is not None:
        c.num_labels = 1
        c.classifier_dropout = 0.0
    return c


def hf_tensors(get: Callable[[str], torch.Tensor], cfg: ModelConfig, *, lm_head: bool, head: bool,
               head_bias: bool, dtype: torch.dtype, fold_bias: Optional[torch.Tensor] = None
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) in file order. `get(our name)` hands over (and may drop) a source tensor.
    fold_bias: the head's bias moved into the final LayerNorm's bias, for a `score` without one:
    w . (beta + b w / |w|^2) = w . beta + b (exact up to fp32 rounding)."""
    fold = cfg.normalization == "layernorm1p"

    def cast(t):
        return t.to(dtype) if t.is_floating_point() else t

    def norm(src, dst):
        w = get(src + ".weight")
        yield dst + ".weight", cast(w.float() + 1 if fold else w)  # the fold in fp32, then the export dtype
        if cfg.normalization != "rmsnorm":
            yield dst + ".bias", cast(get(src + ".bias"))

    yield "model.embed_tokens.weight", cast(get("language_model.embedding.word_embeddings.weight"))
    for i in range(cfg.num_layers):
        me, hf = f"language_model.encoder.layers.{i}.", f"model.layers.{i}."
        yield from norm(me + "input_layernorm", hf + "input_layernorm")
        suffixes = ("weight", "bias") if cfg.bias else ("weight",)
        for s in suffixes:
            for n, t in zip("qkv", split_qkv(get(me + f"self_attention.query_key_value.{s}"), cfg)):
                yield hf + f"self_attn.{n}_proj.{s}", cast(t)
            yield hf + f"self_attn.o_proj.{s}", cast(get(me + f"self_attention.dense.{s}"))
        yield from norm(me + "post_attention_layernorm", hf + "post_attention_layernorm")
        for s in suffixes:
            gate, up = get(me + f"mlp.dense_h_to_4h.{s}").chunk(2, dim=0)
            yield hf + f"mlp.gate_proj.{s}", cast(gate)
            yield hf + f"mlp.up_proj.{s}", cast(up)
            yield hf + f"mlp.down_proj.{s}", cast(get(me + f"mlp.dense_4h_to_h.{s}"))
    if fold_bias is None:
        yield from norm("language_model.encoder.final_layernorm", "model.norm")
    else:
        (wn, w), (bn, beta) = norm("language_model.encoder.final_layernorm", "model.norm")
        score = get(HEAD_PREFIX + "weight").double().reshape(-1)
        yield wn, w
        yield bn, cast(beta.double() + fold_bias.double().reshape(()) * score / score.dot(score))
    if lm_head and not cfg.share_embeddings_and_output_weights:
        yield "lm_head.weight", cast(get("language_model.output_layer.weight"))
    if head:
        yield "score.weight", cast(get(HEAD_PREFIX + "weight") if fold_bias is None else score.reshape(1, -1))
        if head_bias:
            yield "score.bias", cast(get(HEAD_PREFIX + "bias"))


# --- safetensors, written one tensor at a time ---------------------------------------------------

def _header(entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]]) -> bytes:
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape in entries:
        n = _nbytes(dt, shape)
        meta[name] = {"dtype": _ST_DTYPE[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _nbytes(dt: torch.dtype, shape) -> int:
    n = torch.empty((), dtype=dt).element_size()
    for s in shape:
        n *= int(s)
    return n


def shard_plan(entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard: int) -> List[List[int]]:
    """Tensor indices per shard, in order, each shard at most max_shard bytes (a bigger tensor alone)."""
    shards: List[List[int]] = [[]]
    size = 0
    for i, (_, dt, shape) in enumerate(entries):
        n = _nbytes(dt, shape)
        if shards[-1] and size + n > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_safetensors(out_dir: str, entries, tensors: Iterator[Tuple[str, torch.Tensor]], max_shard: int) -> List[str]:
    """entries: (name, dtype, shape) of every tensor `tensors` will yield, in the same order."""
    shards = shard_plan(entries, max_shard)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, idx in zip(names, shards):
        part = [entries[i] for i in idx]
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(_header(part))
            for name, dt, shape in part:
                got, t = next(tensors)
                if got != name or t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"export bug: planned {name} {dt} {shape}, got {got} {t.dtype} {tuple(t.shape)}")
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                weight_map[name] = fname
                del t
    if len(names) > 1:
        total = sum(_nbytes(dt, s) for _, dt, s in entries)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [os.path.join(out_dir, n) for n in names]


# --- the whole export -------------------------------------------------------------------------

def export_hf(src: str, out_dir: str, *, dtype: Optional[str] = None, head_class: str = "sequence",
              drop_head_bias: bool = False, max_shard_size: int = DEFAULT_SHARD,
              tokenizer: Optional[str] = None, tokenizer_library: Optional[str] = None) -> Dict[str, object]:
    """Export a checkpoint (.nemo, extracted .nemo, HF folder, .gguf, pkg:) to `out_dir` (replaced
    atomically). Returns {"dir", "architecture", "files", "pad_token_id"}."""
    from .checkpoint import _read, resolve_path
    from .hf_tokenizer import export_tokenizer

    if head_class not in ("sequence", "token"):
        raise ValueError(f"head_class={head_class!r}: expected sequence | token")
    path = resolve_path(src)
    cfg, sd, raw = _read(path)
    has_head = any(k.startswith(HEAD_PREFIX) for k in sd)
    head = ("value" if raw.get("output_sequence") else "reward") if has_head else None
    fam, diffs = family(cfg)
    head_bias = head is not None and head_class == "token"
    fold_bias = None
    if head is not None and not head_bias:
        bias = float(sd[HEAD_PREFIX + "bias"].float().reshape(-1)[0])
        # Bradley-Terry is blind to the bias, but Adam turns its rounding-level gradients into a small drift
        if bias != 0.0 and cfg.normalization != "rmsnorm" and not drop_head_bias:
            fold_bias = sd[HEAD_PREFIX + "bias"].clone()
        elif bias != 0.0 and not drop_head_bias:
            diffs.append(f"rm_head.bias = {bias:.6g}: *ForSequenceClassification's score has no bias, and RMSNorm "
                         f"has none to fold it into. Use head_class=token (*ForTokenClassification: score with "
                         f"bias, a value per token), or drop_head_bias (every reward shifted by {-bias:.6g}; "
                         f"pairwise order unchanged)")
    if diffs:
        raise ExportError(f"{src}: cannot be exported exactly to transformers ({_class_name(fam, head, head_class)}):\n  - "
                          + "\n  - ".join(diffs))
    src_dt = sd["language_model.embedding.word_embeddings.weight"].dtype
    out_dt = _DTYPES[dtype] if dtype else src_dt
    rows = sd["language_model.embedding.word_embeddings.weight"].shape[0]
    arch = _class_name(fam, head, head_class)
    lm_head = head is None
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_hf_", dir=parent)
    try:
        tok_spec = tokenizer or cfg.tokenizer.model
        if not tok_spec:
            raise ExportError(f"{src}: the checkpoint names no tokenizer; pass tokenizer=<path> (--tokenizer)")
        tok = export_tokenizer(tok_spec, tokenizer_library if tokenizer else cfg.tokenizer.library, tmp,
                               embedding_rows=rows, need_pad=head is not None, append_eos=head is not None,
                               source_path=path if not tokenizer else None)
        ids = {"pad": tok.pad_id, "eos": tok.eos_id, "bos": tok.bos_id}
        hf_config(cfg, fam, arch, rows, out_dt, ids, head).to_json_file(os.path.join(tmp, "config.json"))
        kwargs = dict(lm_head=lm_head, head=head is not None, head_bias=head_bias, dtype=out_dt, fold_bias=fold_bias)
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in hf_tensors(meta.__getitem__, cfg, **kwargs)]
        files = write_safetensors(tmp, entries, hf_tensors(sd.pop, cfg, **kwargs), max_shard_size)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    files = [os.path.join(out_dir, os.path.basename(f)) for f in files + tok.files]
    return {"dir": out_dir, "architecture": arch, "files": sorted(set(files)), "pad_token_id": tok.pad_id}
