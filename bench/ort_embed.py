#!/usr/bin/env python3
"""ONNX Runtime embedding throughput on a file, float32 and dynamic int8, as the anchors in
shared/notes/anchors.md were built: `torch.onnx.export` of the Hugging Face model (inputs
input_ids, attention_mask, token_type_ids; dynamic batch and sequence axes; opset 17),
`quantize_dynamic(weight_type=QInt8, per_channel=True)` for int8, a session with
`intra_op_num_threads` and ORT_ENABLE_ALL, length-sorted batches, mean pooling and L2
normalisation in numpy. Timed over the encode loop after a warm-up batch (tokenization and
pooling included, interpreter, export and session creation excluded). One JSON line per
variant.

    .bench-venv/bin/python bench/ort_embed.py --model models/all-MiniLM-L6-v2 \
        --file bench/data/sentences-2k.txt [--threads 2] [--batch-size 32] [--out-dir DIR]

With --out-dir, the vectors go to DIR/ort-{fp32,int8}.npy (input order) for comparison.
"""
import argparse, json, os, sys, tempfile, time

import numpy as np


def export(model_dir, onnx_path):
    import torch
    from transformers import AutoModel

    class Wrapped(torch.nn.Module):
        # Keyword arguments: the positional order of forward() changes between versions.
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    model = Wrapped(AutoModel.from_pretrained(model_dir).eval())
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            onnx_path,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                n: {0: "batch", 1: "seq"}
                for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]
            },
            opset_version=17,
            dynamo=False,
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out-dir")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "fetch-ml-ort"))
    args = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    os.makedirs(args.work_dir, exist_ok=True)
    fp32 = os.path.join(args.work_dir, "model.onnx")
    int8 = os.path.join(args.work_dir, "model-int8.onnx")
    if not os.path.exists(fp32):
        export(args.model, fp32)
    if not os.path.exists(int8):
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(args.max_length)
    texts = [l.rstrip("\n") for l in open(args.file, encoding="utf-8") if l.strip()]
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]

    for name, path in [("fp32", fp32), ("int8", int8)]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def run(batch):
            enc = tok.encode_batch([texts[i] for i in batch])
            m = max(len(e.ids) for e in enc)
            ids = np.zeros((len(enc), m), dtype=np.int64)
            mask = np.zeros((len(enc), m), dtype=np.int64)
            for r, e in enumerate(enc):
                ids[r, : len(e.ids)] = e.ids
                mask[r, : len(e.ids)] = 1
            (h,) = sess.run(None, {"input_ids": ids, "attention_mask": mask,
                                   "token_type_ids": np.zeros_like(ids)})
            mf = mask[..., None].astype(np.float32)
            v = (h * mf).sum(1) / np.maximum(mf.sum(1), 1e-9)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

        run(batches[0])  # warm-up
        out = np.zeros((len(texts), 384), dtype=np.float32)
        t0 = time.perf_counter()
        for b in batches:
            out[b] = run(b)
        secs = time.perf_counter() - t0
        if args.out_dir:
            np.save(os.path.join(args.out_dir, f"ort-{name}.npy"), out)
        print(json.dumps({"tool": f"onnxruntime-{name}", "version": ort.__version__,
                          "sentences": len(texts), "tokens": int(sum(lengths)),
                          "seconds": round(secs, 3),
                          "sentences_per_s": round(len(texts) / secs, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
