//! Merging whole modules: [`SlerpMerger`] pairs two modules' parameters by path ([`walk`]),
//! checks the whole structure, then maps model `a` into the merged model; task vectors
//! ([`task_vector`]) and the spherical mean of N models ([`mean`]) use the same walk.

pub(crate) mod mean;
mod task_vector;
mod walk;

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::SlerpConfig;
use crate::error::MergeError;
use crate::interpolate::{Interpolated, KernelChoice, Summary, interpolate, read_summaries};
use crate::report::{MergePlan, MergeReport, PlanEntry, Sweep, SweepPoint};
use crate::schedule::{Assignment, Resolver};
use crate::stats::TensorStats;
use walk::{Combine, Mapped, Structure, check_structure, map_pairs};

/// Merges two Burn modules of one architecture by SLERP of every float parameter.
///
/// The merge runs on the device the models live on (Burn 0.22 carries the backend in the
/// tensor's device): flex or ndarray on the CPU, wgpu on the GPU.
///
/// * Parameters are paired by module path (`encoder.layers.2.weight`), never by `ParamId`.
/// * Float parameters, BatchNorm running statistics included, are interpolated.
/// * Int and bool parameters and flags (such as BatchNorm's `training`) are taken from `a`, and
///   so are the `ParamId`s and the require-grad settings.
/// * Neither input is modified. Running statistics that a training step has left pending are
///   folded in first, exactly as [`Module::valid`] does.
///
/// # Example
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn_slerp::{SlerpConfig, SlerpMerger};
/// # let device = burn::tensor::Device::flex();
/// let (a, b) = (LinearConfig::new(4, 2).init(&device), LinearConfig::new(4, 2).init(&device));
/// let merged = SlerpMerger::new(SlerpConfig::new(0.5))?.merge(&a, &b)?;
/// assert_eq!(merged.weight.dims(), [4, 2]); // Burn stores Linear weights as [d_input, d_output]
/// # Ok::<(), burn_slerp::MergeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SlerpMerger {
    config: SlerpConfig,
}

impl SlerpMerger {
    /// Creates a merger after checking the configuration.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] when `t` is not a finite number in [0, 1];
    /// [`MergeError::InvalidConfig`] when `eps` or `dot_threshold` is out of range.
    pub fn new(config: SlerpConfig) -> Result<Self, MergeError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration this merger applies.
    pub fn config(&self) -> &SlerpConfig {
        &self.config
    }

    /// Merges `a` and `b` into a new module.
    ///
    /// The whole structure is checked first (same parameter paths, kinds, shapes and devices);
    /// only then is anything computed. `t = 0` returns `a`'s values and `t = 1` `b`'s, bit for
    /// bit, without a finiteness check.
    ///
    /// On the CPU backends each tensor's statistics (a few numbers per tensor or row) are read
    /// back as it is merged. On CubeCL devices (wgpu) nothing is read until every tensor has
    /// been queued; then the statistics of all of them come back in one read per device, so
    /// the device never waits on the host in the middle of a merge.
    ///
    /// # Arguments
    ///
    /// * `a` - the model at `t = 0`; it also gives the structure, ids, int and bool parameters
    ///   and flags of the result.
    /// * `b` - the model at `t = 1`.
    ///
    /// # Returns
    ///
    /// The merged module, on the devices of `a`'s parameters; on an autodiff device its float
    /// parameters are fresh leaves with `a`'s require-grad settings.
    ///
    /// # Errors
    ///
    /// [`MergeError::MissingParam`], [`MergeError::UnexpectedParam`],
    /// [`MergeError::KindMismatch`], [`MergeError::ShapeMismatch`],
    /// [`MergeError::DeviceMismatch`] and [`MergeError::UnsupportedDType`] before any work;
    /// [`MergeError::NonFinite`] when a parameter of `a` or `b` holds a NaN or an infinity (the
    /// partly built output is dropped). The error names the first offending parameter in `a`'s
    /// order.
    pub fn merge<M: Module>(&self, a: &M, b: &M) -> Result<M, MergeError> {
        self.merge_with_stats(a, b).map(|(merged, _)| merged)
    }

