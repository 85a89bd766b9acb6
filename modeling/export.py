"""python -m modeling.export <checkpoint> <dir>: a Hugging Face folder transformers loads as is.

    python -m modeling.export results/quickstart/rm/checkpoints/megatron_gpt.nemo hf/rm
    python -c "import transformers as t; m = t.AutoModelForSequenceClassification.from_pretrained('hf/rm')"

The checkpoint is anything modeling.load_pretrained reads (.nemo, extracted .nemo, HF folder, .gguf,
pkg:<package>/<file>). See modeling/hf_export.py for which class each architecture becomes.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

from .hf_export import DEFAULT_SHARD, ExportError, export_hf


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 5GB, 500MB or 123456")
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2).upper()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modeling.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: the checkpoint's own")
    p.add_argument("--head-class", choices=("sequence", "token"), default="sequence",
                   help="reward/critic heads: *ForSequenceClassification (default) or *ForTokenClassification")
    p.add_argument("--drop-head-bias", action="store_true",
                   help="export a head whose bias is not 0 as *ForSequenceClassification anyway (rewards shift)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD, help="default 5GB")
    p.add_argument("--tokenizer", help="tokenizer file or folder, when the checkpoint names none")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = export_hf(a.checkpoint, a.out_dir, dtype=a.dtype, head_class=a.head_class,
                        drop_head_bias=a.drop_head_bias, max_shard_size=a.max_shard_size, tokenizer=a.tokenizer)
    except (ExportError, NotImplementedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out['architecture']} -> {out['dir']} ({len(out['files'])} files, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
