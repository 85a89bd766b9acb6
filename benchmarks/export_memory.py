"""Peak memory and time of `python -m modeling.export` on a GPT-2B-shaped checkpoint at reduced
depth (GPT-2B-001's layer and vocab sizes, fp32; `--layers 24` is the full 2B model).

    PYTHONPATH=. python benchmarks/export_memory.py --layers 4 --out /tmp/export_bench

Builds the .nemo in one process, then exports in a fresh one and reads its peak RSS (ru_maxrss),
against the RSS of the same fresh process after only loading the checkpoint's state dict.
"""
import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """import resource, sys, time, torch
t = time.perf_counter()
if sys.argv[1] == "load":
    from modeling.nemo_io import NemoArchive
    with NemoArchive(sys.argv[2]) as a:
        sd = a.load_weights()
else:
    from modeling.hf_export import export_hf
    export_hf(sys.argv[2], sys.argv[3], tokenizer=sys.argv[4])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, time.perf_counter() - t)
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="/tmp/export_bench")
    a = p.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    from data_prep.tokenizers import train_sentencepiece
    from modeling import build_model, presets, save_nemo

    os.makedirs(a.out, exist_ok=True)
    import gzip
    import json
    with gzip.open(os.path.join(ROOT, "data_prep", "sample", "train.jsonl.gz"), "rt") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    tok = train_sentencepiece(texts, 400, os.path.join(a.out, "t.model"))
    cfg = dataclasses.replace(presets.gpt_2b_001(), num_layers=a.layers)
    nemo = os.path.join(a.out, "m.nemo")
    if not os.path.exists(nemo):
        with torch.no_grad():
            m = build_model(cfg, vocab_size=256000, init=False)
            for prm in m.parameters():
                prm.normal_(0, 0.02)
        save_nemo(m, nemo, tokenizer_path=tok)
        del m
    size = os.path.getsize(nemo) / 2 ** 30
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = lambda *args: subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,  # noqa: E731
                                       env=env, check=True).stdout.split()
    load_rss, load_s = map(float, run("load", nemo))
    rss, secs = map(float, run("export", nemo, os.path.join(a.out, "hf"), tok))
    print(f"layers {a.layers}: .nemo {size:.2f} GiB; load only: peak RSS {load_rss:.2f} GiB in {load_s:.1f} s; "
          f"export: peak RSS {rss:.2f} GiB ({rss / size:.2f}x the checkpoint) in {secs:.1f} s")


if __name__ == "__main__":
    main()
