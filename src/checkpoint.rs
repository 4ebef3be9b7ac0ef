//! Merging checkpoint files tensor by tensor: two `.safetensors` checkpoints in (single files
//! or Hugging Face sharded folders), one file out, with only the tensor being merged in memory
//! (the inputs are memory-mapped).
//!
//! The files are read and written with the `safetensors` crate; nothing here parses the format
//! by hand. Every check that can be made before computing (pairing, shapes, dtypes, the output
//! path) is made before the first byte is written; the output goes to a temporary file beside
//! the target and is renamed into place only once complete and finite.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, View};

use crate::report::{MergePlan, MergeReport, PlanEntry};
use crate::schedule::Resolver;
use crate::slerp::slerp_with_stats;
use crate::{MergeError, SlerpConfig, TensorStats};

/// Everything that can go wrong merging files; each names the file or the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file could not be opened, mapped, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file is not a valid safetensors file (truncated, corrupted header, offsets that do
    /// not fit the file, …).
    #[error("{path}: not a valid safetensors file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the reader found.
        message: String,
    },
    /// The inputs do not hold the same tensor names.
    #[error(
        "the inputs do not pair up: missing from B: [{}]; missing from A: [{}] \
         (--union or --intersection merge them anyway)",
        missing_in_b.join(", "),
        missing_in_a.join(", ")
    )]
    Pairing {
        /// Names in A only.
        missing_in_b: Vec<String>,
        /// Names in B only.
        missing_in_a: Vec<String>,
    },
    /// A tensor has different shapes in the two files.
    #[error("tensor `{name}`: A has shape {a:?}, B has shape {b:?}{hint}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Its shape in A.
        a: Vec<usize>,
        /// Its shape in B.
        b: Vec<usize>,
        /// A hint for embeddings of different vocabulary sizes (empty otherwise).
        hint: String,
    },
    /// A tensor's dtypes cannot be merged (a float in one file and not in the other, or a
    /// dtype this tool does not compute in).
    #[error("tensor `{name}`: cannot merge dtype {a} (A) with {b} (B)")]
    DType {
        /// Tensor name.
        name: String,
        /// dtype in A.
        a: String,
        /// dtype in B.
        b: String,
    },
    /// The merged tensor holds a NaN or an infinity (an input did, or the output dtype could
    /// not hold a value).
    #[error("tensor `{name}`: {reason}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Which.
        reason: String,
    },
    /// The output would overwrite an input.
    #[error("refusing to write over input {path}")]
    OverwritesInput {
        /// The path given for the output.
        path: PathBuf,
    },
    /// The merge itself refused (configuration, schedule, …).
    #[error(transparent)]
    Merge(#[from] MergeError),
}

/// How tensors present in only one input are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pairing {
    /// Any tensor missing from either input is an error (the default).
    #[default]
    Strict,
    /// A tensor present in one input only is copied from it.
    Union,
    /// Only tensors present in both inputs are written.
    Intersection,
}

/// The dtype written for merged float tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

/// Options of [`merge_files`].
#[derive(Debug, Clone)]
pub struct FileMerge {
    /// The recipe.
    pub config: SlerpConfig,
    /// Where the arithmetic runs.
    pub device: Device,
    /// Tensors present in one input only.
    pub pairing: Pairing,
    /// Output dtype of merged float tensors; `None`: A's dtype.
    pub out_dtype: Option<OutDType>,
}

/// One memory-mapped, validated safetensors file.
struct Shard {
    map: Mmap,
    header: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives as long as this value; a file truncated by
        // another process while mapped would fault, as for any reader of a mapped file.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let format = |e: safetensors::SafeTensorError| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(format)?;
        // The whole file is checked once here (every offset inside the data section).
        SafeTensors::deserialize(&map).map_err(format)?;
        Ok(Self {
            map,
            header,
            metadata,
        })
    }

    fn bytes(&self, name: &str) -> &[u8] {
        let info = self.metadata.info(name).expect("a validated name");
        let start = 8 + self.header;
        &self.map[start + info.data_offsets.0..start + info.data_offsets.1]
    }
}

