#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

//! # burn-slerp
//!
//! Merges two [Burn](https://burn.dev) modules of one architecture by spherical linear
//! interpolation (SLERP) of every float parameter, on whatever device the models live on.
//!
//! Burn 0.22 moved the backend from a type parameter to the device: a tensor's backend is its
//! [`Device`](burn::tensor::Device). So [`SlerpMerger`] has no backend parameter; a model on
//! `Device::wgpu(..)` is merged on the GPU, a model on `Device::flex()` on the CPU.
//!
//! ## Quick start
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn_slerp::{SlerpConfig, SlerpMerger};
//! # let device = burn::tensor::Device::flex();
//! let (a, b) = (LinearConfig::new(4, 2).init(&device), LinearConfig::new(4, 2).init(&device));
//! let merged = SlerpMerger::new(SlerpConfig::new(0.5))?.merge(&a, &b)?;
//! assert_eq!(merged.weight.dims(), [4, 2]); // Burn stores Linear weights as [d_input, d_output]
//! # Ok::<(), burn_slerp::MergeError>(())
//! ```
//!
//! ## Core types
//!
//! * [`SlerpConfig`]: `t`, [`Granularity`], [`Method`], `dot_threshold`, `eps` (a Burn
//!   [`Config`](burn::config::Config): builder and JSON).
//! * [`SlerpMerger`]: validates the configuration once, then [`SlerpMerger::merge`]s modules,
//!   or [`SlerpMerger::merge_into`] the first one: written over its own tensors, no memory
//!   beyond the two models, every error handing it back untouched ([`MergeIntoError`]).
//! * [`MergeControl`]: progress reports ([`MergeProgress`]) and cancellation for long merges.
//! * [`slerp`]: the same contract for one pair of tensors.
//! * [`MergeError`]: every refusal, naming the parameter.
//! * [`TensorStats`]: what [`SlerpMerger::merge_with_stats`] computed for each tensor (norms,
//!   cosine, angle, [`Branch`]).
//!
//! ## Recipes
//!
//! * [`Schedule`]: per-parameter `t` by glob rules, constants or gradients over the layer stack.
//! * [`SlerpMerger::plan`] ([`MergePlan`]): the dry run; [`SlerpMerger::merge_with_report`]
//!   ([`MergeReport`]): what the merge did, with a warning for unrelated inputs.
//! * [`SlerpMerger::merge_with_base`]: SLERP of task vectors from a common base.
//! * [`SphericalMean`]: the weighted Karcher mean of N models, and with [`MeanMethod`] the
//!   rest of the SLERP family (mergekit's `karcher`, `multislerp` and `nuslerp`, the linear
//!   mean), of the models or of their task vectors from a base: one pass for the inputs' Gram
//!   matrix, coefficients on the host, one pass writing the combination.
//! * [`SlerpMerger::sweep`] ([`Sweep`]): merge and score along `t`.
//!
//! ## Numerics
//!
//! For each pair of float tensors (or each pair of rows, with [`Granularity::Row`]):
//! `cos = a·b / (‖a‖‖b‖)`, `θ = 2·atan2(‖â − b̂‖, ‖â + b̂‖)` and
//! `out = c0·a + c1·b` with `c0 = (1−t)·sinc((1−t)θ)/sinc θ`, `c1 = t·sinc(tθ)/sinc θ`, which
//! tends to linear interpolation as θ → 0 with no threshold. On the CPU backends, norms and dot
//! products are summed with f64 accumulation and the coefficients computed in f64 on the host;
//! on CubeCL devices (wgpu), sums are scaled by the running largest magnitude (no overflow) and
//! the coefficients computed on the device in f32, so that a whole-model merge reads back one
//! small buffer at its end. Both hold a relative error ≤ 1e-6 against an f64 reference.
//! Zero tensors (norm ≤ `eps`) and antiparallel pairs
//! (`cos < −0.9995`) are linearly interpolated; NaN or infinity is an error. `t = 0` and `t = 1`
//! return the inputs bit for bit. With `dot_threshold: Some(0.9995)` the merge reproduces
//! mergekit's `slerp`.
//!
//! ## Feature flags
//!
//! | feature | backend | device |
//! |---|---|---|
//! | `flex` (default) | burn-flex, CPU | `Device::flex()` |
//! | `ndarray` | burn-ndarray, CPU (deprecated upstream) | `Device::ndarray()` |
//! | `wgpu` | burn-wgpu: Vulkan, Metal, DX12, GL | `Device::wgpu(Default::default())` |
//!
//! `cli` adds the `burn-slerp` binary, the `checkpoint` module (file-to-file merges of
//! `.safetensors`, Hugging Face sharded and `.bpk` burnpack checkpoints, one tensor at a time)
//! and the `mergekit` module (mergekit's YAML recipes of the SLERP family, read as they are).

#[cfg(feature = "cli")]
pub mod checkpoint;
mod config;
mod control;
mod engine;
mod error;
mod family;
mod interpolate;
mod kernels;
#[cfg(feature = "cli")]
pub mod mergekit;
mod module;
mod numerics;
mod reduce;
mod report;
mod schedule;
mod stats;

pub use config::{Granularity, Method, SlerpConfig, ZeroNorm};
pub use control::{MergeControl, MergeProgress, Stage};
pub use error::{MergeError, MergeIntoError};
pub use interpolate::slerp;
#[doc(hidden)]
pub use interpolate::slerp_generic;
#[doc(hidden)]
pub use kernels::storage_address;
pub use module::SlerpMerger;
#[doc(hidden)]
pub use module::WalkOrder;
pub use module::mean::{MeanMethod, MeanStats, SphericalMean};
pub use numerics::{Branch, LerpReason};
pub use report::{
    MergePlan, MergeReport, PlanEntry, RELATIVES_COSINE, ReportSummary, Sweep, SweepPoint,
};
pub use schedule::{Factor, Rule, Schedule};
pub use stats::{RowStats, TensorStats};

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/guide.md")]
struct GuideDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/numerics.md")]
struct NumericsDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/performance.md")]
struct PerformanceDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/mergekit.md")]
struct MergekitDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/testing.md")]
struct TestingDoctests;

#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../docs/reliability.md")]
struct ReliabilityDoctests;
