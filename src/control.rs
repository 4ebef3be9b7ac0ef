//! Progress reports and cancellation for in-memory merges ([`MergeControl`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which pass of a merge a [`MergeProgress`] reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The statistics pass of a merge that reads every tensor before it writes any
    /// ([`SlerpMerger::merge_into`](crate::SlerpMerger::merge_into)): reductions and
    /// coefficients, nothing written.
    Statistics,
    /// A tensor of the result was written.
    Combine,
}

/// One tensor done, as a [`MergeControl`]'s callback is told of it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MergeProgress<'p> {
    /// The pass the tensor was done in.
    pub stage: Stage,
    /// Its dotted module path.
    pub path: &'p str,
    /// Float tensors done in this pass so far, this one included.
    pub tensors_done: usize,
    /// Float tensors the pass goes through.
    pub tensors_total: usize,
    /// Bytes of those tensors done so far (in the first model's dtypes).
    pub bytes_done: u64,
    /// Bytes of all of them.
    pub bytes_total: u64,
}

/// A progress callback that may borrow for `'a`.
type OnProgress<'a> = Box<dyn FnMut(&MergeProgress<'_>) + 'a>;

/// What a long in-memory merge tells its caller, and how the caller stops it: a progress
/// callback, called after each float tensor of each pass, and a cancellation flag, read
/// before each tensor.
///
/// The callback may borrow the caller's state: it lives no longer than the control.
/// A merge that sees the flag set returns [`MergeError::Cancelled`](crate::MergeError);
/// [`SlerpMerger::merge_into_with_control`](crate::SlerpMerger::merge_into_with_control)
/// honours it until its first write, and then hands its model back untouched.
///
/// # Example
///
/// ```
/// use std::sync::atomic::AtomicBool;
/// use burn::nn::LinearConfig;
/// use burn_slerp::{MergeControl, SlerpConfig, SlerpMerger, Stage};
/// # let device = burn::tensor::Device::flex();
/// let (a, b) = (LinearConfig::new(4, 2).init(&device), LinearConfig::new(4, 2).init(&device));
/// let stop = AtomicBool::new(false);
/// let mut written = Vec::new();
/// let mut control = MergeControl::new()
///     .on_progress(|p| {
///         if p.stage == Stage::Combine {
///             written.push(p.path.to_string());
///         }
///     })
///     .cancel_when(&stop);
/// let merger = SlerpMerger::new(SlerpConfig::new(0.5))?;
/// let merged = merger.merge_into_with_control(a, &b, &mut control)?;
/// drop(control);
/// assert_eq!(written, ["weight", "bias"]);
/// # let _ = merged;
/// # Ok::<(), burn_slerp::MergeError>(())
/// ```
#[derive(Default)]
pub struct MergeControl<'a> {
    on_progress: Option<OnProgress<'a>>,
    cancel: Option<&'a AtomicBool>,
}

impl fmt::Debug for MergeControl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergeControl")
            .field("on_progress", &self.on_progress.is_some())
            .field("cancel", &self.cancel)
            .finish()
    }
}

impl<'a> MergeControl<'a> {
    /// No callback and no cancellation, as the plain merges run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `callback` after each float tensor of each pass.
    pub fn on_progress(mut self, callback: impl FnMut(&MergeProgress<'_>) + 'a) -> Self {
        self.on_progress = Some(Box::new(callback));
        self
    }

    /// Stops the merge when `flag` is set (from another thread, a signal handler, the callback's
    /// owner).
    pub fn cancel_when(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    pub(crate) fn report(&mut self, progress: &MergeProgress<'_>) {
        if let Some(callback) = &mut self.on_progress {
            callback(progress);
        }
    }
}

/// The counts of one pass, reported through a [`MergeControl`].
pub(crate) struct Tally {
    stage: Stage,
    tensors_done: usize,
    tensors_total: usize,
    bytes_done: u64,
    bytes_total: u64,
}

impl Tally {
    pub(crate) fn new(stage: Stage, tensors_total: usize, bytes_total: u64) -> Self {
        Self {
            stage,
            tensors_done: 0,
            tensors_total,
            bytes_done: 0,
            bytes_total,
        }
    }

    /// Counts the tensor at `path`, of `bytes` bytes, and tells the control.
    pub(crate) fn done(&mut self, control: &mut MergeControl<'_>, path: &str, bytes: u64) {
        self.tensors_done += 1;
        self.bytes_done += bytes;
        control.report(&MergeProgress {
            stage: self.stage,
            path,
            tensors_done: self.tensors_done,
            tensors_total: self.tensors_total,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        });
    }
}
