//! The one plan of a file merge: every output tensor as (the method, the input tensors it
//! reads, its options), built once per command by a front end (`merge`, `mean`, `--base`, a
//! mergekit recipe) from inputs opened once, checked once before the first byte (pairing,
//! shapes, dtypes, what the output format can hold, the output path), then computed by the
//! engine ([`super::compute`]) and written by the output format's writer
//! ([`super::formats`]), which never look at how the plan was made.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::DType;

use super::convert::{label, to_safetensors};
use super::durable::folder_of;
use super::error::CheckpointError;
use super::folder::{Card, ModelFiles, plan_model_files};
use super::options::{FileMerge, OutDType, Pairing};
use super::read::{Checkpoint, Entry, Format};
use crate::config::SlerpConfig;
use crate::error::MergeError;
use crate::interpolate::compute_dtype;
use crate::module::mean::{MeanStats, SphericalMean};
use crate::report::{MergePlan, MergeReport, PlanEntry};
use crate::schedule::{Assignment, Resolver, layer_positions};

/// Whether a dtype is merged (floats that can be computed in) rather than copied (integers,
/// booleans, quantized tensors).
pub(crate) fn is_float(dtype: DType) -> bool {
    compute_dtype(dtype).is_some()
}

/// A tensor an output tensor reads: an input of the plan, and the tensor's name there (which
/// differs from the output's name when a recipe renumbers layers).
#[derive(Debug, Clone)]
pub(super) struct Source {
    pub(super) input: usize,
    pub(super) name: String,
}

impl Source {
    pub(super) fn new(input: usize, name: &str) -> Self {
        Self {
            input,
            name: name.to_string(),
        }
    }
}

/// How one output tensor is made.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// The tensor as it is stored (integers, booleans, quantized tensors, `--union` extras).
    Copy(Source),
    /// SLERP of `a` and `b` at `config.t` (of their task vectors from `base` when there is
    /// one); at `t = 0` or `t = 1`, the input's bytes, converted to the output dtype where it
    /// differs.
    Slerp {
        a: Source,
        b: Source,
        base: Option<Source>,
        config: SlerpConfig,
        /// Where `t` came from, for the dry run.
        assignment: Assignment,
        /// The dtype the inputs are rounded to first (a mergekit recipe's `dtype`).
        round: Option<DType>,
    },
    /// The spherical mean of `inputs` with these weights (of their task vectors from `base`).
    Mean {
        inputs: Vec<Source>,
        base: Option<Source>,
        weights: Vec<f64>,
        mean: Arc<SphericalMean>,
    },
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub(super) struct OutputTensor {
    pub(super) name: String,
    /// Its place in the output's order.
    pub(super) index: usize,
    /// The dtype written.
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) op: Op,
    /// Parameter id kept for burnpack output (from the input it comes from).
    pub(super) param_id: Option<u64>,
    /// The first input's shard (sharded output); extras go to the last shard.
    pub(super) shard: usize,
    /// Bytes written.
    pub(super) byte_len: usize,
}

/// A file merge, planned and checked: what [`FilePlan::write`] computes and writes. Built by
/// [`FilePlan::merge`] (two checkpoints, `--base` included), [`FilePlan::mean`] (two or more)
/// and the mergekit front end; the inputs are opened once, by the constructor, and are the
/// ones the write reads.
pub struct FilePlan {
    pub(super) inputs: Vec<Checkpoint>,
    pub(super) tensors: Vec<OutputTensor>,
    pub(super) warnings: Vec<String>,
    pub(super) out: PathBuf,
    pub(super) format: Format,
    pub(super) options: FileMerge,
    pub(super) card: Card,
    /// What a model folder output holds besides its weights, when it is one.
    pub(super) model: Option<ModelFiles>,
}

