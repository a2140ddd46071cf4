//! Where parameters come from: safetensors files, seeded initialisation, and which become `Var`s.
//!
//! [`ParamSource`] is a candle `VarBuilder` backend. Model blocks keep the usual
//! `load(vb, &cfg)` shape; the source decides, by name, whether a tensor is read from a file
//! (the first file that has it wins, so a checkpoint can overlay a base model), freshly
//! initialised from a seeded generator (only when the source allows it: the heads of a new
//! model, never the encoder), and whether it is trainable. Trainable tensors are handed out as
//! `Var`s; frozen ones as plain tensors, so backprop never walks them. Every tensor handed out
//! is recorded in a shared [`ParamRegistry`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One parameter handed out to a model block.
#[derive(Clone)]
pub struct Param {
    /// Canonical name, as written in our checkpoints (no `bert.` prefix).
    pub name: String,
    /// The tensor the model computes with (the `Var`'s own tensor when trainable).
    pub tensor: Tensor,
    /// Present when the optimizer may update this parameter.
    pub var: Option<Var>,
}

impl Param {
    pub fn trainable(&self) -> bool {
        self.var.is_some()
    }
    pub fn numel(&self) -> usize {
        self.tensor.elem_count()
    }
}

/// Every parameter handed out while building a model, in load order.
#[derive(Default)]
pub struct ParamRegistry {
    params: Mutex<Vec<Param>>,
}

impl ParamRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    fn push(&self, p: Param) {
        self.params.lock().expect("registry lock").push(p)
    }
    /// A snapshot of all parameters.
    pub fn params(&self) -> Vec<Param> {
        self.params.lock().expect("registry lock").clone()
    }
    /// The trainable variables, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.params().into_iter().filter_map(|p| p.var).collect()
    }
}

/// A safetensors file opened for reading, with HF name aliasing.
pub struct WeightFile {
    path: PathBuf,
    st: MmapedSafetensors,
    fingerprint: std::sync::OnceLock<String>,
}

/// What a whole-file [`WeightFile::fingerprint`] starts with.
pub const FINGERPRINT_PREFIX: &str = "xxh3-128:";

impl WeightFile {
    /// Opens (memory-maps) a safetensors file and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: the file is mapped read-only; we copy each tensor out of it when loading.
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            let detail = diagnose_header(path).unwrap_or_else(|| e.to_string());
            candle_core::Error::Msg(format!(
                "cannot read {}: {detail}. The file is corrupt or truncated; delete it and fetch it again",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            st,
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's own name for `name`: as is, with a `bert.` prefix, or with the old
    /// `gamma`/`beta` LayerNorm names that `bert-base-uncased` still uses.
    fn resolve(&self, name: &str) -> Option<String> {
        let mut candidates = vec![name.to_string()];
        if let Some(stem) = name.strip_suffix("LayerNorm.weight") {
            candidates.push(format!("{stem}LayerNorm.gamma"));
        }
        if let Some(stem) = name.strip_suffix("LayerNorm.bias") {
            candidates.push(format!("{stem}LayerNorm.beta"));
        }
        let prefixed: Vec<String> = candidates.iter().map(|c| format!("bert.{c}")).collect();
        candidates.extend(prefixed);
        candidates.into_iter().find(|c| self.st.get(c).is_ok())
    }

    /// Reads `name` as an f32 tensor, checking it has `shape`.
    fn load(&self, name: &str, shape: &Shape, dev: &Device) -> Result<Option<Tensor>> {
        let Some(file_name) = self.resolve(name) else {
            return Ok(None);
        };
        let t = self.st.load(&file_name, dev).map_err(|e| {
            candle_core::Error::Msg(format!(
                "cannot read tensor {file_name} from {}: {e}",
                self.path.display()
            ))
        })?;
        if t.shape() != shape {
            bail!(
                "tensor {file_name} in {} has shape {:?} but the model expects {:?} (from config.json, or the checkpoint's head sizes); \
                 the config and the weights belong to different models",
                self.path.display(),
                t.dims(),
                shape.dims()
            )
        }
        Ok(Some(t.to_dtype(DType::F32)?))
    }

    /// A fingerprint of the whole file: `xxh3-128:` and the XXH3 128-bit hash of every byte
    /// (about 0.1 s for a 440 MB bert-base file in the page cache). Computed once per run.
    /// Any change to the weights changes it, so cached vectors and checkpoints never outlive
    /// the model they were made from.
    pub fn fingerprint(&self) -> std::io::Result<String> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        use std::io::Read;
        let mut f = std::fs::File::open(&self.path)?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
        }
        let fp = format!("{FINGERPRINT_PREFIX}{:032x}", hasher.digest128());
        Ok(self.fingerprint.get_or_init(|| fp).clone())
    }

    /// The fingerprint of fetch-ml 0.1's first checkpoints: FNV-1a over the file's length and
    /// its first 2 MiB only. Kept to check those checkpoints (weakly) against their base model.
    pub fn legacy_fingerprint(&self) -> std::io::Result<String> {
        use std::io::Read;
        let mut f = std::fs::File::open(&self.path)?;
        let len = f.metadata()?.len();
        let mut buf = Vec::new();
        f.by_ref().take(2 << 20).read_to_end(&mut buf)?;
        let mut h: u64 = 0xcbf29ce484222325;
        for b in len.to_le_bytes().iter().chain(&buf) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        Ok(format!("{h:016x}"))
    }