/// A checkpoint: one memory-mapped `.safetensors` file, or the shards of a Hugging Face
/// sharded checkpoint (a folder with `model.safetensors.index.json`, or that index file).
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    /// Tensor names in order (shard by shard, each by offset), with their shard.
    names: Vec<(String, usize)>,
    shard_of: HashMap<String, usize>,
}

/// The index file of a sharded checkpoint.
const INDEX: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Maps and validates a checkpoint: every header, dtype and offset; for a sharded one,
    /// also that each tensor the index names is in its shard.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] or [`CheckpointError::Format`], naming the file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let index = if path.is_dir() {
            Some(path.join(INDEX))
        } else if path.to_string_lossy().ends_with(".index.json") {
            Some(path.to_path_buf())
        } else {
            None
        };
        let Some(index) = index else {
            let shard = Shard::open(path)?;
            let names: Vec<(String, usize)> = shard
                .metadata
                .offset_keys()
                .into_iter()
                .map(|n| (n, 0))
                .collect();
            return Ok(Self::new(path, vec![shard], names));
        };
        let format = |message: String| CheckpointError::Format {
            path: index.clone(),
            message,
        };
        let text = std::fs::read_to_string(&index).map_err(|source| CheckpointError::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format("no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        let mut wanted: HashMap<String, String> = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format(format!("`{name}` maps to a non-string")))?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            wanted.insert(name.clone(), file.to_string());
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut names = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let shard_path = dir.join(file);
            let shard = Shard::open(&shard_path)?;
            for name in shard.metadata.offset_keys() {
                if wanted.get(&name).is_some_and(|f| f == file) {
                    names.push((name, i));
                }
            }
            shards.push(shard);
        }
        if names.len() != wanted.len() {
            let found: std::collections::HashSet<&str> =
                names.iter().map(|(n, _)| n.as_str()).collect();
            let mut lost: Vec<String> = wanted
                .iter()
                .filter(|(n, _)| !found.contains(n.as_str()))
                .map(|(n, f)| format!("{n} (in {f})"))
                .collect();
            lost.sort();
            return Err(format(format!(
                "tensors named by the index are missing from their shard: {}",
                lost.join(", ")
            )));
        }
        Ok(Self::new(path, shards, names))
    }

    fn new(path: &Path, shards: Vec<Shard>, names: Vec<(String, usize)>) -> Self {
        let shard_of = names.iter().cloned().collect();
        Self {
            path: path.to_path_buf(),
            shards,
            names,
            shard_of,
        }
    }

    /// Tensor names in file order (shard by shard).
    pub fn names(&self) -> Vec<String> {
        self.names.iter().map(|(n, _)| n.clone()).collect()
    }

    /// `(dtype, shape)` of a tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        let shard = &self.shards[*self.shard_of.get(name)?];
        shard
            .metadata
            .info(name)
            .map(|i| (i.dtype, i.shape.clone()))
    }

    /// The `__metadata__` of the (first) file.
    pub fn metadata(&self) -> Option<HashMap<String, String>> {
        self.shards
            .first()
            .and_then(|s| s.metadata.metadata().clone())
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bytes(&self, name: &str) -> &[u8] {
        self.shards[self.shard_of[name]].bytes(name)
    }
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Little-endian values of a float tensor, widened to f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => unreachable!("not a float dtype: {other:?}"),
    }
}

