//! Architectures: which `config.json` names which, and each architecture's tensor names.

use super::*;

#[test]
fn model_type_decides_and_unknown_is_named() {
    let arch = |v: Value| Architecture::from_config(&v);
    assert_eq!(arch(json!({})).unwrap(), Architecture::Bert);
    assert_eq!(
        arch(json!({"model_type": "xlm-roberta"})).unwrap(),
        Architecture::XlmRoberta
    );
    assert_eq!(
        arch(json!({"architectures": ["DistilBertModel"]})).unwrap(),
        Architecture::DistilBert
    );
    assert_eq!(
        arch(json!({"architectures": ["XLMRobertaModel"]})).unwrap(),
        Architecture::XlmRoberta
    );
    let e = arch(json!({"model_type": "t5"})).unwrap_err().to_string();
    assert!(
        e.contains("\"t5\"") && e.contains("xlm-roberta, distilbert, mpnet"),
        "{e}"
    );
    assert_eq!(
        arch(json!({"architectures": ["MPNetForMaskedLM"]})).unwrap(),
        Architecture::Mpnet
    );
    let e = arch(json!({"architectures": ["T5EncoderModel"]}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("T5EncoderModel") && e.contains("bert"), "{e}");
}

#[test]
fn tensor_names_per_architecture() {
    let d = Architecture::DistilBert;
    assert_eq!(
        d.hf_names("encoder.layer.3.attention.self.key.bias"),
        vec![
            "transformer.layer.3.attention.k_lin.bias",
            "distilbert.transformer.layer.3.attention.k_lin.bias"
        ]
    );
    assert_eq!(
        d.hf_names("encoder.layer.0.output.LayerNorm.weight")[0],
        "transformer.layer.0.output_layer_norm.weight"
    );
    assert_eq!(
        d.hf_names("encoder.layer.1.attention.output.dense.weight")[0],
        "transformer.layer.1.attention.out_lin.weight"
    );
    assert_eq!(
        d.hf_names("embeddings.LayerNorm.bias")[0],
        "embeddings.LayerNorm.bias"
    );
    let r = Architecture::Roberta.hf_names("embeddings.word_embeddings.weight");
    assert_eq!(
        r,
        vec![
            "embeddings.word_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight"
        ]
    );
    let m = Architecture::Mpnet;
    assert_eq!(
        m.hf_names("encoder.layer.2.attention.output.dense.bias"),
        vec![
            "encoder.layer.2.attention.attn.o.bias",
            "mpnet.encoder.layer.2.attention.attn.o.bias"
        ]
    );
    assert_eq!(
        m.hf_names("encoder.layer.0.attention.output.LayerNorm.weight")[0],
        "encoder.layer.0.attention.LayerNorm.weight"
    );
    assert_eq!(
        m.hf_names("encoder.layer.0.output.LayerNorm.weight")[0],
        "encoder.layer.0.output.LayerNorm.weight"
    );
    assert_eq!(
        m.hf_names("encoder.relative_attention_bias.weight"),
        vec![
            "encoder.relative_attention_bias.weight",
            "mpnet.encoder.relative_attention_bias.weight"
        ]
    );
    let b = Architecture::Bert.hf_names("embeddings.LayerNorm.weight");
    assert_eq!(
        b,
        vec![
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.gamma",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.gamma"
        ]
    );
}

#[test]
fn long_context_architectures_are_recognised() {
    let arch = |v: Value| Architecture::from_config(&v).unwrap();
    assert_eq!(
        arch(json!({"model_type": "modernbert"})),
        Architecture::ModernBert
    );
    assert_eq!(
        arch(json!({"model_type": "nomic_bert"})),
        Architecture::NomicBert
    );
    assert_eq!(
        arch(json!({"model_type": "jina_bert"})),
        Architecture::JinaBert
    );
    // jina-embeddings-v2: a BERT config with ALiBi.
    let jina = json!({"model_type": "bert", "position_embedding_type": "alibi"});
    assert_eq!(arch(jina), Architecture::JinaBert);
    let bert = json!({"model_type": "bert", "position_embedding_type": "absolute"});
    assert_eq!(arch(bert), Architecture::Bert);
    assert_eq!(
        arch(json!({"architectures": ["NomicBertModel"]})),
        Architecture::NomicBert
    );
    assert_eq!(
        arch(json!({"architectures": ["ModernBertModel"]})),
        Architecture::ModernBert
    );
    assert_eq!(
        arch(json!({"architectures": ["JinaBertForMaskedLM"]})),
        Architecture::JinaBert
    );
    let e = Architecture::from_config(&json!({"model_type": "t5"})).unwrap_err();
    assert!(
        e.to_string().contains("modernbert, nomic_bert, jina_bert"),
        "{e}"
    );
}

#[test]
fn long_context_tensor_names() {
    let m = Architecture::ModernBert;
    assert_eq!(
        m.hf_names("embeddings.word_embeddings.weight"),
        vec![
            "embeddings.tok_embeddings.weight",
            "model.embeddings.tok_embeddings.weight"
        ]
    );
    assert_eq!(m.rename("embeddings.norm.weight"), "embeddings.norm.weight");
    assert_eq!(
        m.rename("encoder.layer.12.attn.Wqkv.weight"),
        "layers.12.attn.Wqkv.weight"
    );
    assert_eq!(
        m.rename("encoder.layer.3.final_norm.weight"),
        "final_norm.weight"
    );
    let n = Architecture::NomicBert;
    assert_eq!(n.rename("embeddings.LayerNorm.bias"), "emb_ln.bias");
    assert_eq!(
        n.rename("embeddings.token_type_embeddings.weight"),
        "embeddings.token_type_embeddings.weight"
    );
    assert_eq!(
        n.rename("encoder.layer.0.mlp.fc11.weight"),
        "encoder.layers.0.mlp.fc11.weight"
    );
    let j = Architecture::JinaBert;
    assert_eq!(
        j.rename("encoder.layer.1.mlp.gated_layers.weight"),
        "encoder.layer.1.mlp.gated_layers.weight"
    );
}
