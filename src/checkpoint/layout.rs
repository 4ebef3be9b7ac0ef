//! The writer interface of the output formats: each takes the planned output tensors in order
//! and writes them into the temporary the atomic output renames into place.

use std::path::Path;
use std::sync::Arc;

use super::compute::Run;
use super::error::CheckpointError;
use super::plan::OutputTensor;

/// How an output format writes the planned tensors.
pub(super) trait Layout {
    /// Whether the output is a folder (its temporary is created as one).
    fn folder(&self) -> bool {
        false
    }

    /// Writes `tensors`, each computed by `run` when the writer reaches it, into `temp`
    /// (created empty beforehand); `out` is named in errors.
    fn write(
        &self,
        run: &Arc<Run>,
        tensors: Vec<OutputTensor>,
        temp: &Path,
        out: &Path,
    ) -> Result<(), CheckpointError>;
}
