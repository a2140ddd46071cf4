#!/usr/bin/env python3
"""Tiny random models of each supported architecture, with reference outputs, for tests/arch.rs.

For each of bert, roberta, xlm-roberta, distilbert and mpnet this writes
tests/fixtures/arch/<name>/:
  config.json, model.safetensors  a 2-layer model (hidden 32, 4 heads, intermediate 64; MPNet
                                  3 layers and its 32-bucket relative position bias) with
                                  random weights, saved by transformers' save_pretrained
  tokenizer.json                  a tiny tokenizer built here with the tokenizers library:
                                  WordPiece (bert, distilbert; mpnet with MPNet's <s> </s>
                                  specials, pad id 1) and Unigram with Metaspace
                                  (xlm-roberta) from explicit vocabularies, byte-level BPE
                                  (roberta) trained on a small corpus
  reference.json                  for SENTENCES: the token ids, the last hidden states and the
                                  mean-pooled vectors (attention mask applied), computed by
                                  transformers in float32 on the padded batch; for mpnet
                                  also a sentence of 60 tokens (distances up to 59 reach the
                                  logarithmic buckets) and "relative_buckets", transformers'
                                  relative_position_bucket of the distances -512..512

and tests/fixtures/arch/st-dense/: a sentence-transformers folder on the tiny BERT (Transformer,
mean Pooling, a 32 -> 16 Dense with Tanh, Normalize; prompts "query: " and "passage: ") saved
by sentence-transformers, with its reference.json: the vectors sentence-transformers' encode()
gives plain, with prompt_name="query", with prompt="search: ", and with truncate_dim=8 (and
normalize_embeddings=True: truncated, then normalised again).

Every parameter gets random noise on top of transformers' own initialisation (LayerNorm
weights included), so a tensor loaded under the wrong name, a wrong position offset or a
dropped token-type table changes the outputs visibly.

Regenerate (no network needed; the bench venv has torch, transformers and tokenizers):
    HF_HUB_OFFLINE=1 /work/main/.bench-venv/bin/python scripts/make-arch-fixtures.py [NAME ...]
(NAMEs, e.g. `mpnet` or `st-dense`, regenerate only those fixtures; each model has its own
seed, so the others do not change), then run `cargo test --release --test arch`. The output is deterministic for a given
torch/transformers/tokenizers version (seeded); the versions used are recorded in each
reference.json.
"""

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "arch"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Hello world!",
    "Machine learning models embed sentences into vectors.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "ok",
]

# Training text for the tiny tokenizers: the sentences plus some more words, so that the
# vocabularies are not just the test sentences.
CORPUS = SENTENCES + [
    "A woman is reading a book in the park.",
    "The weather today is sunny and warm.",
    "Dogs and cats are common pets around the world.",
    "She plays the piano every evening after dinner.",
    "Vectors of numbers represent the meaning of text.",
    "Berlin, Paris, London, Madrid and Rome are cities in Europe.",
    "What time is it? It is nine o'clock.",
]

HIDDEN, LAYERS, HEADS, INTER = 32, 2, 4, 64


def corpus_words():
    """Lower-cased words and punctuation of CORPUS, sorted; and every character in it."""
    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for line in CORPUS for c in line.lower() if not c.isspace()})
    return words, chars


def wordpiece_tokenizer():
    # An explicit vocabulary (the WordPiece trainer breaks ties differently from run to run):
    # the words of up to 6 letters whole, longer ones left to pieces, then single characters.
    words, chars = corpus_words()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [w for w in words if len(w) <= 6 and w not in chars]
    vocab += chars + ["##" + c for c in chars if c.isalnum()]
    vocab += ["##ing", "##ed", "##er"]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return tok, tok.token_to_id("[PAD]")


def mpnet_tokenizer():
    # MPNet's tokenizer is WordPiece with RoBERTa-style specials: <s>=0, <pad>=1, </s>=2,
    # <unk>=3, and "<s> A </s>" for one sentence (its pad id 1 is what fixes the positions).
    words, chars = corpus_words()
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab += [w for w in words if len(w) <= 6 and w not in chars]
    vocab += chars + ["##" + c for c in chars if c.isalnum()]
    vocab += ["##ing", "##ed", "##er"]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", s), ("</s>", e)],
    )
    tok.decoder = decoders.WordPiece()
    return tok, tok.token_to_id("<pad>")


# MPNet's fixture adds a long sentence, so that query-key distances reach the logarithmic
# buckets of the relative position bias (60 tokens with <s> </s>).
MPNET_LONG = (
    "Dogs and cats are pets, she plays the piano after dinner, the weather today is sunny and "
    "warm, Paris and Rome are cities in Europe, and a man is reading a book in the park; what "
    "time is it? it is nine."
)


def bpe_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    tok.decoder = decoders.ByteLevel()
    return tok, tok.token_to_id("<pad>")


