//! Writes a tiny random BERT in Hugging Face layout: `cargo run --release --example
//! write_tiny_model -- DIR [HIDDEN LAYERS]`. Handy for trying the CLI without a real model.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "tiny-bert".into());
    let mut spec = fetch_ml::testutil::TinyBert::default();
    if let Some(h) = args.next() {
        spec.hidden = h.parse()?;
        spec.intermediate = 2 * spec.hidden;
    }
    if let Some(l) = args.next() {
        spec.layers = l.parse()?;
    }
    spec.write(std::path::Path::new(&dir))?;
    println!("wrote {dir}");
    Ok(())
}
