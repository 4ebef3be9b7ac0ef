//! A two-input merge whose output tensors a recipe front end lists itself (mergekit's
//! `slices:` rename and repeat layers): each output tensor named, with the tensors of A and B
//! it comes from, its `t` (or copied from A) and its layer position. The file layer pairs and
//! checks them with the checks of every file merge, plans the output and writes it.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::DType;

use super::error::CheckpointError;
use super::options::{FileMerge, Progress};
use super::plan::{self, Origin, OutputTensor};
use super::read::Checkpoint;
use super::write;
use crate::report::MergeReport;
use crate::schedule::Assignment;

/// One output tensor of a [`Renamed`] merge.
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

/// A two-input merge of listed output tensors.
pub(crate) struct Renamed {
    pub(crate) a: Checkpoint,
    pub(crate) b: Checkpoint,
    /// How A and B are named in the output folder's model card.
    pub(crate) names: (String, String),
    pub(crate) tensors: Vec<Listed>,
    /// The dtype the inputs are rounded to before merging, if any.
    pub(crate) input_dtype: Option<DType>,
    /// A's layer behind each output layer, when the layers change (for `config.json`).
    pub(crate) layers: Option<Vec<usize>>,
}

/// Every check of a listed tensor against the inputs: each source in its input, A's and B's of
/// one shape, and the dtype check of every file merge (dtypes Burn has, floats with floats).
pub(crate) fn check(
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
        plan::pair(&t.name, ea, eb)?;
    }
    Ok(())
}

/// Writes a [`Renamed`] merge into `out` with `options` (its configuration, output dtype,
/// tokenizer source and cancellation), with the output checks and atomic output of
/// [`merge_files`](super::merge_files).
///
/// # Errors
///
/// As [`merge_files`](super::merge_files).
pub(crate) fn write_renamed(
    merge: Renamed,
    out: &Path,
    options: &FileMerge,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<MergeReport, CheckpointError> {
    let Renamed {
        a,
        b,
        names,
        tensors: listed,
        input_dtype,
        layers,
    } = merge;
    check(&a, &b, &listed)?;
    let output = plan::output_format(out)?;
    for file in a.files().iter().chain(b.files().iter()) {
        if write::same_file(file, out) {
            return Err(CheckpointError::OverwritesInput {
                path: out.to_path_buf(),
            });
        }
    }
    write::check_output(out, output)?;
    options.check_cancel()?;
    let mut renames = HashMap::new();
    let mut tensors = Vec::with_capacity(listed.len());
    for (index, t) in listed.iter().enumerate() {
        // Checked above: A holds it, with a dtype Burn has.
        let entry = a.entry(&t.sources.0).expect("checked");
        let own = entry.dtype.expect("checked");
        let dtype = match (t.t, options.out_dtype) {
            (Some(_), Some(out)) => out.dtype(),
            _ => own,
        };
        if t.sources.0 != t.name || t.sources.1 != t.name {
            renames.insert(t.name.clone(), t.sources.clone());
        }
        tensors.push(OutputTensor {
            name: t.name.clone(),
            index,
            dtype,
            shape: entry.shape.clone(),
            origin: match t.t {
                Some(v) => Origin::Merge(Assignment {
                    t: v,
                    rule: None,
                    position: t.position,
                }),
                None => Origin::CopyA,
            },
            param_id: entry.param_id,
            shard: entry.shard,
            byte_len: entry.shape.iter().product::<usize>() * dtype.size(),
        });
    }
    plan::check_output_dtypes(&tensors, output)?;
    let job = write::Job {
        inputs: (a, b, None),
        names: vec![names.0, names.1],
        mean: None,
        renames,
        input_dtype,
        layers,
    };
    let (report, _) = write::write(job, tensors, out, output, options, Box::new(progress))?;
    Ok(report)
}
