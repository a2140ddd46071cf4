#!/usr/bin/env python3
"""Fine-tuning throughput, in PyTorch, of the multitask model that fetch-ml --task=2 trains.

    .bench-venv/bin/python bench/st_train.py [--examples 320] [--batch-size 32] [--threads 2]

The model and the step are those of fetch-ml's trainer (src/train/trainer.rs):
  - encoder: the MiniLM folder loaded with transformers.AutoModel, all of it trainable, in
    train mode (BERT's own dropout active, as in fetch-ml);
  - sentence vector: mean of the last hidden states over the attention mask;
  - two heads, each Linear(384, 256) -> ReLU -> Dropout(0.1) -> Linear(256, n): 5 classes
    and 3 sentiments;
  - loss = CE(class) + CE(sentiment) (a row lacking a label is left out of that head's CE);
  - AdamW, lr 2e-5 for the encoder and 1e-3 for the heads, weight decay 0.01 on all
    parameters; linear warm-up over 10% of the steps, then linear decay (as fetch-ml);
  - gradient clipping at global norm 1.0; batches of --batch-size, padded to the longest row
    of the batch; rows tokenized once up front and truncated at 256 tokens
    (sentence_bert_config's max_seq_length, fetch-ml's default);
  - batches as fetch-ml forms them: a seeded shuffle, cut into groups of 8 batches, each
    group sorted by length, batch order shuffled (group_by_length); --no-length-grouping
    gives plain shuffled batches, like fetch-ml's flag of the same name.
Data: the first --examples rows of data/multitask/train.jsonl (cycled if more are asked for
than the file has). One warm-up step (not timed, on the first batch), then the --examples
rows are timed: batching, forward, loss, backward, clipping and the optimizer step.
Prints one JSON line {"tool": "pytorch", "examples", "seconds", "examples_per_sec",
"peak_rss_mb", "torch", ...}.
"""
import argparse
import json
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=320, help="rows to time [320]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=os.path.join(REPO, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--train-file", default=os.path.join(REPO, "data", "multitask", "train.jsonl"))
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-length-grouping", action="store_true",
                    help="batches in a random order only (fetch-ml's --no-length-grouping); "
                         "default: grouped by length like fetch-ml")
    return ap.parse_args()


def set_thread_env(threads):
    n = str(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        os.environ[var] = n
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def read_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append((r["text"], r.get("class"), r.get("sentiment")))
    return rows


GROUP = 8  # batches per length-sorted group, as fetch-ml's trainer (epoch_batches)


def epoch_batches(n, batch_size, lengths, rng):
    """fetch-ml's epoch_batches (src/train/trainer.rs): a seeded shuffle cut into batches; with
    lengths, the shuffle is cut into groups of GROUP batches, each group sorted by length and
    cut, and the batch order shuffled again (Hugging Face's group_by_length, smaller groups).
    Same algorithm, not the same random stream: the batches differ from fetch-ml's."""
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    for g in range(0, n, batch_size * GROUP):
        group = sorted(order[g:g + batch_size * GROUP], key=lambda i: lengths[i])
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    args = parse_args()
    set_thread_env(args.threads)
    import torch
    from torch import nn
    from transformers import AutoModel, AutoTokenizer
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    rows = read_rows(args.train_file)
    # Label sets from the whole file, sorted (fetch-ml also derives them from the data).
    classes = sorted({c for _, c, _ in rows if c is not None})
    sentiments = sorted({s for _, _, s in rows if s is not None})
    if len(classes) != 5 or len(sentiments) != 3:
        print(f"note: {len(classes)} classes, {len(sentiments)} sentiments", file=sys.stderr)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoder = AutoModel.from_pretrained(args.model)
    hidden = encoder.config.hidden_size

    def head(n):
        return nn.Sequential(nn.Linear(hidden, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, n))

    class MultiTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.class_head = head(len(classes))
            self.sentiment_head = head(len(sentiments))

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return self.class_head(pooled), self.sentiment_head(pooled)

    model = MultiTask()
    model.train()

    # Tokenize once, as fetch-ml does before its timed loop.
    def label_index(values, v):
        return values.index(v) if v is not None else -100

    data = []
    for i in range(args.examples):  # the first N rows, cycled if the file has fewer
        text, c, s = rows[i % len(rows)]
        ids = tokenizer(text, truncation=True, max_length=args.max_seq_length)["input_ids"]
        data.append((ids, label_index(classes, c), label_index(sentiments, s)))
    pad_id = tokenizer.pad_token_id or 0

    def collate(items):
        width = max(len(ids) for ids, _, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, (ids, _, _) in enumerate(items):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        return (input_ids, mask, torch.zeros_like(input_ids),
                torch.tensor([c for _, c, _ in items]), torch.tensor([s for _, _, s in items]))

    enc_params = list(model.encoder.parameters())
    head_params = list(model.class_head.parameters()) + list(model.sentiment_head.parameters())
    opt = torch.optim.AdamW([
        {"params": enc_params, "lr": 2e-5},
        {"params": head_params, "lr": 1e-3},
    ], weight_decay=0.01)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps = -(-args.examples // args.batch_size) + 1
    warmup = round(0.1 * steps)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    all_params = enc_params + head_params

    def head_loss(logits, y):
        # CE over the rows that have this label; 0 if none has (as fetch-ml's HeadTargets).
        return ce(logits, y) if (y != -100).any() else logits.sum() * 0.0

    def step(items, k):
        input_ids, mask, types, yc, ys = collate(items)
        lc, ls = model(input_ids, mask, types)
        loss = head_loss(lc, yc) + head_loss(ls, ys)
        value = loss.item()
        if not math.isfinite(value):
            sys.exit(f"loss is {value} at step {k}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        factor = (k + 1) / warmup if k < warmup else (steps - k) / max(steps - warmup, 1)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        opt.step()
        return value

    step(data[: args.batch_size], 0)  # warm-up (first batch of rows): allocations, kernels; not timed

    batches = epoch_batches(len(data), args.batch_size,
                            None if args.no_length_grouping else [len(d[0]) for d in data], rng)
    t0 = time.perf_counter()
    losses = []
    for k, idx in enumerate(batches, start=1):
        losses.append(step([data[i] for i in idx], k))
    seconds = time.perf_counter() - t0

    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "tool": "pytorch",
        "examples": len(data),
        "seconds": round(seconds, 4),
        "examples_per_sec": round(len(data) / seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": len(losses),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "parameters": n_params,
        "attn_implementation": getattr(encoder.config, "_attn_implementation", None),
        "length_grouping": not args.no_length_grouping,
        "padded_tokens": sum(len(b) * max(len(data[i][0]) for i in b) for b in batches),
        "real_tokens": sum(len(d[0]) for d in data),
    }), flush=True)


if __name__ == "__main__":
    main()
