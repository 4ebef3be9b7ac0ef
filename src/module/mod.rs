//! Merging whole modules: [`SlerpMerger`] pairs two modules' parameters by path ([`walk`]),
//! checks the whole structure, then maps model `a` into the merged model; task vectors
//! ([`task_vector`]) and the spherical mean of N models ([`mean`]) use the same walk.

pub(crate) mod mean;
pub(crate) mod task_vector;
mod walk;

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::SlerpConfig;
use crate::control::MergeControl;
use crate::error::{MergeError, MergeIntoError};
use crate::interpolate::{
    Interpolated, KernelChoice, Pair, Prepared, Summary, apply, endpoint, interpolate, prepare,
    read_summaries,
};
use crate::report::{MergePlan, MergeReport, PlanEntry, Sweep, SweepPoint};
use crate::schedule::{Assignment, Resolver};
use crate::stats::TensorStats;
pub(crate) use walk::Model;
use walk::{
    Combine, Mapped, Stop, Structure, apply_pairs, check_structure, map_pairs, prepare_pairs,
    totals,
};

/// The order a merge walks its tensors in.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkOrder {
    /// Each tensor's statistics, then its combine, then the next tensor (the borrowed merges).
    PerTensor,
    /// Every tensor's statistics, then every combine (the consuming merges: every error is
    /// found before the first write).
    StatisticsFirst,
}

/// A merge that failed, with the consumed model when it is still untouched.
type Failed<M> = (MergeError, Option<M>);

fn give_back<M>(error: MergeError, model: Model<'_, M>) -> Failed<M> {
    match model {
        Model::Owned(m) => (error, Some(m)),
        Model::Borrowed(_) => (error, None),
    }
}