/// What [`FilePlan::write`] computed.
#[derive(Debug, Clone)]
pub struct Written {
    /// The statistics of every tensor merged by SLERP, in the output's order.
    pub report: MergeReport,
    /// What the mean computed for every averaged tensor, in the output's order.
    pub means: Vec<MeanStats>,
    /// Temporaries of stopped runs into the same output (their lock was free), removed before
    /// this one began.
    pub removed: Vec<PathBuf>,
    /// The plan's warnings (as [`FilePlan::warnings`]).
    pub warnings: Vec<String>,
}

impl FilePlan {
    /// The plan of a SLERP of `a` and `b` into `out` (of their task vectors from
    /// `options.base` when set): every check [`merge_files`](super::merge_files) makes before
    /// the first byte.
    ///
    /// # Errors
    ///
    /// As [`merge_files`](super::merge_files), except the ones that need the data.
    pub fn merge(
        a: &Path,
        b: &Path,
        out: &Path,
        options: &FileMerge,
    ) -> Result<Self, CheckpointError> {
        options.check_cancel()?;
        let format = output_format(out)?;
        let (ca, cb) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
        let base = options.base.as_deref().map(Checkpoint::open).transpose()?;
        let (mut tensors, warnings) = pair_tensors(&ca, &cb, options)?;
        let names = vec![a.display().to_string(), b.display().to_string()];
        let method = match &base {
            Some(base) => {
                check_extra(&tensors, base, "the base")?;
                for tensor in &mut tensors {
                    if let Op::Slerp { base, .. } = &mut tensor.op {
                        *base = Some(Source::new(2, &tensor.name));
                    }
                }
                "task-vector SLERP (`base + slerp(a - base, b - base, t)`)"
            }
            None => "SLERP",
        };
        let card = Card {
            names,
            base: options.base.as_ref().map(|p| p.display().to_string()),
            method,
            recipe: serde_json::to_string_pretty(&options.config).unwrap_or_default(),
            layers: None,
        };
        let inputs = [ca, cb].into_iter().chain(base).collect();
        Self::new(inputs, tensors, warnings, out, format, options, card)
    }