/// f32 values rounded once to `dtype`; `None` when one of them is not finite there.
fn from_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.bitsize() / 8);
    for v in values {
        match dtype {
            Dtype::F32 => {
                if !v.is_finite() {
                    return None;
                }
                out.extend_from_slice(&v.to_le_bytes());
            }
            Dtype::F16 => {
                let h = f16::from_f32(*v);
                if !h.is_finite() {
                    return None;
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            Dtype::BF16 => {
                let h = bf16::from_f32(*v);
                if !h.is_finite() {
                    return None;
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            other => unreachable!("not a float dtype: {other:?}"),
        }
    }
    Some(out)
}

/// What happens to one output tensor.
#[derive(Debug, Clone)]
enum Job {
    /// Merged from both inputs at this `t`.
    Merge {
        t: f64,
        rule: Option<usize>,
        position: f64,
    },
    /// Copied from A (int and bool tensors, `--union` extras from A).
    CopyA,
    /// Copied from B (`--union` extras from B).
    CopyB,
}

/// One tensor of the output, computed when the writer asks for its bytes.
struct Lazy<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    job: Job,
    a: &'a Checkpoint,
    b: &'a Checkpoint,
    run: &'a Run<'a>,
}

/// Called after each tensor is written, with its name and its size in bytes.
pub type Progress<'a> = dyn FnMut(&str, usize) + 'a;

/// State shared by the lazy tensors while the file is written.
struct Run<'a> {
    options: &'a FileMerge,
    error: RefCell<Option<CheckpointError>>,
    stats: RefCell<Vec<TensorStats>>,
    progress: RefCell<&'a mut Progress<'a>>,
}

impl Lazy<'_> {
    fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }

    fn compute(&self) -> Result<Vec<u8>, CheckpointError> {
        let t = match self.job {
            Job::CopyA => return Ok(self.a.bytes(&self.name).to_vec()),
            Job::CopyB => return Ok(self.b.bytes(&self.name).to_vec()),
            Job::Merge { t, .. } => t,
        };
        let (da, _) = self.a.info(&self.name).expect("paired");
        let (db, _) = self.b.info(&self.name).expect("paired");
        let n: usize = self.shape.iter().product();
        let device = &self.run.options.device;
        let tensor = |dtype, bytes| {
            Tensor::<1>::from_data(TensorData::new(to_f32(dtype, bytes), [n]), device)
        };
        let (a, b) = (
            tensor(da, self.a.bytes(&self.name)),
            tensor(db, self.b.bytes(&self.name)),
        );
        // Row granularity needs the rows: [rows, rest] as stored.
        let config = self
            .run
            .options
            .config
            .clone()
            .with_t(t)
            .with_schedule(None);
        let rows = self.shape.first().copied().unwrap_or(1).max(1);
        let (out, stats) = if self.shape.len() >= 2 {
            let (a2, b2) = (a.reshape([rows, n / rows]), b.reshape([rows, n / rows]));
            let (o, s) = slerp_with_stats(a2, b2, &config).map_err(|e| self.merge_error(e))?;
            (o.reshape([n]), s)
        } else {
            slerp_with_stats(a, b, &config).map_err(|e| self.merge_error(e))?
        };
        if let Some(mut stats) = stats {
            stats.path = self.name.clone();
            self.run.stats.borrow_mut().push(stats);
        }
        let values: Vec<f32> = out.into_data().iter::<f32>().collect();
        from_f32(self.dtype, &values).ok_or_else(|| CheckpointError::NonFinite {
            name: self.name.clone(),
            reason: format!("the merged values do not fit {:?}", self.dtype),
        })
    }

    fn merge_error(&self, e: MergeError) -> CheckpointError {
        match e {
            MergeError::NonFinite { .. } => CheckpointError::NonFinite {
                name: self.name.clone(),
                reason: "an input holds a NaN or an infinity".into(),
            },
            other => CheckpointError::Merge(other),
        }
    }
}

impl View for &Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // The writer cannot take an error: the first one is kept, zeros of the right length
        // are written instead, and the output is discarded at the end.
        let failed = self.run.error.borrow().is_some();
        let bytes = if failed {
            vec![0; self.len()]
        } else {
            match self.compute() {
                Ok(bytes) => bytes,
                Err(e) => {
                    *self.run.error.borrow_mut() = Some(e);
                    vec![0; self.len()]
                }
            }
        };
        (self.run.progress.borrow_mut())(&self.name, bytes.len());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.len()
    }
}