/// The error of a consuming merge from a [`Failed`] one.
fn into_error<M>((error, model): Failed<M>) -> MergeIntoError<M> {
    MergeIntoError::new(
        error,
        model.expect("consuming merges fail before their first write"),
    )
}

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

    /// [`merge`](Self::merge) with a [`MergeControl`]: its callback is told of each float
    /// tensor as it is written, and its flag is read before each one
    /// ([`MergeError::Cancelled`]; the partly built output is dropped, the inputs untouched).
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), and [`MergeError::Cancelled`].
    pub fn merge_with_control<M: Module>(
        &self,
        a: &M,
        b: &M,
        control: &mut MergeControl<'_>,
    ) -> Result<M, MergeError> {
        let run = self.run(
            None,
            Model::Borrowed(a),
            b,
            self.config.t,
            WalkOrder::PerTensor,
            control,
        );
        run.map(|(merged, _)| merged).map_err(|(e, _)| e)
    }

    /// The consuming form of [`merge`](Self::merge): the result is written over `a`'s own
    /// tensors, so that the merge needs no memory beyond `a` and `b` (a few statistics per
    /// tensor, and any tensor that cannot be written over). The same bits as
    /// `merge(&a, &b)`, on every backend.
    ///
    /// * A float tensor of `a` that nothing else holds is written over: on flex and ndarray
    ///   (f32, and f16/bf16 on flex) and on CubeCL devices (wgpu), where the stream hands the
    ///   buffer over as its last use.
    /// * A tensor something else holds (a clone of `a` that is still alive, a zero-copy buffer
    ///   of a loaded file, a tensor an autodiff graph saved) is left alone and its result
    ///   allocated, as `merge` does: clones of `a`, and `b`, are never written. So are
    ///   BatchNorm's shared running-state cells: the result gets fresh ones.
    /// * Every tensor's statistics are computed before the first write (on CubeCL, one read
    ///   of all of them), so every error, a NaN in the last tensor of `b` included, is found
    ///   while `a` is still untouched, and comes back with it.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), with `a` handed back untouched in the
    /// [`MergeIntoError`] (`?` turns it into the [`MergeError`] alone).
    ///
    /// # Example
    ///
    /// ```
    /// use burn::nn::LinearConfig;
    /// use burn_slerp::{SlerpConfig, SlerpMerger};
    /// # let device = burn::tensor::Device::flex();
    /// let (a, b) = (LinearConfig::new(4, 2).init(&device), LinearConfig::new(4, 2).init(&device));
    /// let merger = SlerpMerger::new(SlerpConfig::new(0.5))?;
    /// let expected = merger.merge(&a, &b)?;
    /// let merged = merger.merge_into(a, &b)?; // `a` is gone: its memory holds the result
    /// assert_eq!(merged.weight.to_data(), expected.weight.to_data());
    /// # Ok::<(), burn_slerp::MergeError>(())
    /// ```
    pub fn merge_into<M: Module>(&self, a: M, b: &M) -> Result<M, MergeIntoError<M>> {
        self.merge_into_with_control(a, b, &mut MergeControl::new())
    }

    /// [`merge_into`](Self::merge_into) with a [`MergeControl`]: its callback is told of each
    /// float tensor in the statistics pass and in the write pass; its flag is read before each
    /// tensor of the statistics pass, so a cancelled merge hands `a` back untouched
    /// ([`MergeError::Cancelled`]). Once the writes have begun, the merge runs to its end.
    ///
    /// # Errors
    ///
    /// As [`merge_into`](Self::merge_into), and [`MergeError::Cancelled`].
    pub fn merge_into_with_control<M: Module>(
        &self,
        a: M,
        b: &M,
        control: &mut MergeControl<'_>,
    ) -> Result<M, MergeIntoError<M>> {
        let run = self.run(
            None,
            Model::Owned(a),
            b,
            self.config.t,
            WalkOrder::StatisticsFirst,
            control,
        );
        run.map(|(merged, _)| merged).map_err(into_error)
    }

    /// A merge in the given order, for measuring the orders against each other: borrowed
    /// (`consume = false`) or consuming. A consuming merge tensor by tensor cannot hand `a`
    /// back on an error (it may be half written), so the error comes alone.
    #[doc(hidden)]
    pub fn merge_in_order<M: Module>(
        &self,
        a: M,
        b: &M,
        order: WalkOrder,
        consume: bool,
    ) -> Result<M, MergeError> {
        let model = if consume {
            Model::Owned(a)
        } else {
            Model::Borrowed(&a)
        };
        let control = &mut MergeControl::new();
        let run = self.run(None, model, b, self.config.t, order, control);
        run.map(|(merged, _)| merged).map_err(|(e, _)| e)
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
        self.run_borrowed(None, a, b, self.config.t)
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
        let (merged, tensors) = self.run_borrowed(None, a, b, self.config.t)?;
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
        self.run_borrowed(Some(base), a, b, self.config.t)
            .map(|(merged, _)| merged)
    }

    /// The consuming form of [`merge_with_base`](Self::merge_with_base), written over `a`'s
    /// tensors as [`merge_into`](Self::merge_into) writes: every error is found before the
    /// first write and comes back with `a`, untouched. The task vectors `a − base` and
    /// `b − base` are computed once in the statistics pass and once more in the write pass
    /// (one tensor's worth at a time), so the result has the same bits as `merge_with_base`.
    ///
    /// # Errors
    ///
    /// As [`merge_with_base`](Self::merge_with_base), with `a` handed back untouched.
    pub fn merge_with_base_into<M: Module>(
        &self,
        base: &M,
        a: M,
        b: &M,
    ) -> Result<M, MergeIntoError<M>> {
        let run = self.run(
            Some(base),
            Model::Owned(a),
            b,
            self.config.t,
            WalkOrder::StatisticsFirst,
            &mut MergeControl::new(),
        );
        run.map(|(merged, _)| merged).map_err(into_error)
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
            let (merged, _) = self.run_borrowed(None, a, b, t)?;
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

    /// [`run`](Self::run) on a borrowed `a`, tensor by tensor, without a control.
    fn run_borrowed<M: Module>(
        &self,
        base: Option<&M>,
        a: &M,
        b: &M,
        default_t: f64,
    ) -> Result<(M, Vec<TensorStats>), MergeError> {
        let control = &mut MergeControl::new();
        self.run(
            base,
            Model::Borrowed(a),
            b,
            default_t,
            WalkOrder::PerTensor,
            control,
        )
        .map_err(|(e, _)| e)
    }

    /// The merge behind every public entry point: `b` (and `base` for task vectors) paired
    /// with `a` by path, `default_t` for parameters no schedule rule matches, in `order`. On
    /// an error, an owned `a` comes back when it is untouched.
    fn run<M: Module>(
        &self,
        base: Option<&M>,
        a: Model<'_, M>,
        b: &M,
        default_t: f64,
        order: WalkOrder,
        control: &mut MergeControl<'_>,
    ) -> Result<(M, Vec<TensorStats>), Failed<M>> {
        let mut others = vec![("b", b)];
        others.extend(base.map(|base| ("base", base)));
        let structure = match check_structure(("a", a.get()), &others) {
            Ok(structure) => structure,
            Err(e) => return Err(give_back(e, a)),
        };
        let assignments = match self.assign(default_t, &structure) {
            Ok((assignments, _)) => assignments,
            Err(e) => return Err(give_back(e, a)),
        };
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
        let totals = totals(&structure);
        match order {
            WalkOrder::PerTensor => {
                let Mapped {
                    module,
                    stats,
                    stop,
                } = map_pairs(a, &models, &mut combine, control, totals);
                let stats = resolve(stats, stop).map_err(|e| (e, None))?;
                Ok((module, stats))
            }
            WalkOrder::StatisticsFirst => {
                let mut prepass = prepare_pairs(a.get(), &models, &mut combine, control, totals);
                let summaries = std::mem::take(&mut prepass.stats);
                let stats = match resolve(summaries, prepass.stop.take()) {
                    Ok(stats) => stats,
                    Err(e) => return Err(give_back(e, a)),
                };
                let mapped = apply_pairs(a, prepass, &mut combine, control, totals);
                debug_assert!(mapped.stop.is_none(), "the write pass cannot fail");
                Ok((mapped.module, stats))
            }
        }
    }
}

