//! Writes a random BERT in Hugging Face layout, for trying the CLI and timing shapes that
//! cannot be downloaded here:
//!
//!     cargo run --release --example write_tiny_model -- DIR [HIDDEN LAYERS [TOKENIZER_DIR]]
//!
//! With TOKENIZER_DIR, its tokenizer.json/vocab.txt replace the tiny vocabulary and the
//! embeddings get its vocabulary size: `768 12 models/all-MiniLM-L6-v2` gives a random model
//! shaped like bert-base-uncased.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "tiny-bert".into());
    let mut spec = fetch_ml::testutil::TinyBert::default();
    if let Some(h) = args.next() {
        spec.hidden = h.parse()?;
        spec.intermediate = 4 * spec.hidden;
        spec.heads = (spec.hidden / 64).max(1);
    }
    if let Some(l) = args.next() {
        spec.layers = l.parse()?;
    }
    let tokenizer_dir = args.next();
    if let Some(t) = &tokenizer_dir {
        let vocab = std::fs::read_to_string(Path::new(t).join("vocab.txt"))?;
        spec.vocab_size = Some(vocab.lines().count());
        spec.max_positions = 512;
    }
    spec.write(Path::new(&dir))?;
    if let Some(t) = &tokenizer_dir {
        for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json"] {
            std::fs::copy(Path::new(t).join(f), Path::new(&dir).join(f))?;
        }
    }
    println!("wrote {dir}");
    Ok(())
}
