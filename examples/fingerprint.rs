//! Prints a weights file's fingerprint and how long it took, as checkpoints and the
//! embedding cache compute it:
//!
//!     cargo run --release --example fingerprint -- model.safetensors

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "model.safetensors".into());
    let file = fetch_ml::model::weights::WeightFile::open(std::path::Path::new(&path))?;
    let start = std::time::Instant::now();
    let fp = file.fingerprint()?;
    let size = std::fs::metadata(&path)?.len();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{fp}  {path}: {} MB in {secs:.3} s ({:.1} GB/s)",
        size >> 20,
        size as f64 / secs / 1e9
    );
    Ok(())
}