/// Layer positions for a file's tensor names: the first numeric dotted segment is the layer
/// index, `L` is one more than the largest index under the same prefix; names outside layers
/// sit at 0 when they name an embedding and at 1 otherwise.
pub fn layer_positions(names: &[String]) -> HashMap<String, f64> {
    let layer = |name: &str| -> Option<(String, usize)> {
        let parts: Vec<&str> = name.split('.').collect();
        let at = parts.iter().position(|p| p.parse::<usize>().is_ok())?;
        Some((parts[..at].join("."), parts[at].parse().ok()?))
    };
    let mut lengths: HashMap<String, usize> = HashMap::new();
    for name in names {
        if let Some((prefix, index)) = layer(name) {
            let len = lengths.entry(prefix).or_insert(0);
            *len = (*len).max(index + 1);
        }
    }
    names
        .iter()
        .map(|name| {
            let position = match layer(name) {
                Some((prefix, index)) => {
                    let len = lengths[&prefix];
                    if len > 1 {
                        index as f64 / (len - 1) as f64
                    } else {
                        0.0
                    }
                }
                None if is_embedding(name) => 0.0,
                None => 1.0,
            };
            (name.clone(), position)
        })
        .collect()
}

fn is_embedding(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["embed", "wte", "wpe", "tok_embeddings"]
        .iter()
        .any(|m| lower.contains(m))
}

/// The pairing, checks and per-tensor jobs of a merge, in A's file order (then B's extras).
struct Prepared {
    tensors: Vec<(String, Dtype, Vec<usize>, Job)>,
    warnings: Vec<String>,
}

fn prepare(
    a: &Checkpoint,
    b: &Checkpoint,
    options: &FileMerge,
) -> Result<Prepared, CheckpointError> {
    options.config.validate()?;
    let (names_a, names_b) = (a.names(), b.names());
    let in_b: std::collections::HashSet<&String> = names_b.iter().collect();
    let in_a: std::collections::HashSet<&String> = names_a.iter().collect();
    let missing_in_b: Vec<String> = names_a
        .iter()
        .filter(|n| !in_b.contains(n))
        .cloned()
        .collect();
    let missing_in_a: Vec<String> = names_b
        .iter()
        .filter(|n| !in_a.contains(n))
        .cloned()
        .collect();
    if options.pairing == Pairing::Strict && !(missing_in_a.is_empty() && missing_in_b.is_empty()) {
        return Err(CheckpointError::Pairing {
            missing_in_b,
            missing_in_a,
        });
    }
    let mut resolver = Resolver::new(options.config.schedule.as_ref(), options.config.t)?;
    let positions = layer_positions(&names_a);
    let mut tensors = Vec::new();
    for name in &names_a {
        let (da, sa) = a.info(name).expect("listed");
        let Some((db, sb)) = b.info(name) else {
            if options.pairing == Pairing::Union {
                tensors.push((name.clone(), da, sa, Job::CopyA));
            }
            continue;
        };
        if sa != sb {
            let hint = if sa.len() == sb.len()
                && sa.len() == 2
                && sa[1] == sb[1]
                && is_embedding(name)
            {
                ": the vocabularies differ in size; resize one model's embedding first (nothing is \
                 truncated)"
                    .to_string()
            } else {
                String::new()
            };
            return Err(CheckpointError::Shape {
                name: name.clone(),
                a: sa,
                b: sb,
                hint,
            });
        }
        let job = if is_float(da) && is_float(db) {
            let position = positions[name];
            let (t, rule) = resolver.resolve(name, position);
            Job::Merge { t, rule, position }
        } else if da == db && !is_float(da) {
            Job::CopyA
        } else {
            return Err(CheckpointError::DType {
                name: name.clone(),
                a: format!("{da:?}"),
                b: format!("{db:?}"),
            });
        };
        let dtype = match (&job, options.out_dtype) {
            (Job::Merge { .. }, Some(OutDType::F32)) => Dtype::F32,
            (Job::Merge { .. }, Some(OutDType::F16)) => Dtype::F16,
            (Job::Merge { .. }, Some(OutDType::BF16)) => Dtype::BF16,
            _ => da,
        };
        tensors.push((name.clone(), dtype, sa, job));
    }
    if options.pairing == Pairing::Union {
        for name in &missing_in_a {
            let (db, sb) = b.info(name).expect("listed");
            tensors.push((name.clone(), db, sb, Job::CopyB));
        }
    }
    let warnings = resolver.unused("tensor");
    Ok(Prepared { tensors, warnings })
}