    /// The plan of the spherical mean of `inputs` into `out` (of their task vectors from
    /// `options.base` when set): every check [`mean_files`](super::mean_files) makes before the
    /// first byte.
    ///
    /// # Errors
    ///
    /// As [`mean_files`](super::mean_files), except the ones that need the data.
    pub fn mean(
        inputs: &[PathBuf],
        mean: &SphericalMean,
        out: &Path,
        options: &FileMerge,
    ) -> Result<Self, CheckpointError> {
        check_weights(inputs.len(), mean)?;
        options.check_cancel()?;
        output_format(out)?;
        let opened = inputs
            .iter()
            .map(|p| Checkpoint::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let base = options.base.as_deref().map(Checkpoint::open).transpose()?;
        let names = inputs.iter().map(|p| p.display().to_string()).collect();
        let base_name = options.base.as_ref().map(|p| p.display().to_string());
        let base = base.map(|b| (b, base_name.unwrap_or_default()));
        Self::mean_of(opened, names, base, mean, out, options)
    }

    /// [`Self::mean`] of inputs opened already, named as the card names them.
    pub(crate) fn mean_of(
        inputs: Vec<Checkpoint>,
        names: Vec<String>,
        base: Option<(Checkpoint, String)>,
        mean: &SphericalMean,
        out: &Path,
        options: &FileMerge,
    ) -> Result<Self, CheckpointError> {
        check_weights(inputs.len(), mean)?;
        options.check_cancel()?;
        let format = output_format(out)?;
        let (mut tensors, warnings) = pair_tensors(&inputs[0], &inputs[1], options)?;
        for (i, input) in inputs.iter().enumerate().skip(2) {
            check_extra(&tensors, input, &format!("input {}", i + 1))?;
        }
        let (base, base_name) = base.unzip();
        if let Some(base) = &base {
            check_extra(&tensors, base, "the base")?;
        }
        let shared = Arc::new(mean.clone());
        let k = inputs.len();
        for tensor in &mut tensors {
            let Op::Slerp { assignment, .. } = &tensor.op else {
                continue;
            };
            let weights = mean
                .weights_at(&tensor.name, assignment.position)
                .map_err(CheckpointError::Merge)?;
            tensor.op = Op::Mean {
                inputs: (0..k).map(|i| Source::new(i, &tensor.name)).collect(),
                base: base.as_ref().map(|_| Source::new(k, &tensor.name)),
                weights,
                mean: Arc::clone(&shared),
            };
        }
        let card = Card {
            names,
            base: base_name,
            method: "the weighted spherical mean",
            recipe: serde_json::json!({ "weights": mean.weights() }).to_string(),
            layers: None,
        };
        // Warnings of `t` schedules do not apply to a mean.
        let _ = warnings;
        let inputs = inputs.into_iter().chain(base).collect();
        Self::new(inputs, tensors, Vec::new(), out, format, options, card)
    }

    /// The plan of one model written as it is (a mergekit multislerp of one model), its float
    /// tensors converted to `options.out_dtype` when set.
    pub(crate) fn copy_of(
        input: Checkpoint,
        name: String,
        out: &Path,
        options: &FileMerge,
    ) -> Result<Self, CheckpointError> {
        options.check_cancel()?;
        let format = output_format(out)?;
        let tensors = input
            .entries()
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let own = e
                    .dtype
                    .ok_or_else(|| unsupported(&e.name, &e.label, "-", "Burn has no such type"))?;
                let dtype = if is_float(own) {
                    options.out_dtype.map_or(own, OutDType::dtype)
                } else {
                    own
                };
                Ok(OutputTensor {
                    name: e.name.clone(),
                    index,
                    dtype,
                    shape: e.shape.clone(),
                    op: Op::Copy(Source::new(0, &e.name)),
                    param_id: e.param_id,
                    shard: e.shard,
                    byte_len: e.shape.iter().product::<usize>() * dtype.size(),
                })
            })
            .collect::<Result<Vec<_>, CheckpointError>>()?;
        let card = Card {
            names: vec![name],
            base: None,
            method: "multislerp of one model, which returns it as it is",
            recipe: String::new(),
            layers: None,
        };
        Self::new(vec![input], tensors, Vec::new(), out, format, options, card)
    }

    /// The plan of a two-input merge whose output tensors a recipe lists itself (see
    /// [`Listed`]).
    pub(crate) fn listed(
        merge: Listing,
        out: &Path,
        options: &FileMerge,
    ) -> Result<Self, CheckpointError> {
        options.check_cancel()?;
        let format = output_format(out)?;
        let Listing {
            a,
            b,
            names,
            tensors: listed,
            round,
            layers,
        } = merge;
        check_listed(&a, &b, &listed)?;
        let mut tensors = Vec::with_capacity(listed.len());
        for (index, t) in listed.iter().enumerate() {
            let Some(entry) = a.entry(&t.sources.0) else {
                continue;
            };
            let Some(own) = entry.dtype else {
                continue;
            };
            let dtype = match (t.t, options.out_dtype) {
                (Some(_), Some(out)) => out.dtype(),
                _ => own,
            };
            let a_source = Source::new(0, &t.sources.0);
            let op = match t.t {
                Some(v) => Op::Slerp {
                    a: a_source,
                    b: Source::new(1, &t.sources.1),
                    base: None,
                    config: options.config.clone().with_schedule(None).with_t(v),
                    assignment: Assignment {
                        t: v,
                        rule: None,
                        position: t.position,
                    },
                    round,
                },
                None => Op::Copy(a_source),
            };
            tensors.push(OutputTensor {
                name: t.name.clone(),
                index,
                dtype,
                shape: entry.shape.clone(),
                op,
                param_id: entry.param_id,
                shard: entry.shard,
                byte_len: entry.shape.iter().product::<usize>() * dtype.size(),
            });
        }
        let card = Card {
            names: vec![names.0, names.1],
            base: None,
            method: "SLERP",
            recipe: serde_json::to_string_pretty(&options.config).unwrap_or_default(),
            layers,
        };
        Self::new(vec![a, b], tensors, Vec::new(), out, format, options, card)
    }

    /// The checks every plan ends with, in one place: the output format can hold every
    /// tensor, no input is the output, and the output can be written.
    fn new(
        inputs: Vec<Checkpoint>,
        tensors: Vec<OutputTensor>,
        mut warnings: Vec<String>,
        out: &Path,
        format: Format,
        options: &FileMerge,
        card: Card,
    ) -> Result<Self, CheckpointError> {
        check_output_dtypes(&tensors, format)?;
        for input in &inputs {
            if input.files().iter().any(|f| same_file(f, out)) {
                return Err(CheckpointError::OverwritesInput {
                    path: out.to_path_buf(),
                });
            }
        }
        check_output(out, format)?;
        let (a, b) = (
            inputs.first().and_then(Checkpoint::folder),
            inputs.get(1).and_then(Checkpoint::folder),
        );
        let model = match (a, b) {
            (a, b) if format == Format::Sharded && (a.is_some() || b.is_some()) => {
                Some(plan_model_files(
                    a,
                    b,
                    options.out_dtype.map(OutDType::dtype),
                    options,
                    card.layers.as_deref(),
                    &mut warnings,
                )?)
            }
            _ => None,
        };
        Ok(Self {
            inputs,
            tensors,
            warnings,
            out: out.to_path_buf(),
            format,
            options: options.clone(),
            card,
            model,
        })
    }

    /// What the dry run of a SLERP prints: each merged tensor and its `t`.
    pub fn summary(&self) -> MergePlan {
        let entries = self
            .tensors
            .iter()
            .filter_map(|tensor| match &tensor.op {
                Op::Slerp { assignment, .. } => Some(PlanEntry {
                    path: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                    dtype: Some(label(tensor.dtype)),
                    t: assignment.t,
                    rule: assignment.rule,
                    position: assignment.position,
                    granularity: self.options.config.granularity,
                    method: self.options.config.method,
                }),
                Op::Copy(_) | Op::Mean { .. } => None,
            })
            .collect();
        MergePlan {
            entries,
            warnings: self.warnings.clone(),
        }
    }

    /// What the dry run of a mean prints: `(name, shape, dtype)` of each averaged tensor.
    pub fn averaged(&self) -> Vec<(String, Vec<usize>, String)> {
        self.tensors
            .iter()
            .filter(|t| matches!(t.op, Op::Mean { .. }))
            .map(|t| (t.name.clone(), t.shape.clone(), label(t.dtype)))
            .collect()
    }

    /// Tensors the output holds.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the output holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// What the plan warns about (rules of a schedule that matched nothing).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The output path.
    pub fn output(&self) -> &Path {
        &self.out
    }

    /// Refuses a further file the command would write (a report) where it names an input or
    /// the output, before anything is computed.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Output`] naming `path`.
    pub fn check_side_output(&self, path: &Path) -> Result<(), CheckpointError> {
        let inputs: Vec<&Checkpoint> = self.inputs.iter().collect();
        check_side_output(path, &inputs, &self.out)
    }
}

