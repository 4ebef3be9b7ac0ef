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

mod compute;
mod convert;
mod durable;
mod error;
mod fault;
mod folder;
mod formats;
pub mod hub;
mod layout;
mod options;
pub(crate) mod plan;
mod read;
mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};

use crate::config::SlerpConfig;
use crate::module::mean::{MeanStats, SphericalMean};
use crate::report::{MergePlan, MergeReport};
use crate::schedule::Assignment;
pub use error::CheckpointError;
pub use fault::handle_bus_errors;
pub use options::{FileMerge, OutDType, Pairing, Progress, TokenizerSource};
pub use plan::{FilePlan, Written, output_format};
use plan::{Op, OutputTensor, Source, is_float};
pub use read::{Checkpoint, Format};

/// The dry run of [`merge_files`]: every check, and what each merged tensor would get
/// ([`FilePlan::merge`] and [`FilePlan::summary`]).
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
    Ok(FilePlan::merge(a, b, out, options)?.summary())
}

/// Merges two checkpoints into `out`, one tensor at a time; the format of `out` follows its
/// path (see [`output_format`]). [`FilePlan::merge`] then [`FilePlan::write`].
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
    Ok(FilePlan::merge(a, b, out, options)?.write(progress)?.report)
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
    Ok(FilePlan::mean(inputs, mean, out, options)?.averaged())
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
/// As [`merge_files`]; [`CheckpointError::Merge`] with
/// [`MergeError::InvalidWeights`](crate::MergeError::InvalidWeights) unless there is one
/// weight per input; [`CheckpointError::Format`] naming an input beyond the second that lacks
/// a tensor the first two average, or has another shape.
pub fn mean_files(
    inputs: &[PathBuf],
    mean: &SphericalMean,
    out: &Path,
    options: &FileMerge,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<Vec<MeanStats>, CheckpointError> {
    Ok(FilePlan::mean(inputs, mean, out, options)?
        .write(progress)?
        .means)
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
    let (ca, cb) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    let config = SlerpConfig::new(0.5);
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
            op: Op::Slerp {
                a: Source::new(0, &ea.name),
                b: Source::new(1, &ea.name),
                base: None,
                config: config.clone(),
                assignment: Assignment {
                    t: 0.5,
                    rule: None,
                    position: 0.0,
                },
                round: None,
            },
            param_id: None,
            shard: 0,
            byte_len: 0,
        })
        .collect();
    let run = compute::Run::new(
        vec![ca, cb],
        FileMerge::new(config, device.clone()),
        tensors.len(),
        Box::new(|_| {}),
    );
    for tensor in &tensors {
        run.compute(tensor)?;
    }
    Ok(run.report())
}

/// Writes a report (or any small file) the way outputs are written: through a temporary
/// beside it, synced, renamed into place, the folder synced; a file already at `path` is
/// replaced only by the complete new one. Check it first with
/// [`FilePlan::check_side_output`].
///
/// # Errors
///
/// [`CheckpointError::Io`] naming `path`.
pub fn write_report(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    write::write_small(path, bytes)
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
