#!/usr/bin/env python3
"""Tiny random models of the long-context architectures, for tests/long_arch.rs.

Writes tests/fixtures/arch/<name>/ for
  modernbert   a 4-layer ModernBertModel (hidden 32, 4 heads, intermediate 48; layers 0 and 3
               global, 1 and 2 local with the real 128-token window, rotary bases 160,000 and
               10,000, no biases) saved by transformers, its config.json rewritten in the
               published form (global_attn_every_n_layers, global_rope_theta,
               local_rope_theta, as modernbert-embed-base's) and checked to load back the same;
               reference.safetensors holds transformers' float32 last hidden states and
               mean-pooled vectors (eager attention, one padded batch) for
                 "long":      random token ids, lengths LONG (one longer than the window, one
                              longer than 1,024 tokens)
                 "sentences": SENTENCES tokenized
  nomic_bert   a 3-layer model in nomic-embed-text-v1.5's exact layout and config keys
               (Wqkv, out_proj, fc11/fc12/fc2, norm1/norm2, emb_ln; no dense biases; rotary
               base 1000), random weights written here with safetensors
  jina_bert    a 2-layer model in jina-embeddings-v2's exact layout and config keys
               ("model_type": "bert", "position_embedding_type": "alibi", gated_layers, wo,
               layernorm, a pooler), random weights written here
  st-modernbert  a sentence-transformers folder on the tiny ModernBERT (mean Pooling,
               Normalize; nomic's prompts "search_query: " and "search_document: ", as
               modernbert-embed-base has them) saved by sentence-transformers, with
               reference.json: encode() plain, with prompt_name="search_query", with
               prompt_name="search_document", and with truncate_dim=8 (normalised again)

Transformers cannot run NomicBERT or JinaBERT offline (their code lives on the hub), so their
reference outputs are not written here: tests/long_arch.rs runs candle-transformers'
`nomic_bert` and `jina_bert` models on the same files and ids (reference.json: "long" and
"sentences" ids) and compares.

Every model uses the WordPiece tokenizer of scripts/make-arch-fixtures.py (tokenizer.json).

Regenerate (no network needed):
    HF_HUB_OFFLINE=1 /work/main/.bench-venv/bin/python scripts/make-long-fixtures.py [NAME ...]
then run `cargo test --release --test long_arch`. Seeded; the versions used are recorded.

Benchmark models (bench/long.sh), random weights in the published shapes, not fixtures:
    .bench-venv/bin/python scripts/make-long-fixtures.py --bench OUT_DIR [--layers N]
writes OUT_DIR/modernbert-base (modernbert-embed-base's config.json: 22 layers, hidden 768,
12 heads, intermediate 1152, vocabulary 50,368, 8,192 positions; saved by transformers'
ModernBertModel) and OUT_DIR/nomic-base (nomic-embed-text-v1.5's config.json: 12 layers,
hidden 768, 12 heads, n_inner 3072, vocabulary 30,528, 8,192 positions; nomic's tensor names),
each with bert-base-uncased's tokenizer (models/all-MiniLM-L6-v2/tokenizer.json, its fixed
truncation and padding removed: nomic's own; ModernBERT's BPE tokenizer is not available
offline, so token counts of a text differ from the real model's). --layers N keeps the
widths and vocabularies with N layers (the small setting of bench/long.sh).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("arch_fixtures", HERE / "make-arch-fixtures.py")
arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arch)

OUT = arch.OUT
SENTENCES = arch.SENTENCES
# Sequence lengths of the packed "long" batch: one token, tile edges, one longer than
# ModernBERT's 128-token window, one longer than 1,024 tokens.
LONG = [1, 2, 65, 130, 300, 1100]
MAX_POSITIONS = 2048
HIDDEN, HEADS = 32, 4


def versions():
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def long_ids(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    # Ids from 5 on: the specials of the tiny vocabulary are 0-4.
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in LONG]


def sentence_ids(tok):
    return [e.ids for e in tok.encode_batch(SENTENCES)]


def run_padded(model, ids, pad):
    """Last hidden states (real tokens only, concatenated) and mean-pooled vectors."""
    longest = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    mean = (hidden * m).sum(1) / m.sum(1)
    rows = torch.cat([hidden[s, : len(x)] for s, x in enumerate(ids)])
    return rows.contiguous(), mean.contiguous()


def modernbert():
    torch.manual_seed(3000)
    tok, pad = arch.wordpiece_tokenizer()
    out = OUT / "modernbert"
    out.mkdir(parents=True, exist_ok=True)
    published = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=HEADS, hidden_activation="gelu",
        max_position_embeddings=MAX_POSITIONS, initializer_range=0.2, norm_eps=1e-5,
        norm_bias=False, pad_token_id=pad, bos_token_id=tok.token_to_id("[CLS]"),
        cls_token_id=tok.token_to_id("[CLS]"), eos_token_id=tok.token_to_id("[SEP]"),
        sep_token_id=tok.token_to_id("[SEP]"), attention_bias=False, attention_dropout=0.0,
        embedding_dropout=0.0, mlp_bias=False, mlp_dropout=0.0, local_attention=128,
        global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0,
        classifier_pooling="mean",
    )
    cfg = transformers.ModernBertConfig(**published)
    cfg._attn_implementation = "eager"
    model = transformers.ModernBertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    # ModernBERT's tokenizer_config.json names its specials (sentence-transformers pads).
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "mask_token": "[MASK]", "unk_token": "[UNK]",
               "model_max_length": MAX_POSITIONS, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(special, indent=2) + "\n")
    # config.json as the published ModernBERT models have it (transformers 4.48 keys).
    saved = json.loads((out / "config.json").read_text())
    for k in ["layer_types", "rope_parameters", "sliding_window"]:
        saved.pop(k, None)
    saved.update({k: published[k] for k in
                  ["global_attn_every_n_layers", "global_rope_theta", "local_rope_theta"]})
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    back = transformers.ModernBertConfig.from_pretrained(out)
    assert back.layer_types == cfg.layer_types, (back.layer_types, cfg.layer_types)
    assert back.layer_types == ["full_attention", "sliding_attention", "sliding_attention",
                                "full_attention"]
    assert back.rope_parameters == cfg.rope_parameters, back.rope_parameters
    assert back.sliding_window == 64

    ids = {"long": long_ids(tok.get_vocab_size(), 1), "sentences": sentence_ids(tok)}
    tensors = {}
    for name, x in ids.items():
        hidden, mean = run_padded(model, x, pad)
        tensors[f"{name}.hidden"] = hidden
        tensors[f"{name}.mean"] = mean
    safetensors.torch.save_file(tensors, str(out / "reference.safetensors"))
    ref = {"generated_by": "scripts/make-long-fixtures.py", "versions": versions(),
           "model_type": "modernbert", "sentences": SENTENCES, "ids": ids}
    (out / "reference.json").write_text(json.dumps(ref) + "\n")
    return model, tok, pad


def noisy(shape, std, g, base=0.0):
    return (base + torch.randn(shape, generator=g) * std).contiguous()


def nomic_bert():
    tok, pad = arch.wordpiece_tokenizer()
    g = torch.Generator().manual_seed(3100)
    out = OUT / "nomic_bert"
    out.mkdir(parents=True, exist_ok=True)
    vocab, layers, inner = tok.get_vocab_size(), 3, 256
    # nomic-embed-text-v1.5's config.json keys, values shrunk.
    config = {
        "activation_function": "swiglu", "architectures": ["NomicBertModel"],
        "attn_pdrop": 0.0, "bos_token_id": None, "causal": False, "dense_seq_output": True,
        "embd_pdrop": 0.0, "eos_token_id": None, "fused_bias_fc": True,
        "fused_dropout_add_ln": True, "initializer_range": 0.02, "layer_norm_epsilon": 1e-12,
        "max_trained_positions": MAX_POSITIONS, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
        "model_type": "nomic_bert", "n_embd": HIDDEN, "n_head": HEADS, "n_inner": inner,
        "n_layer": layers, "n_positions": MAX_POSITIONS, "pad_vocab_size_multiple": 64,
        "parallel_block": False, "parallel_block_tied_norm": False, "prenorm": False,
        "qkv_proj_bias": False, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0,
        "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "torch_dtype": "float32", "type_vocab_size": 2, "use_cache": True,
        "use_flash_attn": True, "use_rms_norm": False, "use_xentropy": True,
        "vocab_size": vocab,
    }
    h = HIDDEN
    w = {
        "embeddings.word_embeddings.weight": noisy((vocab, h), 0.5, g),
        "embeddings.token_type_embeddings.weight": noisy((2, h), 0.5, g),
        "emb_ln.weight": noisy((h,), 0.1, g, 1.0),
        "emb_ln.bias": noisy((h,), 0.1, g),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        w[p + "attn.Wqkv.weight"] = noisy((3 * h, h), 0.2, g)
        w[p + "attn.out_proj.weight"] = noisy((h, h), 0.2, g)
        w[p + "mlp.fc11.weight"] = noisy((inner, h), 0.2, g)
        w[p + "mlp.fc12.weight"] = noisy((inner, h), 0.2, g)
        w[p + "mlp.fc2.weight"] = noisy((h, inner), 0.1, g)
        for n in ["norm1", "norm2"]:
            w[p + n + ".weight"] = noisy((h,), 0.1, g, 1.0)
            w[p + n + ".bias"] = noisy((h,), 0.1, g)
    safetensors.torch.save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    ids = {"long": long_ids(vocab, 2), "sentences": sentence_ids(tok)}
    ref = {"generated_by": "scripts/make-long-fixtures.py", "versions": versions(),
           "model_type": "nomic_bert", "sentences": SENTENCES, "ids": ids}
    (out / "reference.json").write_text(json.dumps(ref) + "\n")


def jina_bert():
    tok, pad = arch.wordpiece_tokenizer()
    g = torch.Generator().manual_seed(3200)
    out = OUT / "jina_bert"
    out.mkdir(parents=True, exist_ok=True)
    vocab, layers, inner = tok.get_vocab_size(), 2, 64
    # jina-embeddings-v2-base-en's config.json keys, values shrunk.
    config = {
        "_name_or_path": "jinaai/jina-bert-implementation",
        "architectures": ["JinaBertForMaskedLM"], "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None, "emb_pooler": "mean", "feed_forward_type": "geglu",
        "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": inner,
        "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POSITIONS,
        "model_max_length": MAX_POSITIONS, "model_type": "bert",
        "num_attention_heads": HEADS, "num_hidden_layers": layers, "pad_token_id": pad,
        "position_embedding_type": "alibi", "torch_dtype": "float32",
        "transformers_version": "4.26.0", "type_vocab_size": 2, "use_cache": True,
        "vocab_size": vocab,
    }
    h = HIDDEN
    w = {
        "embeddings.word_embeddings.weight": noisy((vocab, h), 0.5, g),
        "embeddings.token_type_embeddings.weight": noisy((2, h), 0.5, g),
        "embeddings.LayerNorm.weight": noisy((h,), 0.1, g, 1.0),
        "embeddings.LayerNorm.bias": noisy((h,), 0.1, g),
        "pooler.dense.weight": noisy((h, h), 0.2, g),
        "pooler.dense.bias": noisy((h,), 0.1, g),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ["query", "key", "value"]:
            w[p + f"attention.self.{n}.weight"] = noisy((h, h), 0.2, g)
            w[p + f"attention.self.{n}.bias"] = noisy((h,), 0.1, g)
        w[p + "attention.output.dense.weight"] = noisy((h, h), 0.2, g)
        w[p + "attention.output.dense.bias"] = noisy((h,), 0.1, g)
        w[p + "mlp.gated_layers.weight"] = noisy((2 * inner, h), 0.2, g)
        w[p + "mlp.wo.weight"] = noisy((h, inner), 0.1, g)
        w[p + "mlp.wo.bias"] = noisy((h,), 0.1, g)
        for n in ["attention.output.LayerNorm", "mlp.layernorm"]:
            w[p + n + ".weight"] = noisy((h,), 0.1, g, 1.0)
            w[p + n + ".bias"] = noisy((h,), 0.1, g)
    safetensors.torch.save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    ids = {"long": long_ids(vocab, 3), "sentences": sentence_ids(tok)}
    ref = {"generated_by": "scripts/make-long-fixtures.py", "versions": versions(),
           "model_type": "jina_bert", "sentences": SENTENCES, "ids": ids}
    (out / "reference.json").write_text(json.dumps(ref) + "\n")


def st_modernbert():
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models

    torch.manual_seed(3300)
    transformer = st_models.Transformer(str(OUT / "modernbert"), max_seq_length=MAX_POSITIONS)
    pooling = st_models.Pooling(HIDDEN, pooling_mode="mean")
    model = SentenceTransformer(
        modules=[transformer, pooling, st_models.Normalize()],
        prompts={"search_query": "search_query: ", "search_document": "search_document: "},
        device="cpu",
    )
    model.eval()
    out = OUT / "st-modernbert"
    model.save(str(out))
    (out / "README.md").unlink(missing_ok=True)
    # The published config.json form (the Transformer module saved transformers 5's).
    (out / "config.json").write_text((OUT / "modernbert" / "config.json").read_text())

    def enc(**kw):
        v = model.encode(SENTENCES, convert_to_numpy=True, batch_size=4, **kw)
        return [[float(x) for x in row] for row in v]

    ref = {
        "generated_by": "scripts/make-long-fixtures.py",
        "versions": {**versions(), "sentence_transformers": sentence_transformers.__version__},
        "sentences": SENTENCES,
        "plain": enc(),
        "search_query": enc(prompt_name="search_query"),
        "search_document": enc(prompt_name="search_document"),
        "truncate_8": enc(truncate_dim=8, normalize_embeddings=True),
    }
    (out / "reference.json").write_text(json.dumps(ref) + "\n")


def bench_tokenizer(out):
    """bert-base-uncased's WordPiece tokenizer (all-MiniLM-L6-v2's), no truncation or padding."""
    src = HERE.parent / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
    tok = json.loads(src.read_text())
    tok["truncation"] = None
    tok["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok))


def bench_modernbert(root, layers):
    """modernbert-embed-base's shape, random weights (transformers' initialisation)."""
    torch.manual_seed(4000)
    out = root / "modernbert-base"
    out.mkdir(parents=True, exist_ok=True)
    published = dict(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=layers,
        num_attention_heads=12, hidden_activation="gelu", max_position_embeddings=8192,
        initializer_range=0.02, norm_eps=1e-5, norm_bias=False, pad_token_id=0,
        bos_token_id=101, cls_token_id=101, eos_token_id=102, sep_token_id=102,
        attention_bias=False, attention_dropout=0.0, embedding_dropout=0.0, mlp_bias=False,
        mlp_dropout=0.0, local_attention=128, global_attn_every_n_layers=3,
        global_rope_theta=160000.0, local_rope_theta=10000.0, classifier_pooling="mean",
    )
    model = transformers.ModernBertModel(transformers.ModernBertConfig(**published)).eval()
    model.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    for k in ["layer_types", "rope_parameters", "sliding_window"]:
        saved.pop(k, None)
    saved.update({k: published[k] for k in
                  ["global_attn_every_n_layers", "global_rope_theta", "local_rope_theta"]})
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    bench_tokenizer(out)


def bench_nomic(root, layers):
    """nomic-embed-text-v1.5's shape and config, random weights under nomic's names."""
    g = torch.Generator().manual_seed(4100)
    out = root / "nomic-base"
    out.mkdir(parents=True, exist_ok=True)
    v = json.loads(NOMIC_V15)
    v["n_layer"] = layers
    h, inner, vocab = v["n_embd"], v["n_inner"], v["vocab_size"]
    w = {
        "embeddings.word_embeddings.weight": noisy((vocab, h), 0.02, g),
        "embeddings.token_type_embeddings.weight": noisy((2, h), 0.02, g),
        "emb_ln.weight": noisy((h,), 0.02, g, 1.0),
        "emb_ln.bias": noisy((h,), 0.02, g),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        w[p + "attn.Wqkv.weight"] = noisy((3 * h, h), 0.02, g)
        w[p + "attn.out_proj.weight"] = noisy((h, h), 0.02, g)
        w[p + "mlp.fc11.weight"] = noisy((inner, h), 0.02, g)
        w[p + "mlp.fc12.weight"] = noisy((inner, h), 0.02, g)
        w[p + "mlp.fc2.weight"] = noisy((h, inner), 0.02, g)
        for n in ["norm1", "norm2"]:
            w[p + n + ".weight"] = noisy((h,), 0.02, g, 1.0)
            w[p + n + ".bias"] = noisy((h,), 0.02, g)
    safetensors.torch.save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(v, indent=2, sort_keys=True) + "\n")
    bench_tokenizer(out)


# nomic-embed-text-v1.5's config.json (the keys src/model/nomic_bert.rs's test quotes).
NOMIC_V15 = """{
  "activation_function": "swiglu", "architectures": ["NomicBertModel"], "attn_pdrop": 0.0,
  "bos_token_id": null, "causal": false, "dense_seq_output": true, "embd_pdrop": 0.0,
  "eos_token_id": null, "fused_bias_fc": true, "fused_dropout_add_ln": true,
  "initializer_range": 0.02, "layer_norm_epsilon": 1e-12, "max_trained_positions": 2048,
  "mlp_fc1_bias": false, "mlp_fc2_bias": false, "model_type": "nomic_bert", "n_embd": 768,
  "n_head": 12, "n_inner": 3072, "n_layer": 12, "n_positions": 8192,
  "pad_vocab_size_multiple": 64, "parallel_block": false, "parallel_block_tied_norm": false,
  "prenorm": false, "qkv_proj_bias": false, "reorder_and_upcast_attn": false,
  "resid_pdrop": 0.0, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
  "rotary_emb_interleaved": false, "rotary_emb_scale_base": null,
  "rotary_scaling_factor": null, "scale_attn_by_inverse_layer_idx": false,
  "scale_attn_weights": true, "summary_activation": null, "summary_first_dropout": 0.0,
  "summary_proj_to_labels": true, "summary_type": "cls_index", "summary_use_proj": true,
  "torch_dtype": "float32", "transformers_version": "4.34.0", "type_vocab_size": 2,
  "use_cache": true, "use_flash_attn": true, "use_rms_norm": false, "use_xentropy": true,
  "vocab_size": 30528
}"""


def bench(args):
    root = Path(args[args.index("--bench") + 1])
    layers = None
    if "--layers" in args:
        layers = int(args[args.index("--layers") + 1])
    bench_modernbert(root, layers or 22)
    bench_nomic(root, layers or 12)
    for name in ["modernbert-base", "nomic-base"]:
        size = (root / name / "model.safetensors").stat().st_size
        print(f"{name}: model.safetensors {size / 1e6:.0f} MB in {root / name}", file=sys.stderr)


def main(only):
    makers = {"modernbert": modernbert, "nomic_bert": nomic_bert, "jina_bert": jina_bert,
              "st-modernbert": st_modernbert}
    for name, make in makers.items():
        if only and name not in only:
            continue
        make()
        out = OUT / name
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{name}: {size} bytes in {out}", file=sys.stderr)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(sys.argv)
    else:
        main(set(sys.argv[1:]))