    /// [`merge`](Self::merge), also returning what the merge computed for each float tensor:
    /// norms, cosine, angle and the branch of the numerics table taken (per-row summaries with
    /// [`Granularity::Row`](crate::Granularity::Row)), in `a`'s parameter order. The statistics
    /// come from the reductions the merge does anyway. At `t = 0` and `t = 1` nothing is
    /// computed and the list is empty.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge).
    pub fn merge_with_stats<M: Module>(
        &self,
        a: &M,
        b: &M,
    ) -> Result<(M, Vec<TensorStats>), MergeError> {
        self.run(None, a, b, self.config.t)
    }

    /// [`merge`](Self::merge), also returning a [`MergeReport`]: per tensor its factor, angle,
    /// cosine, norms and branch, a summary (parameters merged, angle distribution, lerp
    /// fallbacks by reason) and warnings, such as inputs that do not look like relatives. The
    /// report comes from the reductions the merge does anyway; it prints as a table and
    /// serializes to JSON.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge).
    pub fn merge_with_report<M: Module>(
        &self,
        a: &M,
        b: &M,
    ) -> Result<(M, MergeReport), MergeError> {
        let (merged, tensors) = self.run(None, a, b, self.config.t)?;
        Ok((merged, MergeReport::new(tensors)))
    }

