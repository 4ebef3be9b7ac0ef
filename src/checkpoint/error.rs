//! [`CheckpointError`]: every refusal of a file merge, naming the file or the tensor.

use std::path::PathBuf;

use crate::error::MergeError;

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
    /// A mergekit recipe this reader refuses, with what to use instead.
    #[error("recipe: {reason}")]
    Recipe {
        /// What is refused, and why.
        reason: String,
    },
    /// A model could not be had from the Hugging Face Hub: what happened and what to do.
    #[error("{repo}: {message}")]
    Hub {
        /// The repository, as named.
        repo: String,
        /// What happened, and what to do.
        message: String,
    },
    /// The merge was stopped through [`FileMerge::cancel`](super::FileMerge::cancel); nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,
    /// The merge itself refused (configuration, schedule, …).
    #[error(transparent)]
    Merge(#[from] MergeError),
}
