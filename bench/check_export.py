#!/usr/bin/env python3
"""Checks a `fetch-ml --task=2 --export DIR` folder with sentence-transformers itself.

    cargo build --release
    target/release/fetch-ml --task=2 --model models/all-MiniLM-L6-v2 --epochs 1 \
        --save /tmp/ck --export /tmp/exported
    target/release/fetch-ml --task=1 --model /tmp/exported --input data/sentences.txt \
        --format jsonl -o /tmp/fetch-ml.jsonl
    .bench-venv/bin/python bench/check_export.py /tmp/exported /tmp/fetch-ml.jsonl
    # and the heads against fetch-ml's own predictions:
    target/release/fetch-ml --task=2 --checkpoint /tmp/ck --input data/sentences.txt \
        --format jsonl -o /tmp/predictions.jsonl
    .bench-venv/bin/python bench/check_export.py /tmp/exported /tmp/fetch-ml.jsonl \
        --predictions /tmp/predictions.jsonl

Loads SentenceTransformer(DIR, device="cpu"), encodes the texts of fetch-ml's JSONL (its
`text` fields, in order), and compares each vector with fetch-ml's `embedding`: prints the
largest absolute component difference and the lowest cosine, and exits 1 unless every
component agrees to --tol (default 1e-5). Then runs the heads with the recipe of the export's
README.md (the Pooling step's vectors, before Normalize) and, with --predictions, compares
labels and probabilities with fetch-ml's (exit 1 unless every label agrees and every
probability to --prob-tol, default 1e-4). It also shows what the heads give when fed
`encode()`'s normalised vectors instead, the misuse the model card warns about.
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
    ap.add_argument("--predictions", help="fetch-ml --task=2 --checkpoint CK --format jsonl output "
                    "on the same texts")
    ap.add_argument("--prob-tol", type=float, default=1e-4)
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

    # The model card's recipe (README.md of the export).
    heads = json.load(open(os.path.join(args.export_dir, "heads.json")))
    weights = load_file(os.path.join(args.export_dir, heads["weights"]))
    pooled = SentenceTransformer(modules=[model[0], model[1]], device="cpu")

    def run_heads(x):
        out = {}
        for head in heads["heads"]:
            h = x
            for layer in head["layers"]:
                if layer["type"] == "linear":
                    w, b = weights[layer["weight"]], weights[layer["bias"]]
                    assert w.shape == (layer["out_features"], layer["in_features"]), layer
                    h = h @ w.T + b
                elif layer["type"] == "relu":
                    h = np.maximum(h, 0)
            p = np.exp(h - h.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[head["task"]] = p
        return out

    probs = run_heads(pooled.encode(texts, convert_to_numpy=True))
    for task, p in probs.items():
        labels = [heads["heads"][0 if task == "class" else 1]["labels"][i] for i in p[:5].argmax(1)]
        print(f"{task} head on the first {len(labels)} sentences: {labels}")
    misuse = run_heads(theirs)
    for task, p in probs.items():
        same = float((p.argmax(1) == misuse[task].argmax(1)).mean())
        print(f"{task} head fed encode()'s vectors instead (the misuse): {same:.1%} same labels, "
              f"probabilities off by up to {float(np.abs(p - misuse[task]).max()):.3f}")

    failed = False
    if args.predictions:
        preds = [json.loads(l) for l in open(args.predictions, encoding="utf-8") if l.strip()]
        assert [p["text"] for p in preds] == texts, "--predictions must cover the same texts"
        for task in ("class", "sentiment"):
            labels = heads["heads"][0 if task == "class" else 1]["labels"]
            p = probs[task]
            ours_labels = [labels[i] for i in p.argmax(1)]
            theirs_labels = [r[task]["label"] for r in preds]
            agree = sum(a == b for a, b in zip(ours_labels, theirs_labels))
            dp = max(abs(float(p[k].max()) - r[task]["probability"]) for k, r in enumerate(preds))
            print(f"{task}: recipe and fetch-ml agree on {agree}/{len(preds)} labels; "
                  f"probabilities differ by at most {dp:.2e}")
            if agree != len(preds) or dp > args.prob_tol:
                failed = True

    if diff > args.tol:
        print(f"FAIL: vectors differ by more than {args.tol}", file=sys.stderr)
        return 1
    if failed:
        print("FAIL: the recipe's predictions differ from fetch-ml's", file=sys.stderr)
        return 1
    print(f"OK: sentence-transformers and fetch-ml agree to {args.tol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