    /// Task-vector SLERP: `base + slerp(a − base, b − base, t)` for every float parameter.
    ///
    /// Fine-tunes of one base differ from it by a few percent, so the SLERP of their weights
    /// is nearly a lerp; their task vectors (`a − base`, `b − base`) are nearly orthogonal,
    /// and there lerp keeps only `≈ 0.71` of their norm at `t = 0.5` while SLERP keeps all of
    /// it. `t = 0` and `t = 1` return `a` and `b` bit for bit; int and bool parameters, flags
    /// and autodiff state come from `a`. The schedule applies as in [`merge`](Self::merge).
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), with `base` checked against `a` like `b` is.
    pub fn merge_with_base<M: Module>(&self, base: &M, a: &M, b: &M) -> Result<M, MergeError> {
        self.run(Some(base), a, b, self.config.t)
            .map(|(merged, _)| merged)
    }

    /// The dry run of [`merge`](Self::merge): every check `merge` makes before computing
    /// (configuration, schedule, structure, shapes, devices, dtypes; not finiteness, which
    /// needs the data), and per float tensor the path, shape, dtype (when the tensor exists:
    /// lazy parameters are not initialised to find out), factor, layer position, granularity
    /// and method. Nothing is computed. Schedule rules that match no parameter are warnings.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), except [`MergeError::NonFinite`].
    pub fn plan<M: Module>(&self, a: &M, b: &M) -> Result<MergePlan, MergeError> {
        let structure = check_structure(("a", a), &[("b", b)])?;
        let (assignments, warnings) = self.assign(self.config.t, &structure)?;
        let entries = structure
            .floats()
            .zip(assignments)
            .map(|(slot, Assignment { t, rule, position })| PlanEntry {
                path: slot.path.clone(),
                shape: slot.info.shape.clone(),
                dtype: slot.info.dtype.map(|d| format!("{d:?}")),
                t,
                rule,
                position,
                granularity: self.config.granularity,
                method: self.config.method,
            })
            .collect();
        Ok(MergePlan { entries, warnings })
    }

    /// Merges `a` and `b` at every factor of `ts` and scores each merged model with `score`
    /// (higher is better; negate a loss), for picking a model from the spectrum between the
    /// two. Every point is merged from the inputs, nothing accumulates; the swept factor
    /// replaces the configuration's `t`, and schedule rules keep their own values. A score
    /// that is NaN is recorded but never best.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] for a factor outside [0, 1] (before anything is merged); the
    /// errors of [`merge`](Self::merge).
    pub fn sweep<M: Module>(
        &self,
        a: &M,
        b: &M,
        ts: impl IntoIterator<Item = f64>,
        mut score: impl FnMut(&M, f64) -> f64,
    ) -> Result<Sweep, MergeError> {
        let ts: Vec<f64> = ts.into_iter().collect();
        for t in &ts {
            self.config.clone().with_t(*t).validate()?;
        }
        let mut points = Vec::with_capacity(ts.len());
        for t in ts {
            let (merged, _) = self.run(None, a, b, t)?;
            points.push(SweepPoint {
                t,
                score: score(&merged, t),
            });
        }
        Ok(Sweep::new(points))
    }

    /// The factor of every float parameter of `structure`, in its order, with `default_t` for
    /// those no rule matches; and the schedule's warnings.
    fn assign(
        &self,
        default_t: f64,
        structure: &Structure,
    ) -> Result<(Vec<Assignment>, Vec<String>), MergeError> {
        self.config.clone().with_t(default_t).validate()?;
        let mut resolver = Resolver::new(self.config.schedule.as_ref(), default_t)?;
        let paths: Vec<&str> = structure.floats().map(|s| s.path.as_str()).collect();
        let assignments = resolver.assign(&paths);
        Ok((assignments, resolver.unused("parameter")))
    }

    /// The merge behind every public entry point: `b` (and `base` for task vectors) paired
    /// with `a` by path, `default_t` for parameters no schedule rule matches.
    fn run<M: Module>(
        &self,
        base: Option<&M>,
        a: &M,
        b: &M,
        default_t: f64,
    ) -> Result<(M, Vec<TensorStats>), MergeError> {
        let mut others = vec![("b", b)];
        others.extend(base.map(|base| ("base", base)));
        let structure = check_structure(("a", a), &others)?;
        let (assignments, _) = self.assign(default_t, &structure)?;
        let mut combine = SlerpCombine {
            config: SlerpConfig {
                schedule: None,
                ..self.config.clone()
            },
            ts: structure
                .floats()
                .zip(assignments)
                .map(|(slot, assignment)| (slot.path.clone(), assignment.t))
                .collect(),
        };
        let models: Vec<&M> = others.iter().map(|(_, m)| *m).collect();
        let Mapped {
            module,
            stats,
            non_finite,
        } = map_pairs(a, &models, &mut combine);
        // Statistics still on the device (CubeCL) are read here, all at once; the first
        // parameter in `a`'s order that is not finite is the one reported.
        let (paths, summaries): (Vec<String>, Vec<Summary>) = stats.into_iter().unzip();
        let mut stats = Vec::with_capacity(paths.len());
        for (path, read) in paths.into_iter().zip(read_summaries(summaries)) {
            let Some(mut s) = read else {
                return Err(MergeError::NonFinite { path });
            };
            s.path = path;
            stats.push(s);
        }
        match non_finite {
            Some(path) => Err(MergeError::NonFinite { path }),
            None => Ok((module, stats)),
        }
    }
}

/// SLERP of each float tensor at its own factor: of `a` and `b`, or of their task vectors
/// when a base model is the second of the others.
struct SlerpCombine {
    /// The configuration without its schedule.
    config: SlerpConfig,
    /// Each float parameter's factor.
    ts: HashMap<String, f64>,
}

impl Combine for SlerpCombine {
    type Stats = Summary;

    fn combine<const D: usize>(
        &mut self,
        path: &str,
        a: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Interpolated<D> {
        let t = self.ts.get(path).copied().unwrap_or(self.config.t);
        let config = self.config.clone().with_t(t);
        let mut others = others.into_iter();
        let b = others.next().expect("b is paired with a");
        match others.next() {
            Some(base) => task_vector::interpolate_task_vectors(base, a, b, &config),
            None => interpolate(a, b, &config, KernelChoice::Fused),
        }
    }
}