def unigram_tokenizer():
    # An explicit vocabulary with scores (the Unigram trainer is not deterministic either):
    # whole words of up to 6 letters after the metaspace, then single characters.
    words, chars = corpus_words()
    vocab = [(t, 0.0) for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]]
    vocab += [("\u2581" + w, -3.0 - 0.1 * len(w)) for w in words if len(w) <= 6 and w.isalnum()]
    vocab += [("\u2581", -6.0)] + [(c, -8.0) for c in chars]
    vocab += [(c.upper(), -9.0) for c in chars if c.isalpha()]
    vocab = list({t: (t, score) for t, score in vocab}.values())
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", s), ("</s>", e)],
    )
    tok.decoder = decoders.Metaspace()
    return tok, tok.token_to_id("<pad>")


def build(name, tok, pad):
    vocab = tok.get_vocab_size()
    common = dict(vocab_size=vocab, pad_token_id=pad, initializer_range=0.2)
    if name == "bert":
        cfg = transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=64, type_vocab_size=2, **common
        )
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    elif name == "roberta":
        # Positions start at pad + 1 = 2: 66 positions hold 64 tokens.
        cfg = transformers.RobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=66, type_vocab_size=1,
            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **common
        )
        model = transformers.RobertaModel(cfg, add_pooling_layer=True)
    elif name == "xlm-roberta":
        cfg = transformers.XLMRobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=66, type_vocab_size=1,
            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **common
        )
        model = transformers.XLMRobertaModel(cfg, add_pooling_layer=False)
    elif name == "distilbert":
        cfg = transformers.DistilBertConfig(
            dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
            max_position_embeddings=64, sinusoidal_pos_embds=False, activation="gelu", **common
        )
        model = transformers.DistilBertModel(cfg)
    elif name == "mpnet":
        # Positions start at 2 (MPNet's padding_idx 1): 66 positions hold 64 tokens.
        cfg = transformers.MPNetConfig(
            hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=66,
            relative_attention_num_buckets=32, bos_token_id=0, eos_token_id=2,
            layer_norm_eps=1e-5, **common
        )
        model = transformers.MPNetModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(name)
    return cfg, model


def main(only):
    torch.manual_seed(0)
    makers = {
        "bert": wordpiece_tokenizer,
        "roberta": bpe_tokenizer,
        "xlm-roberta": unigram_tokenizer,
        "distilbert": wordpiece_tokenizer,
        "mpnet": mpnet_tokenizer,
    }
    for i, (name, make_tok) in enumerate(makers.items()):
        if only and name not in only:
            continue
        torch.manual_seed(1000 + i)
        tok, pad = make_tok()
        cfg, model = build(name, tok, pad)
        cfg._attn_implementation = "eager"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.eval()
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save(str(out / "tokenizer.json"))

        sentences = SENTENCES + ([MPNET_LONG] if name == "mpnet" else [])
        encs = tok.encode_batch(sentences)
        ids = [e.ids for e in encs]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1)
        ref = {
            "generated_by": "scripts/make-arch-fixtures.py",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "model_type": cfg.model_type,
            "sentences": sentences,
            "input_ids": ids,
            "mean": [[float(v) for v in row] for row in mean],
            "last_hidden": [
                [[float(v) for v in tokrow] for tokrow in hidden[s, : len(ids[s])]]
                for s in range(len(sentences))
            ],
        }
        if name == "mpnet":
            rel = torch.arange(-512, 513)
            buckets = model.encoder.relative_position_bucket(rel)
            ref["relative_buckets"] = {"from": -512, "buckets": buckets.tolist()}
        (out / "reference.json").write_text(json.dumps(ref) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: vocab {tok.get_vocab_size()}, {size} bytes in {out}", file=sys.stderr)


def st_dense():
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    import sentence_transformers

    torch.manual_seed(2000)
    transformer = st_models.Transformer(str(OUT / "bert"), max_seq_length=64)
    pooling = st_models.Pooling(HIDDEN, pooling_mode="mean")
    dense = st_models.Dense(HIDDEN, 16, activation_function=torch.nn.Tanh())
    model = SentenceTransformer(
        modules=[transformer, pooling, dense, st_models.Normalize()],
        prompts={"query": "query: ", "passage": "passage: "},
        device="cpu",
    )
    model.eval()
    out = OUT / "st-dense"
    model.save(str(out))
    (out / "README.md").unlink(missing_ok=True)  # a generated model card, not needed

    def enc(**kw):
        v = model.encode(SENTENCES, convert_to_numpy=True, batch_size=4, **kw)
        return [[float(x) for x in row] for row in v]

    ids = model.tokenize(["query: " + s for s in SENTENCES])
    lengths = ids["attention_mask"].sum(1).tolist()
    ref = {
        "generated_by": "scripts/make-arch-fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "sentences": SENTENCES,
        "query_input_ids": [row[:n] for row, n in zip(ids["input_ids"].tolist(), lengths)],
        "plain": enc(),
        "query": enc(prompt_name="query"),
        "search_prompt": enc(prompt="search: "),
        "truncate_8": enc(truncate_dim=8, normalize_embeddings=True),
    }
    (out / "reference.json").write_text(json.dumps(ref) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"st-dense: {size} bytes in {out}", file=sys.stderr)


if __name__ == "__main__":
    only = set(sys.argv[1:])
    main(only)
    if not only or "st-dense" in only:
        st_dense()
