#!/usr/bin/env python3
"""Embedding throughput of sentence-transformers (PyTorch, CPU) on a file of sentences.

    .bench-venv/bin/python bench/st_embed.py bench/data/sentences-2k.txt \
        [--batch-size 32] [--threads 2] [--limit N] [--out vectors.npy]

Loads SentenceTransformer(models/all-MiniLM-L6-v2, device='cpu'), reads the sentences (one a
line, blank lines skipped, as fetch-ml does), encodes 64 of them once as a warm-up, then times
model.encode(sentences, batch_size=...) and prints one JSON line:
  {"tool": "sentence-transformers", "sentences", "seconds", "sentences_per_sec",
   "peak_rss_mb", "torch", "sentence_transformers", "threads", ...}
peak_rss_mb is the process's ru_maxrss (whole process, model load and warm-up included).
--out saves the vectors (float32, L2-normalised by the model's Normalize module) as .npy, in
input order, to compare with fetch-ml's output by cosine.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(os.path.dirname(HERE), "models", "all-MiniLM-L6-v2")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sentences_file", help="UTF-8, one sentence a line")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="local model folder")
    ap.add_argument("--limit", type=int, help="use only the first N sentences (smoke tests)")
    ap.add_argument("--out", help="save the vectors here (.npy)")
    return ap.parse_args()


def set_thread_env(threads):
    """Must run before torch (or numpy) is imported: the OpenMP/MKL pools read these once."""
    n = str(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):  # the last two: HF tokenizers
        os.environ[var] = n
    # The hub is unreachable and the model is a local folder: never try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def read_sentences(path, limit=None):
    with open(path, encoding="utf-8") as f:
        lines = [l.strip() for l in f]
    lines = [l for l in lines if l]
    return lines[:limit] if limit else lines


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main():
    args = parse_args()
    set_thread_env(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    sentences = read_sentences(args.sentences_file, args.limit)
    if not sentences:
        sys.exit(f"no sentences in {args.sentences_file}")
    t0 = time.perf_counter()
    model = SentenceTransformer(args.model, device="cpu")
    load_seconds = time.perf_counter() - t0

    with torch.inference_mode():
        model.encode(sentences[:64], batch_size=args.batch_size, show_progress_bar=False)
        t0 = time.perf_counter()
        vectors = model.encode(sentences, batch_size=args.batch_size, show_progress_bar=False)
        seconds = time.perf_counter() - t0

    result = {
        "tool": "sentence-transformers",
        "sentences": len(sentences),
        "seconds": round(seconds, 4),
        "sentences_per_sec": round(len(sentences) / seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "load_seconds": round(load_seconds, 3),
        "dimension": int(vectors.shape[1]),
    }
    if args.out:
        import numpy as np
        np.save(args.out, vectors.astype(np.float32))
        result["out"] = args.out
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
