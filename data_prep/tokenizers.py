"""Tokenizers the kit reads and writes: sentencepiece `.model`, Hugging Face `tokenizer.json`
(or a `.gguf` through transformers), the tokenizer inside a `.nemo`, and a sentencepiece BPE
trained on the training text when none is given.

Other stages use `load_tokenizer(path)` to encode and decode with what the data was tokenized with.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
from typing import Iterable, List, Optional

log = logging.getLogger(__name__)

LIBRARIES = ("sentencepiece", "huggingface", "nemo")
# Special-token names tried, in order, when a tokenizer.json comes without tokenizer_config.json.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|im_start|>", "[CLS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
# tokens that end a chat turn or a document, for the default end strings of generation
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                     "</s>", "<extra_id_1>")


class SentencePieceTokenizer:
    library = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        # NeMo pads with EOS when the model has no pad piece
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None

    def token_id(self, piece: str) -> Optional[int]:
        """The id of a whole piece of the vocabulary (a special token such as "<extra_id_1>"), else None."""
        i = self.sp.piece_to_id(piece)
        return i if 0 <= i < self.vocab_size and self.sp.id_to_piece(i) == piece and i != self.sp.unk_id() else None

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: List[str], num_threads: int = -1) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def files(self) -> List[str]:
        return [self.path]


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer`; specials from a sibling tokenizer_config.json, else by name.
    Encodes without added special tokens, as NeMo's AutoTokenizer.text_to_ids does."""

    library = "huggingface"

    def __init__(self, tok, specials: Optional[dict] = None, path: Optional[str] = None):
        self.tok = tok
        self.path = path
        specials = specials or {}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = specials.get("eos_token") or _first_known(tok, _EOS_NAMES)
        self.bos_token = specials.get("bos_token") or _first_known(tok, _BOS_NAMES)
        self.pad_token = specials.get("pad_token") or _first_known(tok, _PAD_NAMES)
        if self.eos_token is None:
            raise ValueError(f"{path}: cannot tell the EOS token; add a tokenizer_config.json "
                             "with eos_token beside tokenizer.json")
        self.eos_id = tok.token_to_id(self.eos_token)
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        self.pad_id = tok.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    def token_id(self, token: str) -> Optional[int]:
        """The id of a whole token of the vocabulary (a special token such as "<|im_end|>"), else None."""
        return self.tok.token_to_id(token)

    @classmethod
    def from_file(cls, path: str) -> "HuggingFaceTokenizer":
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        specials = {}
        cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                raw = json.load(f)
            for k in ("eos_token", "bos_token", "pad_token"):
                v = raw.get(k)
                specials[k] = v.get("content") if isinstance(v, dict) else v
        return cls(Tokenizer.from_file(path), specials, path)

    @classmethod
    def from_gguf(cls, path: str) -> "HuggingFaceTokenizer":
        from transformers import AutoTokenizer  # needs the `gguf` package too

        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                           gguf_file=os.path.basename(path))
        specials = {"eos_token": hf.eos_token, "bos_token": hf.bos_token, "pad_token": hf.pad_token}
        return cls(hf.backend_tokenizer, specials, path)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str], num_threads: int = -1) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out_dir: str) -> str:
        path = os.path.join(out_dir, "tokenizer.json")
        _write_atomic(path, self.tok.to_str(pretty=True).encode("utf-8"))
        specials = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token}
        _write_atomic(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(specials, indent=2).encode())
        return path