/// One weight per input, at least two inputs, and weights the method takes.
fn check_weights(inputs: usize, mean: &SphericalMean) -> Result<(), CheckpointError> {
    if inputs < 2 || mean.weights().len() != inputs {
        return Err(CheckpointError::Merge(MergeError::InvalidWeights {
            reason: format!(
                "{} weights for {} checkpoints (one weight per checkpoint, at least two)",
                mean.weights().len(),
                inputs
            ),
        }));
    }
    mean.validate(inputs).map_err(CheckpointError::Merge)
}

/// Refuses `path` for a further output (a report) where it names one of `inputs`' files,
/// `out` or a folder, or where the folder it would go in does not exist.
pub(crate) fn check_side_output(
    path: &Path,
    inputs: &[&Checkpoint],
    out: &Path,
) -> Result<(), CheckpointError> {
    let refuse = |what: &str| {
        Err(CheckpointError::Output {
            path: path.to_path_buf(),
            reason: format!("it is {what}: name another file"),
        })
    };
    if inputs
        .iter()
        .any(|input| input.files().iter().any(|f| same_file(f, path)))
    {
        return refuse("an input");
    }
    let absolute = |p: &Path| {
        let parent = std::fs::canonicalize(folder_of(p));
        parent
            .ok()
            .map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    if same_file(out, path) || (absolute(out).is_some() && absolute(out) == absolute(path)) {
        return refuse("the output");
    }
    if path.is_dir() {
        return refuse("a folder");
    }
    if !folder_of(path).is_dir() {
        return Err(CheckpointError::Output {
            path: path.to_path_buf(),
            reason: "the folder it would go in does not exist".into(),
        });
    }
    Ok(())
}

/// Whether two paths name the same file or folder (the output may not exist yet).
pub(super) fn same_file(input: &Path, out: &Path) -> bool {
    match (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
        (Ok(i), Ok(o)) => i == o,
        _ => false,
    }
}

/// Checks that `out` can be written in `format` before anything is computed.
pub(super) fn check_output(out: &Path, format: Format) -> Result<(), CheckpointError> {
    let refuse = |reason: &str| {
        Err(CheckpointError::Output {
            path: out.to_path_buf(),
            reason: reason.to_string(),
        })
    };
    if !folder_of(out).is_dir() {
        return refuse("the folder it would go in does not exist");
    }
    if format == Format::Sharded && out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            return refuse(
                "a sharded checkpoint is written into a new or empty folder, and this one is not \
                 empty",
            );
        }
    }
    Ok(())
}

