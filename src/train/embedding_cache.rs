//! An on-disk cache of a frozen encoder's sentence vectors, so repeated experiments skip the
//! encoder. One file per model: the name is a hash of the model id, revision, weights
//! fingerprint, max length and pooling, and the header repeats them; entries are keyed by the
//! exact text and carry a checksum. A file for another model, or a corrupt one, is never
//! trusted: stale files are ignored and rewritten, corrupt entries are dropped.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const MAGIC: &[u8; 8] = b"FMLEMB01";

/// What the cached vectors depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheKey {
    pub model: String,
    pub revision: String,
    /// Fingerprint of the weights file (see `WeightFile::fingerprint`).
    pub fingerprint: String,
    pub max_seq_length: usize,
    pub pooling: String,
    pub dimension: usize,
    /// The encoder's arithmetic (`f32`, `bf16`, `int8`): each gives other vectors.
    pub dtype: String,
}

impl CacheKey {
    fn describe(&self) -> String {
        format!(
            "model={}\nrevision={}\nfingerprint={}\nmax_seq_length={}\npooling={}\ndimension={}\ndtype={}\n",
            self.model,
            self.revision,
            self.fingerprint,
            self.max_seq_length,
            self.pooling,
            self.dimension,
            self.dtype
        )
    }
}

/// FNV-1a, 64 bits: a stable hash for names and checksums.
fn fnv(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for c in chunks {
        for b in *c {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Sentence vectors by text, for one [`CacheKey`].
pub struct EmbeddingCache {
    path: PathBuf,
    key: CacheKey,
    entries: HashMap<String, Vec<f32>>,
    dirty: bool,
    /// What happened when the file was read, for the user.
    pub note: Option<String>,
}

impl EmbeddingCache {
    /// Opens the cache for `key` in `dir` (created if needed).
    pub fn open(dir: &Path, key: CacheKey) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "{}: cannot create the embedding cache folder",
                dir.display()
            )
        })?;
        let name = format!("{:016x}.fmlcache", fnv(&[key.describe().as_bytes()]));
        let path = dir.join(name);
        let mut cache = Self {
            path,
            key,
            entries: HashMap::new(),
            dirty: false,
            note: None,
        };
        if cache.path.exists() {
            let bytes = std::fs::read(&cache.path)
                .with_context(|| format!("reading {}", cache.path.display()))?;
            cache.note = cache.parse(&bytes);
        }
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, text: &str) -> Option<&[f32]> {
        self.entries.get(text).map(Vec::as_slice)
    }

    pub fn insert(&mut self, text: &str, vector: Vec<f32>) {
        debug_assert_eq!(vector.len(), self.key.dimension);
        self.entries.insert(text.to_string(), vector);
        self.dirty = true;
    }

    /// Reads the entries of a file; returns a note when part or all of it was not usable.
    fn parse(&mut self, bytes: &[u8]) -> Option<String> {
        let header = self.key.describe();
        let mut r = Reader { bytes, pos: 0 };
        let stale = || {
            Some(
                "the cache file belongs to another model or format; it will be rewritten"
                    .to_string(),
            )
        };
        if r.take(8) != Some(MAGIC.as_slice()) {
            return stale();
        }
        let Some(len) = r.u32() else { return stale() };
        if r.take(len as usize) != Some(header.as_bytes()) {
            return stale();
        }
        let dim = self.key.dimension;
        let mut kept = 0;
        while r.pos < bytes.len() {
            let entry = (|| {
                let n = r.u32()? as usize;
                let text = r.take(n)?;
                let floats = r.take(dim * 4)?;
                let sum = r.take(8)?;
                (u64::from_le_bytes(sum.try_into().ok()?) == fnv(&[text, floats]))
                    .then_some((text, floats))
            })();
            let Some((text, floats)) = entry else {
                self.dirty = true;
                return Some(format!(
                    "{}: corrupt entry after {kept} good one(s); the rest was dropped and will be recomputed",
                    self.path.display()
                ));
            };
            let Ok(text) = std::str::from_utf8(text) else {
                self.dirty = true;
                return Some(format!(
                    "{}: corrupt text after {kept} entries; the rest was dropped",
                    self.path.display()
                ));
            };
            let v = floats
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            self.entries.insert(text.to_string(), v);
            kept += 1;
        }
        None
    }

    /// Writes the cache if it changed: to a temporary file, then renamed over the old one.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let dir = crate::atomic::parent_of(&self.path);
        let target = match crate::atomic::classify(&self.path)? {
            crate::atomic::Target::Replace(t) => t,
            _ => anyhow::bail!(
                "{} exists and is not a regular file; the embedding cache leaves it alone",
                self.path.display()
            ),
        };
        let tmp = crate::atomic::NewFile::create(&target)
            .with_context(|| format!("writing into {}", dir.display()))?;
        let mut w = BufWriter::new(tmp);
        let header = self.key.describe();
        w.write_all(MAGIC)?;
        w.write_all(&(header.len() as u32).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut texts: Vec<&String> = self.entries.keys().collect();
        texts.sort();
        for text in texts {
            let floats: Vec<u8> = self.entries[text]
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect();
            w.write_all(&(text.len() as u32).to_le_bytes())?;
            w.write_all(text.as_bytes())?;
            w.write_all(&floats)?;
            w.write_all(&fnv(&[text.as_bytes(), &floats]).to_le_bytes())?;
        }
        let tmp = w.into_inner().map_err(|e| e.into_error())?;
        tmp.commit()
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fp: &str) -> CacheKey {
        CacheKey {
            model: "m".into(),
            revision: "main".into(),
            fingerprint: fp.into(),
            max_seq_length: 128,
            pooling: "mean".into(),
            dimension: 3,
            dtype: "f32".into(),
        }
    }

    #[test]
    fn round_trip_and_stale_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EmbeddingCache::open(dir.path(), key("a")).unwrap();
        c.insert("hello", vec![1.0, 2.0, 3.0]);
        c.insert("wörld ✓", vec![-0.5, 0.25, f32::MIN_POSITIVE]);
        c.save().unwrap();
        let c2 = EmbeddingCache::open(dir.path(), key("a")).unwrap();
        assert_eq!(c2.get("hello"), Some([1.0, 2.0, 3.0].as_slice()));
        assert_eq!(
            c2.get("wörld ✓"),
            Some([-0.5, 0.25, f32::MIN_POSITIVE].as_slice())
        );
        assert!(c2.note.is_none());

        // Another model: another file, nothing reused.
        let other = EmbeddingCache::open(dir.path(), key("b")).unwrap();
        assert!(other.is_empty() && other.path() != c2.path());

        // A file renamed to the wrong key is stale, not trusted.
        std::fs::copy(c2.path(), other.path()).unwrap();
        let stale = EmbeddingCache::open(dir.path(), key("b")).unwrap();
        assert!(stale.is_empty() && stale.note.as_deref().unwrap().contains("another model"));

        // Flip one byte of the last entry's vector: that entry is dropped, the first kept.
        let mut bytes = std::fs::read(c2.path()).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        std::fs::write(c2.path(), &bytes).unwrap();
        let damaged = EmbeddingCache::open(dir.path(), key("a")).unwrap();
        assert_eq!(damaged.len(), 1);
        assert!(damaged.note.as_deref().unwrap().contains("corrupt"));

        // A truncated file keeps what is whole.
        std::fs::write(c2.path(), &bytes[..n - 3]).unwrap();
        assert_eq!(EmbeddingCache::open(dir.path(), key("a")).unwrap().len(), 1);
    }
}
