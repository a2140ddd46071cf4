#!/usr/bin/env python3
"""Start-up probe: the Python counterpart of `fetch-ml --task=1 --model DIR --sentence TEXT`.

    .bench-venv/bin/python bench/st_startup.py [--model DIR] [--threads 2] [TEXT]

Imports torch and sentence-transformers, loads the model folder, embeds one sentence and prints
a one-line summary (dimension, norm, first values). Time the whole process from outside
(bench/run.sh does), interpreter start-up included.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("text", nargs="?", default="Hello world!")
    ap.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    n = str(args.threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        os.environ[var] = n
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(var, value)

    import torch
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    v = model.encode([args.text], show_progress_bar=False)[0]
    head = ", ".join(f"{x:.4f}" for x in v[:4])
    print(f"{args.text!r}: dim {v.shape[0]}, norm {float((v ** 2).sum()) ** 0.5:.4f}, [{head}, ...]")


if __name__ == "__main__":
    sys.exit(main())