/// One output tensor of a [`Listing`].
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// Its name in the output.
    pub(crate) name: String,
    /// The tensors of A and B it comes from.
    pub(crate) sources: (String, String),
    /// Its `t`; `None`: copied from A.
    pub(crate) t: Option<f64>,
    /// Its layer position, for the report.
    pub(crate) position: f64,
}

/// A two-input merge whose output tensors a recipe front end lists itself (mergekit's
/// `slices:` rename and repeat layers): each output tensor named, with the tensors of A and B
/// it comes from, its `t` (or copied from A) and its layer position.
pub(crate) struct Listing {
    pub(crate) a: Checkpoint,
    pub(crate) b: Checkpoint,
    /// How A and B are named in the output folder's model card.
    pub(crate) names: (String, String),
    pub(crate) tensors: Vec<Listed>,
    /// The dtype the inputs are rounded to before merging, if any.
    pub(crate) round: Option<DType>,
    /// A's layer behind each output layer, when the layers change (for `config.json`).
    pub(crate) layers: Option<Vec<usize>>,
}

/// Every check of a listed tensor against the inputs: each source in its input, A's and B's of
/// one shape, and the dtype check of every file merge (dtypes Burn has, floats with floats).
pub(crate) fn check_listed(
    a: &Checkpoint,
    b: &Checkpoint,
    tensors: &[Listed],
) -> Result<(), CheckpointError> {
    for t in tensors {
        let Some(ea) = a.entry(&t.sources.0) else {
            return Err(CheckpointError::Pairing {
                missing_in_b: vec![],
                missing_in_a: vec![t.sources.0.clone()],
            });
        };
        let Some(eb) = b.entry(&t.sources.1) else {
            return Err(CheckpointError::Pairing {
                missing_in_b: vec![t.sources.1.clone()],
                missing_in_a: vec![],
            });
        };
        if ea.shape != eb.shape {
            return Err(CheckpointError::Shape {
                name: t.name.clone(),
                a: ea.shape.clone(),
                b: eb.shape.clone(),
                hint: String::new(),
            });
        }
        pair(&t.name, ea, eb)?;
    }
    Ok(())
}

