//! Where parameters come from: safetensors files, seeded initialisation, and which become `Var`s.
//!
//! [`ParamSource`] is a candle `VarBuilder` backend. Model blocks keep the usual
//! `load(vb, &cfg)` shape; the source decides, by name, whether a tensor is read from a file
//! (the first file that has it wins, so a checkpoint can overlay a base model), freshly
//! initialised from a seeded generator (only when the source allows it: the heads of a new
//! model, never the encoder), and whether it is trainable. Trainable tensors are handed out as
//! `Var`s; frozen ones as plain tensors, so backprop never walks them. Every tensor handed out
//! is recorded in a shared [`ParamRegistry`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::arch::Architecture;

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
///
/// The file is not memory-mapped: each tensor is read with a positioned read straight into
/// its own buffer when a model block asks for it. So the process never holds the file's pages
/// and a full copy at once (a mapping counts in RSS; weights were 2x in memory with one), and
/// a file truncated or rewritten while in use gives a read error naming the tensor instead of
/// a SIGBUS. The header is checked whole at open: every tensor's data offsets must match its
/// shape and data type and lie inside the file.
pub struct WeightFile {
    path: PathBuf,
    file: std::fs::File,
    tensors: HashMap<String, TensorEntry>,
    /// Where the data section starts in the file.
    data_start: u64,
    fingerprint: std::sync::OnceLock<String>,
    /// How the file names its tensors (see [`WeightFile::with_architecture`]).
    arch: Architecture,
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range within the data section.
    start: u64,
    end: u64,
}

/// What a whole-file [`WeightFile::fingerprint`] starts with.
pub const FINGERPRINT_PREFIX: &str = "xxh3-128:";

/// Headers larger than this are refused (bert-base's is about 20 KB).
const MAX_HEADER: u64 = 100 << 20;

impl WeightFile {
    /// Opens a safetensors file and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |what: String| {
            candle_core::Error::Msg(format!(
                "cannot read {}: {what}. The file is corrupt or truncated; delete it and fetch it again",
                path.display()
            ))
        };
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        let mut len = [0u8; 8];
        read_at(&file, &mut len, 0)
            .map_err(|_| fail("the file is shorter than a header".into()))?;
        let n = u64::from_le_bytes(len);
        if n > file_len.saturating_sub(8) || n > MAX_HEADER {
            return Err(fail(format!(
                "the header claims {n} bytes but the file has {file_len}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        read_at(&file, &mut header, 8).map_err(|e| fail(e.to_string()))?;
        let data_len = file_len - 8 - n;
        let tensors = parse_header(&header, data_len).map_err(fail)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
            data_start: 8 + n,
            fingerprint: std::sync::OnceLock::new(),
            arch: Architecture::Bert,
        })
    }

    /// Reads the file's tensors under `arch`'s names (a base model's file; our own
    /// checkpoints use the canonical names, which every architecture tries first).
    pub fn with_architecture(mut self, arch: Architecture) -> Self {
        self.arch = arch;
        self
    }

    /// Reads the tensor stored under exactly `name` onto `dev`, in its stored data type.
    fn read(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {name}")))?;
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        read_at(&self.file, &mut bytes, self.data_start + e.start).map_err(|err| {
            candle_core::Error::Msg(format!(
                "cannot read tensor {name} from {}: {err} (was the file changed while fetch-ml \
                 ran?)",
                self.path.display()
            ))
        })?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, dev)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's own name for the canonical `name`: as is, or as the file's architecture
    /// names it ([`Architecture::hf_names`]: a `bert.`/`roberta.`/`distilbert.`/`mpnet.` prefix,
    /// DistilBERT's and MPNet's own names, the old `gamma`/`beta` LayerNorm names of `bert-base-uncased`).
    fn resolve(&self, name: &str) -> Option<String> {
        if self.tensors.contains_key(name) {
            return Some(name.to_string());
        }
        self.arch
            .hf_names(name)
            .into_iter()
            .find(|c| self.tensors.contains_key(c))
    }

    /// Reads `name` as an f32 tensor, checking it has `shape`.
    fn load(&self, name: &str, shape: &Shape, dev: &Device) -> Result<Option<Tensor>> {
        let Some(file_name) = self.resolve(name) else {
            return Ok(None);
        };
        let t = self.read(&file_name, dev).map_err(|e| {
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
        let t = t.to_dtype(DType::F32)?;
        crate::finite::check_tensor(&t, &file_name, &self.path)?;
        Ok(Some(t))
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
        if !self.tensors.contains_key(name) {
            return Ok(None);
        }
        let t = self.read(name, &Device::Cpu)?;
        if t.dtype() != DType::U8 {
            bail!("tensor {name} in {} is not bytes", self.path.display());
        }
        Ok(Some(t.flatten_all()?.to_vec1::<u8>()?))
    }

    /// The names stored in the file.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Reads `buf.len()` bytes at `offset`.
fn read_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset)
}

/// Parses a safetensors header and checks each entry against the data section's length:
/// an error names the first tensor whose offsets do not fit its shape and data type.
fn parse_header(
    header: &[u8],
    data_len: u64,
) -> std::result::Result<HashMap<String, TensorEntry>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("invalid JSON in the header: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "the header is not a JSON object".to_string())?;
    let mut out = HashMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor {name}: {what}");
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            Some("I64") => DType::I64,
            Some(other) => return Err(bad(&format!("data type {other} is not supported"))),
            None => return Err(bad("no data type")),
        };
        let shape: Option<Vec<usize>> = info["shape"].as_array().and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let offsets = info["data_offsets"].as_array();
        let pair = offsets.and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let (Some(shape), Some((a, b))) = (shape, pair) else {
            return Err(bad("its shape or data offsets are not numbers"));
        };
        let want = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        if b < a || Some(b - a) != want || b > data_len {
            return Err(format!(
                "tensor {name}: shape {shape:?} of {dtype:?} needs {} bytes, but its data offsets \
                 [{a}, {b}] give {} (the data section has {data_len} bytes)",
                want.map_or("too many".into(), |w| w.to_string()),
                b.saturating_sub(a)
            ));
        }
        out.insert(
            name.clone(),
            TensorEntry {
                dtype,
                shape,
                start: a,
                end: b,
            },
        );
    }
    Ok(out)
}

/// Decides whether a named parameter is trainable.
pub type TrainablePredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A `VarBuilder` backend over weight files, an optional seeded initialiser and a freeze rule.
pub struct ParamSource {
    files: Vec<Arc<WeightFile>>,
    init_rng: Option<Mutex<StdRng>>,
    trainable: TrainablePredicate,
    /// Where handed-out parameters are recorded; `None` records nothing, so a tensor lives
    /// only as long as the model block that holds it (see [`ParamSource::unrecorded`]).
    registry: Option<Arc<ParamRegistry>>,
}

impl ParamSource {
    /// A source that reads every tensor from `files` (first match wins) and fails on a missing one.
    pub fn from_files(files: Vec<Arc<WeightFile>>, registry: Arc<ParamRegistry>) -> Self {
        Self {
            files,
            init_rng: None,
            trainable: Arc::new(|_| false),
            registry: Some(registry),
        }
    }

    /// A source that records nothing: for loading that converts and drops each block as it
    /// goes (a registry would keep every float32 tensor alive until loading ends).
    pub fn unrecorded(files: Vec<Arc<WeightFile>>) -> Self {
        Self {
            files,
            init_rng: None,
            trainable: Arc::new(|_| false),
            registry: None,
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
        if let Some(registry) = &self.registry {
            registry.push(Param {
                name: name.to_string(),
                tensor: tensor.clone(),
                var,
            });
        }
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