/// The statistics of a walk, read where they are still on the device (CubeCL: all at once),
/// or the error that stopped it: the first parameter in `a`'s order that is not finite.
fn resolve(
    summaries: Vec<(String, Summary)>,
    stop: Option<Stop>,
) -> Result<Vec<TensorStats>, MergeError> {
    let (paths, summaries): (Vec<String>, Vec<Summary>) = summaries.into_iter().unzip();
    let mut stats = Vec::with_capacity(paths.len());
    for (path, read) in paths.into_iter().zip(read_summaries(summaries)) {
        let Some(mut s) = read else {
            return Err(MergeError::NonFinite { path });
        };
        s.path = path;
        stats.push(s);
    }
    match stop {
        Some(stop) => Err(stop.into_error()),
        None => Ok(stats),
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

impl SlerpCombine {
    fn config_for(&self, path: &str) -> SlerpConfig {
        let t = self.ts.get(path).copied().unwrap_or(self.config.t);
        self.config.clone().with_t(t)
    }
}

/// What the statistics pass of SLERP leaves for the write pass.
pub(crate) enum SlerpPrepared {
    /// `t = 0` or `t = 1`: an input as it is.
    Endpoint,
    /// The coefficients, on the host or the device.
    Prepared(Prepared),
}

impl Combine for SlerpCombine {
    type Stats = Summary;
    type Prepared = SlerpPrepared;

    fn prepare<const D: usize>(
        &mut self,
        path: &str,
        a: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Option<(SlerpPrepared, Option<Summary>)> {
        let config = self.config_for(path);
        if config.t == 0.0 || config.t == 1.0 {
            return Some((SlerpPrepared::Endpoint, None));
        }
        let mut others = others.into_iter();
        let b = others.next().expect("b is paired with a");
        let prepared = match others.next() {
            Some(base) => task_vector::prepare_task_vectors(base, a, b, &config),
            None => prepare(&Pair::new(a, b, KernelChoice::Fused), &config),
        };
        prepared.map(|(p, summary)| (SlerpPrepared::Prepared(p), summary))
    }

    fn apply<const D: usize>(
        &mut self,
        path: &str,
        prepared: SlerpPrepared,
        a: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> (Tensor<D>, Option<Summary>) {
        let t = self.config_for(path).t;
        let mut others = others.into_iter();
        let b = others.next().expect("b is paired with a");
        let out = match (prepared, others.next()) {
            (SlerpPrepared::Endpoint, _) => endpoint(&a, &b, t).expect("an endpoint"),
            (SlerpPrepared::Prepared(p), Some(base)) => {
                task_vector::apply_task_vectors(base, a, b, p)
            }
            (SlerpPrepared::Prepared(p), None) => apply(Pair::new(a, b, KernelChoice::Fused), p),
        };
        (out, None)
    }

    fn combine<const D: usize>(
        &mut self,
        path: &str,
        a: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Interpolated<D> {
        let config = self.config_for(path);
        let mut others = others.into_iter();
        let b = others.next().expect("b is paired with a");
        match others.next() {
            Some(base) => task_vector::interpolate_task_vectors(base, a, b, &config),
            None => interpolate(a, b, &config, KernelChoice::Fused),
        }
    }
}
