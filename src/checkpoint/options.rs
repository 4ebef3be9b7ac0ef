//! What a file merge is asked to do ([`FileMerge`], [`Pairing`], [`OutDType`]) and what it
//! reports as it goes ([`Progress`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

use super::error::CheckpointError;
use crate::config::SlerpConfig;

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

impl OutDType {
    /// Burn's dtype.
    pub(crate) fn dtype(self) -> burn::tensor::DType {
        match self {
            OutDType::F32 => burn::tensor::DType::F32,
            OutDType::F16 => burn::tensor::DType::F16,
            OutDType::BF16 => burn::tensor::DType::BF16,
        }
    }
}

/// Which input's tokenizer files a merged model folder gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerSource {
    /// A's (the default).
    #[default]
    A,
    /// B's.
    B,
}

/// Options of [`merge_files`](super::merge_files).
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
    /// A base checkpoint: the merge is then task-vector SLERP,
    /// `base + slerp(a − base, b − base, t)`, with `base` paired and checked against A as B is.
    pub base: Option<PathBuf>,
    /// Whose tokenizer files a model-folder output gets.
    pub tokenizer_source: TokenizerSource,
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
            base: None,
            tokenizer_source: TokenizerSource::A,
        }
    }

    /// [`CheckpointError::Interrupted`] once [`FileMerge::cancel`] is set.
    pub(crate) fn check_cancel(&self) -> Result<(), CheckpointError> {
        match &self.cancel {
            Some(cancel) if cancel.load(Ordering::Relaxed) => Err(CheckpointError::Interrupted),
            _ => Ok(()),
        }
    }
}

/// What [`merge_files`](super::merge_files) reports after writing each tensor.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Progress<'a> {
    /// The tensor written.
    pub name: &'a str,
    /// Its size in bytes.
    pub bytes: usize,
    /// Tensors written so far, this one included.
    pub done: usize,
    /// Tensors the output will hold: merged and copied alike.
    pub total: usize,
}
