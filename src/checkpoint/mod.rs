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

mod convert;
mod error;
mod folder;
mod hub;
mod options;
pub(crate) mod plan;
mod read;
pub(crate) mod renamed;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};

use crate::config::SlerpConfig;
use crate::error::MergeError;
use crate::module::mean::{MeanStats, SphericalMean};
use crate::report::{MergePlan, MergeReport, PlanEntry};
use crate::schedule::Assignment;
pub use error::CheckpointError;
pub use options::{FileMerge, OutDType, Pairing, Progress, TokenizerSource};
pub use plan::output_format;
use plan::{Origin, OutputTensor, Plan, is_float};
pub use read::{Checkpoint, Format};

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
) -> Result<(write::Inputs, Format, Plan), CheckpointError> {
    options.check_cancel()?;
    let output = output_format(out)?;
    let (ca, cb) = open_pair(a, b, Some(out))?;
    let base = match &options.base {
        Some(base) => {
            let cbase = Checkpoint::open(base)?;
            if cbase.files().iter().any(|f| write::same_file(f, out)) {
                return Err(CheckpointError::OverwritesInput {
                    path: out.to_path_buf(),
                });
            }
            Some(cbase)
        }
        None => None,
    };
    write::check_output(out, output)?;
    let plan = plan::plan(&ca, &cb, options, output)?;
    if let Some(base) = &base {
        plan::check_extra(&plan, base, "the base")?;
    }
    Ok(((ca, cb, base), output, plan))
}

/// The dry run of [`merge_files`]: every check, and what each merged tensor would get.
///
/// # Errors
///
/// As [`merge_files`], except the ones that need the data; [`CheckpointError::Interrupted`]
/// once [`FileMerge::cancel`] is set, which is looked at before each tensor.
pub fn plan_files(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
) -> Result<MergePlan, CheckpointError> {
    let (_, _, plan) = checked(a, b, out, options)?;
    let entries = plan
        .tensors
        .into_iter()
        .filter_map(|tensor| match tensor.origin {
            Origin::Merge(Assignment { t, rule, position }) => Some(PlanEntry {
                path: tensor.name,
                shape: tensor.shape,
                dtype: Some(convert::label(tensor.dtype)),
                t,
                rule,
                position,
                granularity: options.config.granularity,
                method: options.config.method,
            }),
            Origin::CopyA | Origin::CopyB => None,
        })
        .collect();
    Ok(MergePlan {
        entries,
        warnings: plan.warnings,
    })
}

