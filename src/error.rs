//! The one error type of the crate.

use burn::tensor::Device;

/// Why a merge (or a single [`slerp`](crate::slerp)) was refused.
///
/// Every variant is returned before anything is computed, except [`MergeError::NonFinite`],
/// which needs the data, and [`MergeError::Cancelled`]: then the partly built output is dropped
/// and the inputs are untouched.
/// `path` is the dotted module path of the parameter (`encoder.layers.2.weight`); for the free
/// function [`slerp`](crate::slerp) it is empty.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The interpolation factor `t` is NaN, infinite, below 0 or above 1.
    #[error("interpolation factor t must be a finite number in [0, 1], got {t}")]
    InvalidT {
        /// The rejected value.
        t: f64,
    },

    /// A configuration field other than `t` is out of its range (`eps` must be finite and
    /// at least 0; `dot_threshold` must be `None` or finite in (0, 1]).
    #[error("configuration field `{field}` is out of range: {value}")]
    InvalidConfig {
        /// Name of the field (`eps`, `dot_threshold`).
        field: &'static str,
        /// The rejected value.
        value: f64,
    },

    /// A schedule rule is malformed: a bad glob, a factor outside [0, 1], an empty gradient.
    #[error("schedule rule {rule} (`{filter}`) is invalid: {reason}")]
    InvalidSchedule {
        /// Index of the rule in the schedule.
        rule: usize,
        /// Its filter, as written.
        filter: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Merge weights that cannot weigh anything: a weight negative or not finite, all zero, or
    /// not one weight per model.
    #[error("invalid weights: {reason}")]
    InvalidWeights {
        /// What is wrong with them.
        reason: String,
    },

    /// The two tensors at one path have different shapes (shapes that would merely broadcast,
    /// such as `[2, 3]` and `[1, 3]`, are mismatches too).
    #[error(
        "shape mismatch in {}: a has shape {a:?}, b has shape {b:?}",
        show(path)
    )]
    ShapeMismatch {
        /// Parameter path.
        path: String,
        /// Shape in model `a`.
        a: Vec<usize>,
        /// Shape in model `b`.
        b: Vec<usize>,
    },

    /// The same path holds different kinds of parameter in the two models (for instance a float
    /// tensor in `a` and an int tensor in `b`).
    #[error(
        "parameter kind mismatch in {}: a has a {a} parameter, b has a {b} parameter",
        show(path)
    )]
    KindMismatch {
        /// Parameter path.
        path: String,
        /// Kind in model `a` (`float`, `int`, `bool` or `flag`).
        a: &'static str,
        /// Kind in model `b`.
        b: &'static str,
    },

    /// Model `a` has a parameter that model `b` lacks.
    #[error("{} is in model a but missing from model b", show(path))]
    MissingParam {
        /// Parameter path.
        path: String,
    },

    /// Model `b` has a parameter that model `a` lacks.
    #[error("{} is in model b but not in model a", show(path))]
    UnexpectedParam {
        /// Parameter path.
        path: String,
    },

    /// A NaN or infinite value was found in `a` or `b` at this path.
    #[error("non-finite value (NaN or infinity) in {}", show(path))]
    NonFinite {
        /// Parameter path.
        path: String,
    },

    /// mergekit's `multislerp` of more than two inputs whose weighted directions cancel at
    /// this parameter (the weighted mean of the unit vectors is shorter than `eps`): it has no
    /// mean there, as mergekit says too.
    #[error(
        "the weighted directions of parameter `{path}` cancel: multislerp of more than two inputs has no mean there; change the weights"
    )]
    CancellingDirections {
        /// Parameter path.
        path: String,
    },

    /// One model reports two parameters at the same path (a hand-written `Module` that enters
    /// the same name twice): they could not be paired.
    #[error("{} appears twice in model {model}", show(path))]
    DuplicateParam {
        /// Parameter path.
        path: String,
        /// Which model: `a`, `b`, `base`, or the index of a model in a mean.
        model: String,
    },

    /// The two tensors at one path live on different devices.
    #[error("device mismatch in {}: a is on {a:?}, b is on {b:?}", show(path))]
    DeviceMismatch {
        /// Parameter path.
        path: String,
        /// Device of the tensor in model `a` (boxed: a device is large).
        a: Box<Device>,
        /// Device of the tensor in model `b`.
        b: Box<Device>,
    },

    /// A float tensor has a data type the merge cannot compute in (quantized tensors).
    #[error(
        "{} has data type {dtype}, which cannot be merged (dequantize it first)",
        show(path)
    )]
    UnsupportedDType {
        /// Parameter path.
        path: String,
        /// The data type, as Burn prints it.
        dtype: String,
    },

    /// The merge was cancelled through its [`MergeControl`](crate::MergeControl) before it
    /// finished (before its first write, for a consuming merge).
    #[error("the merge was cancelled")]
    Cancelled,
}

/// The error of a merge that consumed its first model
/// ([`SlerpMerger::merge_into`](crate::SlerpMerger::merge_into) and its kin), with that model
/// handed back untouched, as [`String::from_utf8`]'s error hands back its bytes.
///
/// Every error of a consuming merge is found before its first write, so the model comes back
/// exactly as it was given. It converts into the [`MergeError`] alone with `?`.
///
/// # Example
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn_slerp::{MergeError, SlerpConfig, SlerpMerger};
/// # let device = burn::tensor::Device::flex();
/// let a = LinearConfig::new(4, 2).init(&device);
/// let b = LinearConfig::new(4, 3).init(&device);
/// let err = SlerpMerger::new(SlerpConfig::new(0.5))?.merge_into(a, &b).unwrap_err();
/// assert!(matches!(err.error(), MergeError::ShapeMismatch { .. }));
/// let a = err.into_model(); // the model, as it was
/// # let _ = a;
/// # Ok::<(), MergeError>(())
/// ```
pub struct MergeIntoError<M> {
    error: MergeError,
    model: M,
}

impl<M> MergeIntoError<M> {
    pub(crate) fn new(error: MergeError, model: M) -> Self {
        Self { error, model }
    }

    /// Why the merge was refused.
    pub fn error(&self) -> &MergeError {
        &self.error
    }

    /// The model the merge consumed, untouched.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The error and the model.
    pub fn into_parts(self) -> (MergeError, M) {
        (self.error, self.model)
    }
}

impl<M> std::fmt::Debug for MergeIntoError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeIntoError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> std::fmt::Display for MergeIntoError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<M> std::error::Error for MergeIntoError<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<M> From<MergeIntoError<M>> for MergeError {
    fn from(e: MergeIntoError<M>) -> Self {
        e.error
    }
}

/// How a path is named in messages: `parameter `a.b``, or `the tensor` for the free function.
fn show(path: &str) -> String {
    if path.is_empty() {
        "the tensor".to_string()
    } else {
        format!("parameter `{path}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_parameter_and_the_data() {
        let e = MergeError::ShapeMismatch {
            path: "fc.weight".into(),
            a: vec![2, 3],
            b: vec![1, 3],
        };
        assert_eq!(
            e.to_string(),
            "shape mismatch in parameter `fc.weight`: a has shape [2, 3], b has shape [1, 3]"
        );
        let e = MergeError::NonFinite {
            path: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "non-finite value (NaN or infinity) in the tensor"
        );
    }
}