/// The output's format, from its path: a file when its extension is an output format
/// (`.safetensors`, `.bpk`); a folder for a sharded checkpoint otherwise (a trailing `/`, an
/// existing folder, no extension, or a dotted name such as `Llama-3.2-merged`).
///
/// # Errors
///
/// [`CheckpointError::Output`] for a model file extension that is not an output format
/// (`.bin`, `.pt`, `.pth`, `.gguf`, `.ckpt`, `.h5`, `.msgpack`).
pub fn output_format(out: &Path) -> Result<Format, CheckpointError> {
    let text = out.as_os_str().to_string_lossy();
    if out.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Ok(Format::Sharded);
    }
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("safetensors") => Ok(Format::Safetensors),
        Some("bpk") => Ok(Format::Burnpack),
        Some(other @ ("bin" | "pt" | "pth" | "gguf" | "ckpt" | "h5" | "msgpack")) => {
            Err(CheckpointError::Output {
                path: out.to_path_buf(),
                reason: format!(
                    "`.{other}` is a model file burn-slerp reads but does not write: name a \
                     `.safetensors` or `.bpk` file, or a folder for a sharded checkpoint"
                ),
            })
        }
        _ => Ok(Format::Sharded),
    }
}

pub(super) fn is_embedding(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["embed", "wte", "wpe", "tok_embeddings"]
        .iter()
        .any(|m| lower.contains(m))
}

fn unsupported(name: &str, a: &str, b: &str, why: &str) -> CheckpointError {
    CheckpointError::DType {
        name: name.to_string(),
        a: a.to_string(),
        b: b.to_string(),
        why: why.to_string(),
    }
}

/// How the tensors of one name in two checkpoints make an output tensor.
pub(super) enum Pair {
    /// Both floats: merged (A's dtype given).
    Merge(DType),
    /// Both of one other dtype Burn has (integers, booleans, quantized): copied from A.
    Copy,
}

/// The one dtype check of a pair of tensors named `name` (A's `ea`, B's `eb`): an error naming
/// the tensor for a dtype Burn does not have (fp8, …) and for mixed kinds.
pub(super) fn pair(name: &str, ea: &Entry, eb: &Entry) -> Result<Pair, CheckpointError> {
    let (Some(da), Some(db)) = (ea.dtype, eb.dtype) else {
        return Err(unsupported(
            name,
            &ea.label,
            &eb.label,
            "Burn has no such type",
        ));
    };
    if is_float(da) && is_float(db) {
        Ok(Pair::Merge(da))
    } else if da == db && !is_float(da) {
        Ok(Pair::Copy)
    } else {
        Err(unsupported(
            name,
            &ea.label,
            &eb.label,
            "a float is merged only with a float, and other dtypes only with the same dtype",
        ))
    }
}

/// That the output format can hold every tensor's dtype (safetensors has no quantized types).
pub(super) fn check_output_dtypes(
    tensors: &[OutputTensor],
    output: Format,
) -> Result<(), CheckpointError> {
    if output != Format::Burnpack {
        for tensor in tensors {
            if to_safetensors(tensor.dtype).is_none() {
                return Err(unsupported(
                    &tensor.name,
                    &label(tensor.dtype),
                    "-",
                    "safetensors has no such dtype (write a `.bpk` file instead)",
                ));
            }
        }
    }
    Ok(())
}