/// Merges two checkpoints into `out`, one tensor at a time; the format of `out` follows its
/// path (see [`output_format`]).
///
/// `progress` is called after each tensor is written, merged or copied. Returns the report of
/// the merged tensors, in A's order. A tensor whose factor is 0 or 1 is A's or B's, copied (and
/// converted once where the output dtype differs), NaNs included, as the in-memory merge
/// returns an input there.
///
/// # Errors
///
/// Any [`CheckpointError`]; on error nothing is left at `out` (a file already there is kept).
pub fn merge_files(
    a: &Path,
    b: &Path,
    out: &Path,
    options: &FileMerge,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<MergeReport, CheckpointError> {
    let (inputs, output, plan) = checked(a, b, out, options)?;
    let job = write::Job {
        inputs,
        names: vec![a.display().to_string(), b.display().to_string()],
        mean: None,
        renames: HashMap::new(),
        input_dtype: None,
        layers: None,
    };
    let (report, _) = write::write(job, plan.tensors, out, output, options, Box::new(progress))?;
    Ok(report)
}

/// Every check of [`mean_files`] before the first byte: the output, every input, the pairing
/// of each with the first, and one weight per input.
fn checked_mean(
    inputs: &[PathBuf],
    mean: &SphericalMean,
    out: &Path,
    options: &FileMerge,
) -> Result<(write::Inputs, Vec<Checkpoint>, Format, Plan), CheckpointError> {
    if inputs.len() < 2 || mean.weights().len() != inputs.len() {
        return Err(CheckpointError::Merge(MergeError::InvalidWeights {
            reason: format!(
                "{} weights for {} checkpoints (one weight per checkpoint, at least two)",
                mean.weights().len(),
                inputs.len()
            ),
        }));
    }
    mean.validate(inputs.len())
        .map_err(CheckpointError::Merge)?;
    let (first, output, plan) = checked(&inputs[0], &inputs[1], out, options)?;
    let mut rest = Vec::with_capacity(inputs.len() - 2);
    for (i, path) in inputs.iter().enumerate().skip(2) {
        let input = Checkpoint::open(path)?;
        if input.files().iter().any(|f| write::same_file(f, out)) {
            return Err(CheckpointError::OverwritesInput {
                path: out.to_path_buf(),
            });
        }
        plan::check_extra(&plan, &input, &format!("input {}", i + 1))?;
        rest.push(input);
    }
    Ok((first, rest, output, plan))
}

/// The dry run of [`mean_files`]: every check, and the tensors it would average.
///
/// # Errors
///
/// As [`mean_files`], except the ones that need the data.
pub fn plan_mean_files(
    inputs: &[PathBuf],
    mean: &SphericalMean,
    out: &Path,
    options: &FileMerge,
) -> Result<Vec<(String, Vec<usize>, String)>, CheckpointError> {
    let (_, _, _, plan) = checked_mean(inputs, mean, out, options)?;
    Ok(plan
        .tensors
        .into_iter()
        .filter(|t| matches!(t.origin, Origin::Merge(_)))
        .map(|t| (t.name, t.shape, convert::label(t.dtype)))
        .collect())
}

/// The weighted spherical mean ([`SphericalMean`]) of two or more checkpoints into `out`, one
/// tensor at a time, with the pairing, checks, output formats and atomic output of
/// [`merge_files`] (`options.config` is not used): float tensors present in every input are
/// averaged, the rest follow `options.pairing` between the first two inputs and are copied as
/// they are. With `options.base`, the mean is of the task vectors from it, plus the base
/// ([`SphericalMean::mean_with_base`]). Returns what the mean computed for each tensor, in the
/// first input's order.
///
/// # Errors
///
/// As [`merge_files`]; [`CheckpointError::Merge`] with [`MergeError::InvalidWeights`] unless
/// there is one weight per input; [`CheckpointError::Format`] naming an input beyond the second
/// that lacks a tensor the first two average, or has another shape.
pub fn mean_files(
    inputs: &[PathBuf],
    mean: &SphericalMean,
    out: &Path,
    options: &FileMerge,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<Vec<MeanStats>, CheckpointError> {
    let (first, rest, output, plan) = checked_mean(inputs, mean, out, options)?;
    let job = write::Job {
        inputs: first,
        names: inputs.iter().map(|p| p.display().to_string()).collect(),
        mean: Some((mean.clone(), rest)),
        renames: HashMap::new(),
        input_dtype: None,
        layers: None,
    };
    let (_, stats) = write::write(job, plan.tensors, out, output, options, Box::new(progress))?;
    Ok(stats)
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
    let tensors: Vec<OutputTensor> = ca
        .entries()
        .iter()
        .filter(|ea| {
            cb.entry(&ea.name).is_some_and(|eb| {
                eb.shape == ea.shape
                    && ea.dtype.is_some_and(is_float)
                    && eb.dtype.is_some_and(is_float)
            })
        })
        .enumerate()
        .map(|(index, ea)| OutputTensor {
            name: ea.name.clone(),
            index,
            dtype: DType::F32,
            shape: ea.shape.clone(),
            origin: Origin::Merge(Assignment {
                t: 0.5,
                rule: None,
                position: 0.0,
            }),
            param_id: None,
            shard: 0,
            byte_len: 0,
        })
        .collect();
    write::angles(
        ca,
        cb,
        &tensors,
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
