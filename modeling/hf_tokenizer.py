"""The tokenizer half of a Hugging Face export: tokenizer.json + tokenizer_config.json that
transformers' AutoTokenizer loads with no code of ours, and that encodes exactly as the kit does.

Sources: a sentencepiece `.model` (converted with transformers' own SentencePiece-faithful builder,
the `.model` copied beside it), a `tokenizer.json`, a `.gguf`'s vocab, or the one inside a `.nemo`.
The conversion is checked on probe texts before anything is written: a tokenizer that would encode
differently from the kit is refused, never exported.

Pad token: transformers' sequence classification reads the rightmost token that is not
`pad_token_id`, and the kit's comparisons end with EOS (prep's --append-eod), so the pad id must be
one that real inputs never hold: the tokenizer's own pad (when it is not EOS), else a spare row of
the padded vocab (a new `<|pad|>` token), else BOS or UNK (when not EOS).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List, Optional

PROBES = ("\n\nHuman: How do I bake bread?\n\nAssistant: Mix 500 g flour, 10 g salt... then bake at 230°C.",
          "  two leading spaces,   runs of   spaces and a trailing one ", "digits 1234567890 and 3.14",
          "ünïcödé, 漢字 and an emoji 🙂", "tabs\tand\nnewlines\n\n", "▁already escaped", "")


@dataclass
class TokenizerExport:
    files: List[str]
    pad_id: Optional[int]
    eos_id: Optional[int]
    bos_id: Optional[int]


def _kit_tokenizer(spec: str, library: Optional[str], source_path: Optional[str], tmp: str):
    """The kit's tokenizer (data_prep's reader) for a model config's `tokenizer.model`."""
    from data_prep.tokenizers import load_tokenizer

    if spec.startswith("nemo:"):
        if not source_path:
            raise FileNotFoundError(f"tokenizer {spec!r} lives in a .nemo, but the source is not one")
        from .nemo_io import extract_member

        spec = extract_member(source_path, spec, tmp)
        library = "sentencepiece" if spec.endswith(".model") else library
    if library == "gguf":
        library = "huggingface"
    return load_tokenizer(spec, library)


def _backend(tok):
    """A `tokenizers.Tokenizer` that encodes as `tok.encode` does."""
    if getattr(tok, "library", None) == "sentencepiece":
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        with open(tok.path, "rb") as f:
            proto.ParseFromString(f.read())
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
        if backend is None:
            raise NotImplementedError(f"{tok.path}: sentencepiece model type not convertible to tokenizer.json")
        return backend
    return tok.tok


def _piece(tok, i: Optional[int]) -> Optional[str]:
    if i is None or i < 0:
        return None
    return tok.sp.id_to_piece(i) if getattr(tok, "library", None) == "sentencepiece" else tok.tok.id_to_token(i)


def export_tokenizer(spec: str, library: Optional[str], out_dir: str, *, embedding_rows: int,
                     need_pad: bool, append_eos: bool, source_path: Optional[str] = None) -> TokenizerExport:
    """Write the tokenizer files into `out_dir`. need_pad: a head model (a pad id real inputs never
    hold is required, see the module doc). append_eos: tokenizer(text) appends EOS, as prep's
    comparisons do, so a reward model scores text as the kit trained it."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tok = _kit_tokenizer(spec, library, source_path, tmp)
        backend = _backend(tok)
        for text in PROBES:
            ours, theirs = tok.encode(text), backend.encode(text, add_special_tokens=False).ids
            if ours != theirs:
                raise NotImplementedError(f"tokenizer {spec}: the converted tokenizer.json encodes {text!r} as "
                                          f"{theirs[:16]}, the kit as {ours[:16]}; not exported")
        eos, bos = tok.eos_id, tok.bos_id
        pad = tok.pad_id if tok.pad_id is not None and tok.pad_id != eos else None
        new_pad = False
        if pad is None and need_pad:
            if tok.vocab_size < embedding_rows:
                pad, new_pad = tok.vocab_size, True
            else:
                unk = tok.sp.unk_id() if getattr(tok, "library", None) == "sentencepiece" else None
                pad = next((i for i in (bos, unk) if i is not None and i >= 0 and i != eos), None)
            if pad is None:
                raise NotImplementedError(
                    "no pad id that real inputs never hold: the tokenizer's pad is its EOS, the vocab has no "
                    "spare row and no BOS/UNK distinct from EOS (transformers' sequence classification reads the "
                    "rightmost non-pad token, and the kit's inputs end with EOS)")
        if new_pad:
            backend.add_special_tokens([AddedToken("<|pad|>", special=True)])
            assert backend.token_to_id("<|pad|>") == pad, "the pad token did not land on the first spare row"
        eos_piece = _piece(tok, eos)
        if append_eos and eos_piece is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"$A {eos_piece}", pair=f"$A {eos_piece} $B {eos_piece}", special_tokens=[(eos_piece, eos)])
        pad_piece = "<|pad|>" if new_pad else _piece(tok, pad)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_piece, bos_token=_piece(tok, bos),
                                     pad_token=pad_piece, padding_side="right")
        files = list(hf.save_pretrained(out_dir))
        if getattr(tok, "library", None) == "sentencepiece":  # for sentencepiece users (and NeMo)
            dst = os.path.join(out_dir, "tokenizer.model")
            shutil.copyfile(tok.path, dst)
            files.append(dst)
    return TokenizerExport([f for f in files if os.path.exists(f)], pad, eos, bos)
