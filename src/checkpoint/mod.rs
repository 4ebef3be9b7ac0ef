//! Merging checkpoint files tensor by tensor: two checkpoints in, one out, with only the
//! tensor being merged in memory.
//!
//! Inputs are `.safetensors` files (memory-mapped), Hugging Face sharded checkpoints (a folder
//! with `model.safetensors.index.json`) and Burn's `.bpk` burnpack files (each tensor read from
//! disk when it is merged). The output format follows the output path: `.safetensors`, `.bpk`,
//! or a folder for a sharded checkpoint laid out like A's shards. Files are read and written
//! with the `safetensors` crate and burn-store's burnpack reader and writer; nothing here parses
//! a binary format by hand.
//!
//! Every check that can be made before computing (pairing, shapes, dtypes, the output path and
//! format) is made before the first byte is written; the output goes to a temporary file (or
//! folder) beside the target and is renamed into place only once complete and finite.

mod read;
mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::{DType, Device};

use crate::report::{MergePlan, MergeReport, PlanEntry};
use crate::schedule::Resolver;
use crate::{MergeError, SlerpConfig};

pub use read::{Checkpoint, Format};

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
    /// A file is not a valid checkpoint (truncated, corrupted header, offsets that do not fit
    /// the file, a tensor an index names missing from its shard, …).
    #[error("{path}: {message}")]
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
    /// A tensor's dtypes cannot be merged or written (a float in one file and not in the
    /// other, a dtype Burn has no type for, one the output format cannot hold, …).
    #[error("tensor `{name}`: cannot merge dtype {a} (A) with {b} (B): {why}")]
    DType {
        /// Tensor name.
        name: String,
        /// dtype in A.
        a: String,
        /// dtype in B (`-` where only A's matters).
        b: String,
        /// Why not.
        why: String,
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
    /// The output path cannot be written as asked.
    #[error("{path}: {reason}")]
    Output {
        /// The path given for the output.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The merge was stopped through [`FileMerge::cancel`]; nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,
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
#[non_exhaustive]
pub struct FileMerge {
    /// The recipe.
    pub config: SlerpConfig,
    /// Where the arithmetic runs.
    pub device: Device,
    /// Tensors present in one input only.
    pub pairing: Pairing,
    /// Output dtype of merged float tensors; `None`: A's dtype.
    pub out_dtype: Option<OutDType>,
    /// Set it (from a signal handler, another thread, …) to stop the merge at the next tensor;
    /// the merge then fails with [`CheckpointError::Interrupted`] and leaves nothing behind.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl FileMerge {
    /// Strict pairing, A's dtypes, no cancellation.
    pub fn new(config: SlerpConfig, device: Device) -> Self {
        Self {
            config,
            device,
            pairing: Pairing::Strict,
            out_dtype: None,
            cancel: None,
        }
    }
}

/// Whether a dtype is merged (floats) rather than copied (integers, booleans).
fn is_float(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16
    )
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
    /// Copied from A (integer and boolean tensors, `--union` extras from A).
    CopyA,
    /// Copied from B (`--union` extras from B).
    CopyB,
}

/// One tensor of the output.
#[derive(Debug, Clone)]
struct Item {
    name: String,
    /// The dtype written.
    dtype: DType,
    shape: Vec<usize>,
    job: Job,
    /// Parameter id kept for burnpack output (from the input it comes from).
    param_id: Option<u64>,
    /// A's shard (sharded output); extras from B go to the last shard.
    shard: usize,
    /// Bytes written.
    byte_len: usize,
}

/// The output's format, from its path: `.safetensors`, `.bpk`, or a folder (an existing one,
/// or a path without an extension) for a sharded checkpoint.
///
/// # Errors
///
/// [`CheckpointError::Output`] for any other extension.
pub fn output_format(out: &Path) -> Result<Format, CheckpointError> {
    if out.is_dir() {
        return Ok(Format::Sharded);
    }
    match out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(Format::Safetensors),
        Some("bpk") => Ok(Format::Burnpack),
        None => Ok(Format::Sharded),
        Some(other) => Err(CheckpointError::Output {
            path: out.to_path_buf(),
            reason: format!(
                "cannot tell the format from `.{other}`: name a `.safetensors` or `.bpk` file, \
                 or a folder for a sharded checkpoint"
            ),
        }),
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

/// The pairing, checks and per-tensor items of a merge, in A's order (then B's extras).
struct Prepared {
    items: Vec<Item>,
    warnings: Vec<String>,
}

fn unsupported(name: &str, a: &str, b: &str, why: &str) -> CheckpointError {
    CheckpointError::DType {
        name: name.to_string(),
        a: a.to_string(),
        b: b.to_string(),
        why: why.to_string(),
    }
}

fn prepare(
    a: &Checkpoint,
    b: &Checkpoint,
    options: &FileMerge,
    output: Format,
) -> Result<Prepared, CheckpointError> {
    options.config.validate()?;
    let (names_a, names_b) = (a.names(), b.names());
    let in_b: HashSet<&String> = names_b.iter().collect();
    let in_a: HashSet<&String> = names_a.iter().collect();
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
    let last_shard = a.shards().len().saturating_sub(1);
    let mut items = Vec::new();
    let copy = |entry: &read::Entry, job: Job, shard: usize| -> Result<Item, CheckpointError> {
        let dtype = entry
            .dtype
            .ok_or_else(|| unsupported(&entry.name, &entry.label, "-", "Burn has no such type"))?;
        Ok(Item {
            name: entry.name.clone(),
            dtype,
            shape: entry.shape.clone(),
            job,
            param_id: entry.param_id,
            shard,
            byte_len: entry.bytes,
        })
    };
    for ea in a.entries() {
        let name = &ea.name;
        let Some(eb) = b.entry(name) else {
            if options.pairing == Pairing::Union {
                items.push(copy(ea, Job::CopyA, ea.shard)?);
            }
            continue;
        };
        if ea.shape != eb.shape {
            let (sa, sb) = (&ea.shape, &eb.shape);
            let hint = if sa.len() == 2 && sb.len() == 2 && sa[1] == sb[1] && is_embedding(name) {
                ": the vocabularies differ in size; resize one model's embedding first (nothing is \
                 truncated)"
                    .to_string()
            } else {
                String::new()
            };
            return Err(CheckpointError::Shape {
                name: name.clone(),
                a: sa.clone(),
                b: sb.clone(),
                hint,
            });
        }
        let (Some(da), Some(db)) = (ea.dtype, eb.dtype) else {
            return Err(unsupported(
                name,
                &ea.label,
                &eb.label,
                "Burn has no such type",
            ));
        };
        let item = if is_float(da) && is_float(db) {
            let position = positions[name];
            let (t, rule) = resolver.resolve(name, position);
            let dtype = match options.out_dtype {
                Some(OutDType::F32) => DType::F32,
                Some(OutDType::F16) => DType::F16,
                Some(OutDType::BF16) => DType::BF16,
                None => da,
            };
            if dtype == DType::F64 && !options.device.supports_dtype(DType::F64) {
                return Err(unsupported(
                    name,
                    &ea.label,
                    &eb.label,
                    "f64 tensors are computed in f64 and this device has no f64 (use the flex \
                     or ndarray device, or --out-dtype f32)",
                ));
            }
            Item {
                name: name.clone(),
                dtype,
                shape: ea.shape.clone(),
                job: Job::Merge { t, rule, position },
                param_id: ea.param_id,
                shard: ea.shard,
                byte_len: ea.shape.iter().product::<usize>() * dtype.size(),
            }
        } else if da == db && !is_float(da) {
            copy(ea, Job::CopyA, ea.shard)?
        } else {
            return Err(unsupported(
                name,
                &ea.label,
                &eb.label,
                "a float is merged only with a float, and other dtypes only with the same dtype",
            ));
        };
        items.push(item);
    }
    if options.pairing == Pairing::Union {
        for name in &missing_in_a {
            let eb = b.entry(name).expect("listed");
            items.push(copy(eb, Job::CopyB, last_shard)?);
        }
    }
    if output != Format::Burnpack {
        for item in &items {
            if read::to_safetensors(item.dtype).is_none() {
                return Err(unsupported(
                    &item.name,
                    &read::label(item.dtype),
                    "-",
                    "safetensors has no such dtype (write a `.bpk` file instead)",
                ));
            }
        }
    }
    let warnings = resolver.unused("tensor");
    Ok(Prepared { items, warnings })
}

/// Opens both inputs and checks the output path: nothing written yet.
fn open_pair(
    a: &Path,
    b: &Path,
    out: Option<&Path>,
) -> Result<(Checkpoint, Checkpoint), CheckpointError> {
    let (ca, cb) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    if let Some(out) = out {
        for file in ca.files().iter().chain(cb.files().iter()) {
            if write::same_file(file, out) {
                return Err(CheckpointError::OverwritesInput {
                    path: out.to_path_buf(),
                });
            }
        }
    }
    Ok((ca, cb))
}

/// Every check before the first byte: the output's format and path, both inputs, and the
/// pairing; what [`plan_files`] prints and [`merge_files`] writes.
fn checked(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
) -> Result<(Checkpoint, Checkpoint, Format, Prepared), CheckpointError> {
    let output = output_format(out)?;
    let (ca, cb) = open_pair(a, b, Some(out))?;
    write::check_output(out, output)?;
    let prepared = prepare(&ca, &cb, options, output)?;
    Ok((ca, cb, output, prepared))
}

/// The dry run of [`merge_files`]: every check, and what each tensor would get.
///
/// # Errors
///
/// As [`merge_files`], except the ones that need the data.
pub fn plan_files(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
) -> Result<MergePlan, CheckpointError> {
    let (_, _, _, prepared) = checked(a, b, out, options)?;
    let entries = prepared
        .items
        .into_iter()
        .filter_map(|item| match item.job {
            Job::Merge { t, rule, position } => Some(PlanEntry {
                path: item.name,
                shape: item.shape,
                dtype: Some(read::label(item.dtype)),
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

/// Merges two checkpoints into `out`, one tensor at a time; the format of `out` follows its
/// path (see [`output_format`]).
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
    progress: impl FnMut(&str, usize) + Send + 'static,
) -> Result<MergeReport, CheckpointError> {
    let (ca, cb, output, prepared) = checked(a, b, out, options)?;
    write::write(
        ca,
        cb,
        prepared.items,
        out,
        output,
        options,
        Box::new(progress),
    )
}

/// The angles between two checkpoints: the statistics of every float tensor present in both
/// with the same shape (what `inspect A B` summarises), computed on `device` one tensor at a
/// time. Tensors in one file only, or with different shapes or dtype kinds, are left out.
///
/// # Errors
///
/// [`CheckpointError::Io`] or [`CheckpointError::Format`]; [`CheckpointError::NonFinite`] for a
/// NaN or an infinity.
pub fn compare_files(a: &Path, b: &Path, device: &Device) -> Result<MergeReport, CheckpointError> {
    let (ca, cb) = open_pair(a, b, None)?;
    let items: Vec<Item> = ca
        .entries()
        .iter()
        .filter(|ea| {
            cb.entry(&ea.name).is_some_and(|eb| {
                eb.shape == ea.shape
                    && ea.dtype.is_some_and(is_float)
                    && eb.dtype.is_some_and(is_float)
            })
        })
        .map(|ea| Item {
            name: ea.name.clone(),
            dtype: DType::F32,
            shape: ea.shape.clone(),
            job: Job::Merge {
                t: 0.5,
                rule: None,
                position: 0.0,
            },
            param_id: None,
            shard: 0,
            byte_len: 0,
        })
        .collect();
    write::angles(
        ca,
        cb,
        &items,
        FileMerge::new(SlerpConfig::new(0.5), device.clone()),
    )
}

/// `(name, dtype, shape)` of every tensor of a checkpoint, in file order.
///
/// # Errors
///
/// [`CheckpointError::Io`] or [`CheckpointError::Format`].
pub fn inspect(path: &Path) -> Result<Vec<(String, String, Vec<usize>)>, CheckpointError> {
    let c = Checkpoint::open(path)?;
    Ok(c.entries()
        .iter()
        .map(|e| (e.name.clone(), e.label.clone(), e.shape.clone()))
        .collect())
}

/// Shapes by name, for comparing two checkpoints in `inspect A B`.
///
/// # Errors
///
/// As [`inspect`].
pub fn shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, CheckpointError> {
    Ok(inspect(path)?.into_iter().map(|(n, _, s)| (n, s)).collect())
}
