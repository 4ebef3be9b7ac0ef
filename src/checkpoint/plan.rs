//! Planning a file merge: pairing A's tensors with B's, every check that needs no data, and
//! what each output tensor will be.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::tensor::DType;

use super::convert::{label, to_safetensors};
use super::error::CheckpointError;
use super::options::{FileMerge, OutDType, Pairing};
use super::read::{Checkpoint, Entry, Format};
use crate::interpolate::compute_dtype;
use crate::schedule::{Assignment, Resolver, layer_positions};

/// Whether a dtype is merged (floats that can be computed in) rather than copied (integers,
/// booleans, quantized tensors).
pub(crate) fn is_float(dtype: DType) -> bool {
    compute_dtype(dtype).is_some()
}

/// Where one output tensor comes from.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    /// Merged from both inputs at this `t` (at `t = 0` or `t = 1`, the input's values,
    /// converted to the output dtype where it differs).
    Merge(Assignment),
    /// Copied from A (integer and boolean tensors, `--union` extras from A).
    CopyA,
    /// Copied from B (`--union` extras from B).
    CopyB,
}

/// One tensor of the output.
#[derive(Debug, Clone)]
pub(super) struct OutputTensor {
    pub(super) name: String,
    /// Its place in the output's order: A's order, then B's extras.
    pub(super) index: usize,
    /// The dtype written.
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) origin: Origin,
    /// Parameter id kept for burnpack output (from the input it comes from).
    pub(super) param_id: Option<u64>,
    /// A's shard (sharded output); extras from B go to the last shard.
    pub(super) shard: usize,
    /// Bytes written.
    pub(super) byte_len: usize,
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

pub(super) fn is_embedding(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["embed", "wte", "wpe", "tok_embeddings"]
        .iter()
        .any(|m| lower.contains(m))
}

/// The pairing, checks and output tensors of a merge, in A's order (then B's extras).
pub(super) struct Plan {
    pub(super) tensors: Vec<OutputTensor>,
    pub(super) warnings: Vec<String>,
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

/// Pairs A's and B's tensors and checks every pair, in A's order; `options.cancel` is looked at
/// before each tensor.
pub(super) fn plan(
    a: &Checkpoint,
    b: &Checkpoint,
    options: &FileMerge,
    output: Format,
) -> Result<Plan, CheckpointError> {
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
    let copy = |entry: &Entry, origin: Origin, shard: usize, index: usize| {
        let dtype = entry
            .dtype
            .ok_or_else(|| unsupported(&entry.name, &entry.label, "-", "Burn has no such type"))?;
        Ok::<_, CheckpointError>(OutputTensor {
            name: entry.name.clone(),
            index,
            dtype,
            shape: entry.shape.clone(),
            origin,
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
                tensors.push(copy(ea, Origin::CopyA, ea.shard, index)?);
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
            let assignment = resolver.resolve(name, positions[name.as_str()]);
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
                origin: Origin::Merge(assignment),
                param_id: ea.param_id,
                shard: ea.shard,
                byte_len: ea.shape.iter().product::<usize>() * dtype.size(),
            }
        } else {
            copy(ea, Origin::CopyA, ea.shard, index)?
        };
        tensors.push(tensor);
    }
    if options.pairing == Pairing::Union {
        for name in &missing_in_a {
            let eb = b.entry(name).expect("listed");
            tensors.push(copy(eb, Origin::CopyB, last_shard, tensors.len())?);
        }
    }
    check_output_dtypes(&tensors, output)?;
    let warnings = resolver.unused("tensor");
    Ok(Plan { tensors, warnings })
}

/// An input beyond A and B (the base of a task-vector merge, the third and later models of a
/// mean), named `role` in messages, against the plan: every merged tensor is in it, with A's
/// shape and a float dtype.
pub(super) fn check_extra(
    plan: &Plan,
    base: &Checkpoint,
    role: &str,
) -> Result<(), CheckpointError> {
    let refuse = |message: String| CheckpointError::Format {
        path: base.path().to_path_buf(),
        message,
    };
    let mut missing = Vec::new();
    for tensor in &plan.tensors {
        if !matches!(tensor.origin, Origin::Merge(_)) {
            continue;
        }
        let Some(entry) = base.entry(&tensor.name) else {
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