/// The dry run of [`merge_files`]: every check, and what each tensor would get.
///
/// # Errors
///
/// As [`merge_files`], except the ones that need the data.
pub fn plan_files(a: &Path, b: &Path, options: &FileMerge) -> Result<MergePlan, CheckpointError> {
    let (a, b) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    let prepared = prepare(&a, &b, options)?;
    let entries = prepared
        .tensors
        .into_iter()
        .filter_map(|(path, dtype, shape, job)| match job {
            Job::Merge { t, rule, position } => Some(PlanEntry {
                path,
                shape,
                dtype: Some(format!("{dtype:?}")),
                t,
                rule,
                position,
                granularity: options.config.granularity,
                method: options.config.method,
            }),
            _ => None,
        })
        .collect();
    Ok(MergePlan {
        entries,
        warnings: prepared.warnings,
    })
}

/// Merges two safetensors files into `out`, one tensor at a time.
///
/// `progress` is called after each tensor with its name and the bytes written. Returns the
/// report of the merged tensors.
///
/// # Errors
///
/// Any [`CheckpointError`]; on error nothing is left at `out` (a file already there is kept).
pub fn merge_files(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<MergeReport, CheckpointError> {
    merge_files_with(a, b, out, options, progress)
}

fn merge_files_with<'p>(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
    progress: &'p mut Progress<'p>,
) -> Result<MergeReport, CheckpointError> {
    for input in [a, b] {
        if same_file(input, out) {
            return Err(CheckpointError::OverwritesInput {
                path: out.to_path_buf(),
            });
        }
    }
    let (ca, cb) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    let prepared = prepare(&ca, &cb, options)?;
    let run = Run {
        options,
        error: RefCell::new(None),
        stats: RefCell::new(Vec::new()),
        progress: RefCell::new(progress),
    };
    let lazies: Vec<Lazy<'_>> = prepared
        .tensors
        .into_iter()
        .map(|(name, dtype, shape, job)| Lazy {
            name,
            dtype,
            shape,
            job,
            a: &ca,
            b: &cb,
            run: &run,
        })
        .collect();
    let temp = temp_path(out);
    let written = safetensors::serialize_to_file(
        lazies.iter().map(|l| (l.name.clone(), l)),
        ca.metadata(),
        &temp,
    );
    let failure = match written {
        Err(e) => Some(CheckpointError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        }),
        Ok(()) => run.error.borrow_mut().take(),
    };
    if let Some(e) = failure {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::rename(&temp, out).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        CheckpointError::Io {
            path: out.to_path_buf(),
            source,
        }
    })?;
    let stats = std::mem::take(&mut *run.stats.borrow_mut());
    Ok(MergeReport::new(stats))
}

/// Whether two paths name the same file (the output may not exist yet).
fn same_file(input: &Path, out: &Path) -> bool {
    match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(i), Ok(o)) => i == o,
        _ => false,
    }
}

/// A temporary name beside `out`, in the same directory (so the rename is atomic).
fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// `(name, dtype, shape)` of every tensor of a file, in file order.
///
/// # Errors
///
/// [`CheckpointError::Io`] or [`CheckpointError::Format`].
pub fn inspect(path: &Path) -> Result<Vec<(String, String, Vec<usize>)>, CheckpointError> {
    let c = Checkpoint::open(path)?;
    Ok(c.names()
        .into_iter()
        .map(|n| {
            let (d, s) = c.info(&n).expect("listed");
            (n, format!("{d:?}"), s)
        })
        .collect())
}

/// Shapes by name, for comparing two files in `inspect A B`.
pub fn shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, CheckpointError> {
    Ok(inspect(path)?.into_iter().map(|(n, _, s)| (n, s)).collect())
}
