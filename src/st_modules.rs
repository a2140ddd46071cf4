//! sentence-transformers' `modules.json`: which module folders (Pooling, Dense, ...) a model
//! folder has. Read by the hub resolver (to know which files to fetch) and by the pipeline.

use std::path::{Component, Path};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One entry of `modules.json`.
#[derive(Deserialize)]
pub struct Module {
    /// The module's folder, relative to the model folder ("" for the model folder itself).
    #[serde(default)]
    pub path: String,
    /// Its class, such as `sentence_transformers.models.Pooling`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Reads and parses one JSON file, naming it in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The modules `modules.json` lists, in order. A module path that leaves the model folder
/// (absolute, or with a `..` part) is an error, as in sentence-transformers.
pub fn modules(path: &Path) -> Result<Vec<Module>> {
    let modules: Vec<Module> = read_json(path)?;
    for m in &modules {
        let inside = Path::new(&m.path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            bail!(
                "{}: the {} module's path {:?} is outside the model folder; a module must \
                 live in a folder inside the model's",
                path.display(),
                m.kind.rsplit('.').next().unwrap_or(&m.kind),
                m.path
            );
        }
    }
    Ok(modules)
}

/// The folders of the Dense modules listed in `modules.json`, in order.
pub fn dense_module_paths(modules_json: &Path) -> Result<Vec<String>> {
    Ok(modules(modules_json)?
        .into_iter()
        .filter(|m| m.kind.rsplit('.').next() == Some("Dense"))
        .map(|m| m.path)
        .collect())
}

/// The folder of the Pooling module listed in `modules.json`, if any.
pub fn pooling_module_path(modules_json: &Path) -> Result<Option<String>> {
    Ok(modules(modules_json)?
        .into_iter()
        .find(|m| m.kind.ends_with(".Pooling"))
        .map(|m| m.path))
}