fn pair_tensors(
    a: &Checkpoint,
    b: &Checkpoint,
    options: &FileMerge,
) -> Result<(Vec<OutputTensor>, Vec<String>), CheckpointError> {
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
    // Layer positions by the one rule for paths, over A's float tensors, as over a module's.
    let floats_a: Vec<&str> = a
        .entries()
        .iter()
        .filter(|e| e.dtype.is_some_and(is_float))
        .map(|e| e.name.as_str())
        .collect();
    let positions: HashMap<&str, f64> = floats_a
        .iter()
        .copied()
        .zip(layer_positions(&floats_a))
        .collect();
    let last_shard = a.shards().len().saturating_sub(1);
    let mut tensors: Vec<OutputTensor> = Vec::new();
    let copy = |entry: &Entry, input: usize, shard: usize, index: usize| {
        let dtype = entry
            .dtype
            .ok_or_else(|| unsupported(&entry.name, &entry.label, "-", "Burn has no such type"))?;
        Ok::<_, CheckpointError>(OutputTensor {
            name: entry.name.clone(),
            index,
            dtype,
            shape: entry.shape.clone(),
            op: Op::Copy(Source::new(input, &entry.name)),
            param_id: entry.param_id,
            shard,
            byte_len: entry.bytes,
        })
    };
    for ea in a.entries() {
        options.check_cancel()?;
        let name = &ea.name;
        let index = tensors.len();
        let Some(eb) = b.entry(name) else {
            if options.pairing == Pairing::Union {
                tensors.push(copy(ea, 0, ea.shard, index)?);
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
        let tensor = if let Pair::Merge(da) = pair(name, ea, eb)? {
            let assignment =
                resolver.resolve(name, positions.get(name.as_str()).copied().unwrap_or(0.0));
            let dtype = options.out_dtype.map_or(da, OutDType::dtype);
            if dtype == DType::F64 && !options.device.supports_dtype(DType::F64) {
                return Err(unsupported(
                    name,
                    &ea.label,
                    &eb.label,
                    "f64 tensors are computed in f64 and this device has no f64 (use the flex \
                     or ndarray device, or --out-dtype f32)",
                ));
            }
            OutputTensor {
                name: name.clone(),
                index,
                dtype,
                shape: ea.shape.clone(),
                op: Op::Slerp {
                    a: Source::new(0, name),
                    b: Source::new(1, name),
                    base: None,
                    config: options
                        .config
                        .clone()
                        .with_schedule(None)
                        .with_t(assignment.t),
                    assignment,
                    round: None,
                },
                param_id: ea.param_id,
                shard: ea.shard,
                byte_len: ea.shape.iter().product::<usize>() * dtype.size(),
            }
        } else {
            copy(ea, 0, ea.shard, index)?
        };
        tensors.push(tensor);
    }
    if options.pairing == Pairing::Union {
        for name in &missing_in_a {
            let Some(eb) = b.entry(name) else { continue };
            tensors.push(copy(eb, 1, last_shard, tensors.len())?);
        }
    }
    Ok((tensors, resolver.unused("tensor")))
}

/// An input beyond A and B (the base of a task-vector merge, the third and later models of a
/// mean), named `role` in messages, against the planned tensors: every merged tensor is in it,
/// with A's shape and a float dtype.
fn check_extra(
    tensors: &[OutputTensor],
    extra: &Checkpoint,
    role: &str,
) -> Result<(), CheckpointError> {
    let refuse = |message: String| CheckpointError::Format {
        path: extra.path().to_path_buf(),
        message,
    };
    let mut missing = Vec::new();
    for tensor in tensors {
        if matches!(tensor.op, Op::Copy(_)) {
            continue;
        }
        let Some(entry) = extra.entry(&tensor.name) else {
            missing.push(tensor.name.clone());
            continue;
        };
        if entry.shape != tensor.shape {
            return Err(refuse(format!(
                "{role}'s tensor `{}` has shape {:?}, A's has {:?}",
                tensor.name, entry.shape, tensor.shape
            )));
        }
        if !entry.dtype.is_some_and(is_float) {
            return Err(refuse(format!(
                "{role}'s tensor `{}` is {}, not a float tensor",
                tensor.name, entry.label
            )));
        }
    }
    if !missing.is_empty() {
        return Err(refuse(format!(
            "{role} lacks tensors A and B merge: [{}]",
            missing.join(", ")
        )));
    }
    Ok(())
}