    /// The raw bytes of a u8 tensor stored under exactly `name`; `None` when there is none.
    pub fn raw_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        if self.st.get(name).is_err() {
            return Ok(None);
        }
        let t = self.st.load(name, &Device::Cpu)?;
        if t.dtype() != DType::U8 {
            bail!("tensor {name} in {} is not bytes", self.path.display());
        }
        Ok(Some(t.flatten_all()?.to_vec1::<u8>()?))
    }

    /// The names stored in the file.
    pub fn names(&self) -> Vec<String> {
        self.st.tensors().into_iter().map(|(n, _)| n).collect()
    }
}

/// Names the first tensor whose entry in a safetensors header does not fit its shape, data
/// type or the file (safetensors' own error does not say which); `None` when none is found.
fn diagnose_header(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let file_len = f.metadata().ok()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        return Some(format!(
            "the header claims {n} bytes but the file has {file_len}"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let data_len = file_len - 8 - n;
    for (name, info) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let size = match info["dtype"].as_str()? {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let shape: Option<Vec<u64>> = info["shape"]
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect();
        let offsets = info["data_offsets"].as_array()?;
        let (Some(shape), Some(a), Some(b)) = (
            shape,
            offsets.first().and_then(|x| x.as_u64()),
            offsets.get(1).and_then(|x| x.as_u64()),
        ) else {
            return Some(format!(
                "tensor {name}: its shape or data offsets are not numbers"
            ));
        };
        let want = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d));
        if b < a || Some(b - a) != want || b > data_len {
            return Some(format!(
                "tensor {name}: shape {shape:?} of {} needs {} bytes, but its data offsets \
                 [{a}, {b}] give {} (the data section has {data_len} bytes)",
                info["dtype"].as_str().unwrap_or("?"),
                want.map_or("too many".into(), |w| w.to_string()),
                b.saturating_sub(a)
            ));
        }
    }
    None
}

/// Decides whether a named parameter is trainable.
pub type TrainablePredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A `VarBuilder` backend over weight files, an optional seeded initialiser and a freeze rule.
pub struct ParamSource {
    files: Vec<Arc<WeightFile>>,
    init_rng: Option<Mutex<StdRng>>,
    trainable: TrainablePredicate,
    registry: Arc<ParamRegistry>,
}

impl ParamSource {
    /// A source that reads every tensor from `files` (first match wins) and fails on a missing one.
    pub fn from_files(files: Vec<Arc<WeightFile>>, registry: Arc<ParamRegistry>) -> Self {
        Self {
            files,
            init_rng: None,
            trainable: Arc::new(|_| false),
            registry,
        }
    }

    /// Tensors missing from the files are initialised from a generator seeded with `seed`.
    pub fn with_init_seed(mut self, seed: u64) -> Self {
        self.init_rng = Some(Mutex::new(StdRng::seed_from_u64(seed)));
        self
    }

    /// Parameters for which `trainable(name)` holds become `Var`s.
    pub fn with_trainable(mut self, trainable: TrainablePredicate) -> Self {
        self.trainable = trainable;
        self
    }

    /// Wraps the source into a `VarBuilder` on `dev`.
    pub fn into_var_builder(self, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), DType::F32, dev.clone())
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        if names.is_empty() {
            "no weight file".to_string()
        } else {
            names.join(", ")
        }
    }
}

impl SimpleBackend for ParamSource {
    fn get(&self, s: Shape, name: &str, h: Init, _dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut found = None;
        for f in &self.files {
            if let Some(t) = f.load(name, &s, dev)? {
                found = Some(t);
                break;
            }
        }
        let tensor = match (found, &self.init_rng) {
            (Some(t), _) => t,
            (None, Some(rng)) => {
                let mut rng = rng.lock().expect("init rng lock");
                sample_init(h, &s, &mut rng, dev)?
            }
            (None, None) => bail!(
                "tensor {name} (shape {:?}) is missing from {}; the weights do not match \
                 config.json, or the file is incomplete",
                s.dims(),
                self.file_list()
            ),
        };
        let (tensor, var) = if (self.trainable)(name) {
            let var = Var::from_tensor(&tensor)?;
            (var.as_tensor().clone(), Some(var))
        } else {
            (tensor, None)
        };
        self.registry.push(Param {
            name: name.to_string(),
            tensor: tensor.clone(),
            var,
        });
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        bail!("tensor {name}: loading without a shape is not supported")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.resolve(name).is_some())
    }
}

/// Draws a tensor of `shape` as `init` describes, from `rng`.
pub fn sample_init(init: Init, shape: &Shape, rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * standard_normal(rng)) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
                NormalOrUniform::Normal => (0..n)
                    .map(|_| (std * standard_normal(rng)) as f32)
                    .collect(),
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), dev)
}

/// One draw from N(0, 1) by the Box-Muller transform.
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
