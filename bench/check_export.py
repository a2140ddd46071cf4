#!/usr/bin/env python3
"""Checks a `fetch-ml --task=2 --export DIR` folder with sentence-transformers itself.

    cargo build --release
    target/release/fetch-ml --task=2 --model models/all-MiniLM-L6-v2 --epochs 1 \
        --save /tmp/ck --export /tmp/exported
    target/release/fetch-ml --task=1 --model /tmp/exported --input data/sentences.txt \
        --format jsonl -o /tmp/fetch-ml.jsonl
    .bench-venv/bin/python bench/check_export.py /tmp/exported /tmp/fetch-ml.jsonl

Loads SentenceTransformer(DIR, device="cpu"), encodes the texts of fetch-ml's JSONL (its
`text` fields, in order), and compares each vector with fetch-ml's `embedding`: prints the
largest absolute component difference and the lowest cosine, and exits 1 unless every
component agrees to --tol (default 1e-5). Also checks that heads.json and heads.safetensors
describe the same tensors, and runs the heads on the vectors of the Pooling step to print the
predicted labels of the first sentences.
"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("fetch_ml_jsonl", help="fetch-ml --task=1 --model EXPORT_DIR --format jsonl output")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    rows = [json.loads(l) for l in open(args.fetch_ml_jsonl, encoding="utf-8") if l.strip()]
    texts = [r["text"] for r in rows]
    ours = np.array([r["embedding"] for r in rows], dtype=np.float32)

    model = SentenceTransformer(args.export_dir, device="cpu")
    theirs = model.encode(texts, batch_size=32, convert_to_numpy=True)
    diff = float(np.abs(ours - theirs).max())
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    print(f"{len(texts)} sentences, dimension {ours.shape[1]}: largest component difference "
          f"{diff:.2e}, lowest cosine {cos.min():.7f} (modules: "
          f"{', '.join(type(m).__name__ for m in model)})")

    heads = json.load(open(os.path.join(args.export_dir, "heads.json")))
    weights = load_file(os.path.join(args.export_dir, heads["weights"]))
    # The heads take the Pooling step's output, before any Normalize step.
    pooled = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
    features = pooled.encode(texts[:5], convert_to_numpy=True)
    for head in heads["heads"]:
        x = features
        for layer in head["layers"]:
            if layer["type"] == "linear":
                w, b = weights[layer["weight"]], weights[layer["bias"]]
                assert w.shape == (layer["out_features"], layer["in_features"]), layer
                x = x @ w.T + b
            elif layer["type"] == "relu":
                x = np.maximum(x, 0)
        labels = [head["labels"][i] for i in x.argmax(1)]
        print(f"{head['task']} head on the first {len(labels)} sentences: {labels}")

    if diff > args.tol:
        print(f"FAIL: vectors differ by more than {args.tol}", file=sys.stderr)
        return 1
    print(f"OK: sentence-transformers and fetch-ml agree to {args.tol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
