//! The long-context architectures' fixtures (`tests/fixtures/arch/<name>/`, written by
//! `scripts/make-long-fixtures.py`) and what their tests read from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;

pub const ARCHS: [&str; 3] = ["modernbert", "nomic_bert", "jina_bert"];

/// A sentence longer than the small windows and limits the tests set.
pub const LONG: &str = "Paris is the capital of France, and Berlin is the capital of Germany; \
                        the quick brown fox jumps over the lazy dog.";

/// Tolerance of f32 outputs against the independent implementations (max abs difference).
pub const TOL: f32 = 1e-5;

/// The fixture folder `tests/fixtures/arch/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/arch")
        .join(name)
}

/// A fixture's `reference.json`: what the script tokenized and the model type it wrote.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub model_type: String,
    pub sentences: Vec<String>,
    /// `long` (random ids, lengths 1 to 1,100) and `sentences` (the sentences tokenized).
    pub ids: HashMap<String, Vec<Vec<u32>>>,
}

/// The `reference.json` of fixture `name`.
pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The model folder at `path`, loaded as task 1 loads it.
pub fn assets(path: &Path) -> ModelAssets {
    ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), None)
        .unwrap_or_else(|e| panic!("load {}: {e:#}", path.display()))
}
