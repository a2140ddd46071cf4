#!/usr/bin/env python3
"""PyTorch (float32) side of bench/long.sh: the long-context bench models of
scripts/make-long-fixtures.py --bench, timed on one long input, on a file of sentences, or at
several input lengths. One JSON line per measurement.

    .bench-venv/bin/python bench/long_torch.py MODEL_DIR one --text FILE --tokens 8192
    .bench-venv/bin/python bench/long_torch.py MODEL_DIR sentences --file F [--limit N]
    .bench-venv/bin/python bench/long_torch.py MODEL_DIR curve --text FILE --lengths 512,1024
    .bench-venv/bin/python bench/long_torch.py MODEL_DIR make-text --tokens N --file F --out T

Common options: --threads N [2], --repeat N [1] (best of), --batch-size N [32] (sentences),
--out FILE.jsonl (one: the mean-pooled vector, to compare with fetch-ml's by cosine).

Models, by config.json's model_type:
  modernbert  transformers' ModernBertModel (AutoModel), float32, its default attention
              implementation (whatever transformers picks on CPU; printed as "attention").
  nomic_bert  transformers cannot run it offline (its code lives on the hub), so this file
              holds a PyTorch port of nomic's NomicBertModel as fetch-ml reads it (post-norm
              layers, fused Wqkv, rotary positions over the whole head, non-interleaved, base
              rotary_emb_base; SwiGLU fc11 * silu(fc12); no dense biases), with
              torch.nn.functional.scaled_dot_product_attention. bench/long.sh checks its
              vectors against fetch-ml's by cosine.
Inputs are tokenized with the model folder's tokenizer.json (the same ids as fetch-ml):
`one` cuts the text to --tokens tokens (specials included, right side), `curve` to each
length. Times: the forward pass and mean pooling only, after one warm-up input of 128 tokens;
peak_rss_mb is the process's ru_maxrss (whole process).
make-text writes one line of sentences from --file joined until it is at least --tokens
tokens long (fetch-ml cuts it at the model's limit or --max-seq-length).
"""
import argparse
import json
import os
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("mode", choices=["one", "sentences", "curve", "make-text"])
    ap.add_argument("--text", help="one: a file whose first line is the long input")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--file", help="sentences, one a line")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out")
    return ap.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
            "RAYON_RS_NUM_CPUS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class NomicBert(torch.nn.Module):
    """nomic's NomicBertModel (nomic-embed-text-v1/v1.5 layout), inference only."""

    def __init__(self, folder):
        super().__init__()
        import safetensors.torch
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        self.w = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
        c = self.cfg
        self.h, self.heads = c["n_embd"], c["n_head"]
        self.d = self.h // self.heads
        self.eps = c["layer_norm_epsilon"]
        half = self.d // 2
        exps = torch.arange(0, self.d, 2, dtype=torch.int64).float() / self.d
        self.inv_freq = 1.0 / (float(c["rotary_emb_base"]) ** exps)
        assert len(self.inv_freq) == half

    def ln(self, x, name):
        return F.layer_norm(x, (self.h,), self.w[name + ".weight"], self.w[name + ".bias"],
                            self.eps)

    def rotary(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, ids, mask):
        w = self.w
        b, t = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = self.ln(x, "emb_ln")
        pos = torch.arange(t, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        attn_mask = mask[:, None, None, :].bool()
        for i in range(self.cfg["n_layer"]):
            p = f"encoder.layers.{i}."
            qkv = F.linear(x, w[p + "attn.Wqkv.weight"]).view(b, t, 3, self.heads, self.d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            a = F.linear(a.transpose(1, 2).reshape(b, t, self.h), w[p + "attn.out_proj.weight"])
            x = self.ln(x + a, p + "norm1")
            gated = F.linear(x, w[p + "mlp.fc11.weight"]) * F.silu(
                F.linear(x, w[p + "mlp.fc12.weight"]))
            x = self.ln(x + F.linear(gated, w[p + "mlp.fc2.weight"]), p + "norm2")
        return x


def load(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    if cfg["model_type"] == "nomic_bert":
        return NomicBert(folder).eval(), "sdpa (PyTorch port of NomicBertModel)"
    import transformers
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, getattr(model.config, "_attn_implementation", "?")


def forward(model, ids, mask):
    with torch.inference_mode():
        if isinstance(model, NomicBert):
            h = model(ids, mask)
        else:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def tokenizer(folder, max_len=None):
    tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    if max_len:
        tok.enable_truncation(max_len)
    return tok


def timed(model, ids, repeat):
    mask = torch.ones_like(ids)
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = forward(model, ids, mask)
        best = min(best, time.perf_counter() - start)
    return best, out


def first_line(path):
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n")


def main():
    a = ARGS
    if a.mode == "make-text":
        tok = tokenizer(a.model)
        lines = [l.strip() for l in open(a.file, encoding="utf-8") if l.strip()]
        text, i = "", 0
        while len(tok.encode(text).ids) < a.tokens:
            text += (" " if text else "") + " ".join(lines[i % len(lines): i % len(lines) + 50])
            i += 50
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        return
    model, attention = load(a.model)
    base = {"tool": "pytorch", "model": os.path.basename(os.path.normpath(a.model)),
            "torch": torch.__version__, "threads": a.threads, "attention": attention}
    warm = torch.randint(1000, 20000, (1, 128))
    forward(model, warm, torch.ones_like(warm))
    if a.mode in ("one", "curve"):
        text = first_line(a.text)
        lengths = [a.tokens] if a.mode == "one" else [int(x) for x in a.lengths.split(",")]
        for n in lengths:
            ids = torch.tensor([tokenizer(a.model, n).encode(text).ids])
            seconds, vec = timed(model, ids, a.repeat)
            print(json.dumps({**base, "mode": a.mode, "tokens": ids.shape[1],
                              "seconds": seconds,
                              "ms_per_1k_tokens": 1e6 * seconds / ids.shape[1],
                              "peak_rss_mb": peak_rss_mb()}), flush=True)
            if a.out and a.mode == "one":
                with open(a.out, "w") as f:
                    f.write(json.dumps({"embedding": vec[0].tolist()}) + "\n")
        return
    lines = [l.strip() for l in open(a.file, encoding="utf-8") if l.strip()]
    lines = lines[: a.limit] if a.limit else lines
    tok = tokenizer(a.model, int(json.load(open(os.path.join(a.model, "config.json"))).get(
        "max_position_embeddings", 8192)))
    enc = [e.ids for e in tok.encode_batch(lines)]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    best = float("inf")
    for _ in range(max(1, a.repeat)):
        start = time.perf_counter()
        for s in range(0, len(order), a.batch_size):
            batch = [enc[i] for i in order[s: s + a.batch_size]]
            longest = max(len(x) for x in batch)
            ids = torch.tensor([x + [0] * (longest - len(x)) for x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in batch])
            forward(model, ids, mask)
        best = min(best, time.perf_counter() - start)
    print(json.dumps({**base, "mode": "sentences", "sentences": len(lines),
                      "tokens": sum(len(x) for x in enc), "batch_size": a.batch_size,
                      "seconds": best, "sentences_per_sec": len(lines) / best,
                      "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