def _write_atomic(path: str, data: bytes) -> None:
    """`path` complete or untouched: a tmp name (`*.tmp-PID`, cleaned by the next prep if this process
    dies), removed on any failure (a full disk included)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def _first_known(tok, names):
    return next((n for n in names if tok.token_to_id(n) is not None), None)


def resolve_path(path: str) -> str:
    """`pkg:<package>/<file>` (a file shipped in a pip package; the package is not imported)."""
    if path.startswith("pkg:"):
        pkg, _, rel = path[4:].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{path}: package {pkg!r} is not installed")
        return os.path.join(list(spec.submodule_search_locations)[0], rel)
    return os.path.abspath(os.path.expanduser(path))


def infer_library(path: str) -> str:
    if path.endswith(".nemo"):
        return "nemo"
    if path.endswith(".model"):
        return "sentencepiece"
    if path.endswith((".json", ".gguf")):
        return "huggingface"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_config.yaml")):
            return "nemo"  # an extracted .nemo
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return "huggingface"
    raise ValueError(f"{path}: cannot tell the tokenizer library from the name; set "
                     f"data.tokenizer.library to one of {', '.join(LIBRARIES)}")


def load_tokenizer(path: str, library: Optional[str] = None, extract_dir: Optional[str] = None):
    """A tokenizer from a file. `library` None: inferred (.model sentencepiece; .json, a folder or
    .gguf huggingface; .nemo its embedded tokenizer, extracted to `extract_dir` or a temp dir)."""
    path = resolve_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    inferred = infer_library(path) if library is None or library == "nemo" else library
    if library == "nemo" and inferred != "nemo":
        library = inferred  # an already extracted tokenizer handed on by the prep stage
    library = library or inferred
    if library == "nemo":
        from data_prep.nemo_archive import extract_tokenizer

        if extract_dir is None:
            import tempfile

            extract_dir = tempfile.mkdtemp(prefix="nemo_tokenizer_")
        inner_path, inner_library = extract_tokenizer(path, extract_dir)
        return load_tokenizer(inner_path, inner_library)
    if library == "sentencepiece":
        return SentencePieceTokenizer(path)
    if library == "huggingface":
        if path.endswith(".gguf"):
            return HuggingFaceTokenizer.from_gguf(path)
        return HuggingFaceTokenizer.from_file(path)
    raise ValueError(f"tokenizer library {library!r}: choose from {', '.join(LIBRARIES)}")


def install_tokenizer(tok, out_dir: str) -> str:
    """Copy the tokenizer into the prep folder (the artifact other stages load); returns its path."""
    if isinstance(tok, SentencePieceTokenizer):
        dst = os.path.join(out_dir, os.path.basename(tok.path))
        if os.path.abspath(tok.path) != os.path.abspath(dst):
            with open(tok.path, "rb") as f:
                _write_atomic(dst, f.read())  # a tokenizer is a few MB
        return dst
    return tok.save(out_dir)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str,
                        max_documents: int = 100_000) -> str:
    """A byte-fallback BPE that round-trips any text (newlines included), deterministic for the
    same texts. Only the first `max_documents` texts are used (about 70 MB of HH: plenty for an 8k
    vocab, and it bounds memory and time on huge inputs). One trainer thread: spm's BPE result
    depends on its thread count, and the same data must give the same tokenizer on any machine."""
    import itertools

    import sentencepiece as spm

    docs = list(itertools.islice(texts, max_documents))
    if not docs:
        raise ValueError("no training text to train a tokenizer on")
    kwargs = dict(model_type="bpe", normalization_rule_name="identity",
                  remove_extra_whitespaces=False, byte_fallback=True, split_digits=True,
                  allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                  unk_id=0, bos_id=1, eos_id=2, pad_id=3, max_sentence_length=1 << 20,
                  character_coverage=0.9995, num_threads=1, minloglevel=2)
    while True:
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model,
                                           vocab_size=vocab_size, **kwargs)
            break
        except RuntimeError as e:
            # a small corpus cannot fill a large vocab: spm says the largest it can do
            m = re.search(r"<= (\d+)", str(e))
            if not m or int(m.group(1)) >= vocab_size:
                raise
            log.warning("training text supports at most %s pieces; vocab_size %d -> %s",
                        m.group(1), vocab_size, m.group(1))
            vocab_size = int(m.group(1))
    _write_atomic(out_path, model.getvalue())
    log.info("trained a sentencepiece BPE of %d pieces on %d documents -> %s",
             vocab_size, len(docs), out_path)
    return out_path
