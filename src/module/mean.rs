//! [`SphericalMean`]: the weighted Riemannian (Karcher) mean of N models on the sphere.

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::Tensor;
use serde::Serialize;

use super::walk::{
    Combine, Model, Stop, apply_pairs, check_structure, map_pairs, prepare_pairs, totals,
};
use crate::control::MergeControl;
use crate::engine::{self, Inputs};
use crate::error::MergeError;
use crate::error::MergeIntoError;
use crate::family::{Gram, KarcherOptions, Refusal, Rule, nuslerp_t};
use crate::interpolate::{AutodiffState, Interpolated, TensorInfo, check_pair};
use crate::kernels;
use crate::numerics::Branch;
use crate::schedule::{Resolver, Schedule, layer_positions};

/// The weighted Karcher mean of N ≥ 2 models (or tensors) on the sphere.
///
/// Per tensor: each model's direction `uᵢ = xᵢ/‖xᵢ‖`, then the unit vector `m` minimising
/// `Σ wᵢ·θ(m, uᵢ)²`, found by Riemannian gradient steps from the normalised weighted mean
/// (`m ← exp_m(Σ wᵢ log_m(uᵢ) / Σ wᵢ)`); the result is `m` times the weighted mean of the
/// norms. Every step is a combination of the `uᵢ`, so the whole iteration runs on N
/// coefficients in f64 on the host, from the inputs' Gram matrix: one pass over the tensors
/// for the Gram matrix, one pass writing `Σ cᵢ·xᵢ`, however many steps (fused kernels on
/// flex and ndarray, and on wgpu for up to 8 models, where a whole-model merge reads every
/// tensor's Gram matrix back at once). Iteration stops when the step is shorter than the tolerance
/// (default 1e-12 rad), when it stops shrinking, or after `max_steps`.
/// [`with_method`](Self::with_method) picks another member of the family ([`MeanMethod`]).
///
/// For two models with weights `(1 − t, t)` the direction is the geodesic point at `t`, so the
/// result equals [`slerp`](crate::slerp) whenever the two tensors have equal norms. With
/// unequal norms the two differ by design: `slerp` applies its coefficients to the raw tensors,
/// the mean interpolates direction and norm separately.
///
/// A zero tensor (norm ≤ `eps`) among the weighted models, or models so spread that the mean
/// is undefined (a model antipodal to the mean, or weighted directions that cancel), give the
/// weighted linear mean `Σ wᵢ xᵢ / Σ wᵢ` instead, reported as [`Branch::Lerp`]. Models with
/// weight 0 take no part.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_slerp::SphericalMean;
///
/// let device = Device::flex();
/// let x = Tensor::<1>::from_floats([1.0, 0.0, 0.0], &device);
/// let y = Tensor::<1>::from_floats([0.0, 1.0, 0.0], &device);
/// let z = Tensor::<1>::from_floats([0.0, 0.0, 1.0], &device);
/// let (mean, stats) = SphericalMean::new(vec![1.0, 1.0, 1.0])?.mean(vec![x, y, z])?;
/// assert_eq!(stats.branch, burn_slerp::Branch::Slerp);
/// let third = 1.0 / 3f32.sqrt();
/// mean.into_data().assert_approx_eq::<f32>(
///     &burn::tensor::TensorData::from([third, third, third]),
///     burn::tensor::Tolerance::absolute(1e-6),
/// );
/// # Ok::<(), burn_slerp::MergeError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SphericalMean {
    weights: Vec<f64>,
    tolerance: f64,
    max_steps: usize,
    eps: f64,
    method: MeanMethod,
    /// Per-parameter weights of some models: (model index, its schedule).
    schedules: Vec<(usize, Schedule)>,
    /// Every model's weight at some parameters, by path, ahead of the schedules (a recipe
    /// front end that resolves weights its own way gives them here).
    path_weights: Option<std::sync::Arc<HashMap<String, Vec<f64>>>>,
}

/// The member of the SLERP family a [`SphericalMean`] computes. Each is one pass over the
/// inputs for their Gram matrix, coefficients on the host in f64, and one pass writing the
/// combination.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum MeanMethod {
    /// The weighted Karcher mean, iterated to convergence (the default).
    Karcher,
    /// mergekit 0.1.5's `karcher`: equal weights over every input (the mean's weights only
    /// have to be one per model; zero weights take part too), inputs with a norm ≤ `tol`
    /// dropped, at most `max_iter` steps, an input closer than `tol` to the mean skipped in a
    /// step, stop when the step is shorter than `tol`.
    MergekitKarcher {
        /// Most steps (mergekit: 10).
        max_iter: usize,
        /// mergekit's `tol` (1e-5).
        tol: f64,
    },
    /// mergekit 0.1.5's `multislerp`: the normalised weighted mean of the directions
    /// `xᵢ/(‖xᵢ‖ + eps)` times `Σ wᵢ‖xᵢ‖·cos(eps)` (its tangent step is exactly zero). Two
    /// inputs whose weighted directions cancel give their weighted sum; more are an error,
    /// [`MergeError::CancellingDirections`], unless every input is zero (where mergekit
    /// raises too): then the result is zero.
    Multislerp {
        /// Whether the weights are divided by their sum first (mergekit: true).
        normalize_weights: bool,
        /// Added to each norm (mergekit: 1e-8).
        eps: f64,
    },
    /// mergekit 0.1.5's `nuslerp` of exactly two models (flattened: one angle per tensor), at
    /// `t = w₂/(w₁ + w₂)`: norms clamped at 1e-7, so a zero tensor against the other gives
    /// `sin(tπ/2)·` the other (0.707 at t = 0.5); linear interpolation where `1 − cos² ≤ 1e-16`;
    /// otherwise SLERP with `θ = acos(cos)`.
    Nuslerp,
    /// The weighted linear mean `Σ wᵢxᵢ / Σ wᵢ`.
    Linear,
}

/// What [`SphericalMean`] computed for one tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeanStats {
    /// Dotted module path (empty for [`SphericalMean::mean`]).
    pub path: String,
    /// Number of elements.
    pub numel: usize,
    /// [`Branch::Slerp`] for the spherical mean; [`Branch::Lerp`] with the reason for the
    /// weighted linear mean.
    pub branch: Branch,
    /// Gradient steps taken.
    pub steps: usize,
    /// Length of the last step, in radians (0 for the linear mean).
    pub residual: f64,
}

impl SphericalMean {
    /// A mean with these weights, one per model, in the order models will be given.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidWeights`] when there are fewer than two weights, a weight is not
    /// finite, or weights ≥ 0 sum to 0. Negative weights are for the methods that take them
    /// ([`with_method`](Self::with_method)): merging checks the weights against the method,
    /// and the default, the exact Karcher mean, refuses them.
    pub fn new(weights: Vec<f64>) -> Result<Self, MergeError> {
        let bad = |reason: String| Err(MergeError::InvalidWeights { reason });
        if weights.len() < 2 {
            return bad(format!(
                "a mean needs at least two models, got {}",
                weights.len()
            ));
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return bad(format!("weight {i} is {w}; weights must be finite"));
        }
        if weights.iter().all(|w| *w >= 0.0) && weights.iter().sum::<f64>() <= 0.0 {
            return bad("the weights sum to 0".into());
        }
        Ok(Self {
            weights,
            tolerance: 1e-12,
            max_steps: 1000,
            eps: 1e-8,
            method: MeanMethod::Karcher,
            schedules: Vec::new(),
            path_weights: None,
        })
    }

    /// Gives model `model` (its index in the order models are given) a weight per parameter:
    /// the first rule of `schedule` whose glob matches a parameter's path (a tensor's name in
    /// a file) gives its weight there, a constant or a gradient over the layer stack as for
    /// [`SlerpConfig`](crate::SlerpConfig)'s `t` (finite values, checked against the method
    /// as [`new`](Self::new)'s weights are, per parameter); the parameters no
    /// rule matches take the model's weight from [`new`](Self::new).
    ///
    /// ```
    /// use burn_slerp::{Schedule, SphericalMean};
    ///
    /// // The second model counts for nothing in the attention layers, and for more and more
    /// // of the MLPs towards the last layer.
    /// let schedule = Schedule::new()
    ///     .with_rule("**.attn.**", 0.0.into())
    ///     .with_rule("**.mlp.**", vec![0.0, 2.0].into());
    /// let mean = SphericalMean::new(vec![1.0, 1.0])?.with_weight_schedule(1, schedule);
    /// assert_eq!(mean.weights(), [1.0, 1.0]); // the weights where no rule matches
    /// # Ok::<(), burn_slerp::MergeError>(())
    /// ```
    pub fn with_weight_schedule(mut self, model: usize, schedule: Schedule) -> Self {
        self.schedules.retain(|(m, _)| *m != model);
        self.schedules.push((model, schedule));
        self
    }

    /// Gives every model's weight at each of these parameters, ahead of any schedule: what a
    /// recipe front end that resolves weights its own way (mergekit's YAML) hands over.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) fn with_path_weights(mut self, weights: HashMap<String, Vec<f64>>) -> Self {
        self.path_weights = Some(std::sync::Arc::new(weights));
        self
    }

    /// Every model's weight at the parameter `path`, at layer `position`.
    pub(crate) fn weights_at(&self, path: &str, position: f64) -> Result<Vec<f64>, MergeError> {
        if let Some(weights) = self.path_weights.as_ref().and_then(|w| w.get(path)) {
            self.check_weights(weights, Some(path))?;
            return Ok(weights.clone());
        }
        let mut weights = self.weights.clone();
        for (model, schedule) in &self.schedules {
            let mut resolver = Resolver::weights(schedule, self.weights[*model])?;
            weights[*model] = resolver.resolve(path, position).t;
        }
        self.check_weights(&weights, Some(path))?;
        Ok(weights)
    }

    /// The weights (the mean's, or those of the parameter `path`) against the method: the
    /// exact Karcher mean takes weights ≥ 0 (a weighted Fréchet mean has no meaning for a
    /// negative one); the linear mean and multislerp with normalised weights any whose sum is
    /// not 0 (they divide by it); nuslerp, multislerp with raw weights and mergekit's karcher
    /// (which ignores them) any finite weights, as mergekit takes them.
    fn check_weights(&self, weights: &[f64], path: Option<&str>) -> Result<(), MergeError> {
        let of = path.map_or(String::new(), |p| format!(" of `{p}`"));
        let bad = |reason: String| Err(MergeError::InvalidWeights { reason });
        let sum: f64 = weights.iter().sum();
        match self.method {
            MeanMethod::Karcher => {
                if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| **w < 0.0) {
                    return bad(format!(
                        "weight {i}{of} is {w}; the exact Karcher mean takes weights ≥ 0 \
                         (multislerp, nuslerp and the linear mean take negative ones)"
                    ));
                }
                if sum <= 0.0 {
                    return bad(format!("the weights{of} sum to 0"));
                }
            }
            MeanMethod::Linear
            | MeanMethod::Multislerp {
                normalize_weights: true,
                ..
            } if sum == 0.0 => {
                return bad(format!("the weights{of} sum to 0"));
            }
            _ => {}
        }
        Ok(())
    }

    /// The member of the family to compute ([`MeanMethod::Karcher`] by default).
    pub fn with_method(mut self, method: MeanMethod) -> Self {
        self.method = method;
        self
    }

    /// Step length, in radians, below which the iteration stops (finite, > 0; 1e-12 by
    /// default).
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Most gradient steps per tensor (1000 by default; the iteration usually stops at the
    /// tolerance, or when the step no longer shrinks, within a few).
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps;
        self
    }

    /// Norm at or below which a tensor counts as zero (finite, ≥ 0).
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The weights.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Every check of the mean's settings against the number of models it is given.
    pub(crate) fn validate(&self, models: usize) -> Result<(), MergeError> {
        if models != self.weights.len() {
            return Err(MergeError::InvalidWeights {
                reason: format!("{} weights for {models} models", self.weights.len()),
            });
        }
        if let Some((model, _)) = self.schedules.iter().find(|(m, _)| *m >= models) {
            return Err(MergeError::InvalidWeights {
                reason: format!("a weight schedule for model {model} of {models}"),
            });
        }
        for (_, schedule) in &self.schedules {
            schedule.compile_weights()?;
        }
        self.check_weights(&self.weights, None)?;
        if self.method == MeanMethod::Nuslerp && models != 2 {
            return Err(MergeError::InvalidWeights {
                reason: format!("nuslerp merges exactly two models, got {models}"),
            });
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
            return Err(MergeError::InvalidConfig {
                field: "tolerance",
                value: self.tolerance,
            });
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(MergeError::InvalidConfig {
                field: "eps",
                value: self.eps,
            });
        }
        Ok(())
    }

    /// The mean of one set of tensors of one shape and device, in the first one's dtype.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidWeights`], [`MergeError::InvalidConfig`],
    /// [`MergeError::ShapeMismatch`], [`MergeError::DeviceMismatch`],
    /// [`MergeError::UnsupportedDType`], and [`MergeError::NonFinite`] when a weighted tensor
    /// holds a NaN or an infinity.
    pub fn mean<const D: usize>(
        &self,
        tensors: Vec<Tensor<D>>,
    ) -> Result<(Tensor<D>, MeanStats), MergeError> {
        self.mean_of(tensors, None)
    }

    /// The mean of the task vectors `xᵢ − base`, plus `base`: `base + Σ cᵢ·(xᵢ − base)`, with
    /// the task vectors' Gram matrix reduced from the differences (never from the raw
    /// tensors', which cancels digits for fine-tunes close to their base). With
    /// [`MeanMethod::Multislerp`] and [`MeanMethod::Nuslerp`] this is mergekit's
    /// `multislerp` and `nuslerp` with a `base_model`.
    ///
    /// # Errors
    ///
    /// As [`mean`](Self::mean), with `base` checked like the tensors.
    pub fn mean_with_base<const D: usize>(
        &self,
        base: Tensor<D>,
        tensors: Vec<Tensor<D>>,
    ) -> Result<(Tensor<D>, MeanStats), MergeError> {
        self.mean_of(tensors, Some(base))
    }

    fn mean_of<const D: usize>(
        &self,
        tensors: Vec<Tensor<D>>,
        base: Option<Tensor<D>>,
    ) -> Result<(Tensor<D>, MeanStats), MergeError> {
        self.validate(tensors.len())?;
        let first = TensorInfo::of(&tensors[0]);
        for t in tensors.iter().chain(&base) {
            check_pair("", &first, &TensorInfo::of(t))?;
        }
        let autodiff = AutodiffState::of(&tensors[0]);
        let inner: Vec<_> = tensors.into_iter().map(Tensor::inner).collect();
        let path = String::new();
        let base = base.map(Tensor::inner);
        let (out, stats) =
            self.compute(inner, base, &self.weights)
                .map_err(|refusal| match refusal {
                    Refusal::NonFinite => MergeError::NonFinite { path },
                    Refusal::Cancelling => MergeError::CancellingDirections { path },
                })?;
        Ok((autodiff.restore(out), stats))
    }

    /// The mean of N models of one architecture: every float parameter averaged on the
    /// sphere, paired by path; int and bool parameters, flags and autodiff state from the
    /// first model.
    ///
    /// # Errors
    ///
    /// As [`SlerpMerger::merge`](crate::SlerpMerger::merge) (every model checked against the
    /// first), and [`MergeError::InvalidWeights`] when the number of weights is not the
    /// number of models.
    pub fn merge<M: Module>(&self, models: &[&M]) -> Result<(M, Vec<MeanStats>), MergeError> {
        let Some((first, others)) = models.split_first() else {
            return Err(self.validate(0).expect_err("no weights for no models"));
        };
        self.run(
            Model::Borrowed(*first),
            others,
            None,
            &mut MergeControl::new(),
        )
        .map_err(|(e, _)| e)
    }

    /// The mean of the models' task vectors from `base`, plus `base`, for every float
    /// parameter ([`mean_with_base`](Self::mean_with_base) per tensor).
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), with `base` checked against the first model like the others.
    pub fn merge_with_base<M: Module>(
        &self,
        base: &M,
        models: &[&M],
    ) -> Result<(M, Vec<MeanStats>), MergeError> {
        let Some((first, others)) = models.split_first() else {
            return Err(self.validate(0).expect_err("no weights for no models"));
        };
        self.run(
            Model::Borrowed(*first),
            others,
            Some(base),
            &mut MergeControl::new(),
        )
        .map_err(|(e, _)| e)
    }

    /// [`merge`](Self::merge) with progress reports after each tensor and cancellation
    /// before each ([`MergeError::Cancelled`]).
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), and [`MergeError::Cancelled`].
    pub fn merge_with_control<M: Module>(
        &self,
        models: &[&M],
        control: &mut MergeControl<'_>,
    ) -> Result<(M, Vec<MeanStats>), MergeError> {
        let Some((first, others)) = models.split_first() else {
            return Err(self.validate(0).expect_err("no weights for no models"));
        };
        self.run(Model::Borrowed(*first), others, None, control)
            .map_err(|(e, _)| e)
    }

    /// The consuming form of [`merge`](Self::merge), for the memory it saves: `first` is
    /// consumed and each of its float tensors dropped as its mean replaces it, so the merge
    /// holds the models and one tensor's temporaries rather than one more model. Every input
    /// is checked for NaN and infinity before the first tensor is replaced, so every error
    /// comes back with `first`, untouched. The same bits as `merge`.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge) (with `first` the first of the models and `others` the
    /// rest, one weight per model), with `first` handed back untouched.
    pub fn merge_into<M: Module>(
        &self,
        first: M,
        others: &[&M],
    ) -> Result<(M, Vec<MeanStats>), MergeIntoError<M>> {
        self.merge_into_with_control(first, others, &mut MergeControl::new())
    }

    /// [`merge_into`](Self::merge_into) with progress reports after each tensor of each pass
    /// and cancellation before each tensor of the statistics pass (once the writes have
    /// begun, the merge runs to its end).
    ///
    /// # Errors
    ///
    /// As [`merge_into`](Self::merge_into), and [`MergeError::Cancelled`], with `first`
    /// handed back untouched.
    pub fn merge_into_with_control<M: Module>(
        &self,
        first: M,
        others: &[&M],
        control: &mut MergeControl<'_>,
    ) -> Result<(M, Vec<MeanStats>), MergeIntoError<M>> {
        self.run(Model::Owned(first), others, None, control)
            .map_err(|(e, model)| {
                MergeIntoError::new(
                    e,
                    model.expect("consuming means fail before their first write"),
                )
            })
    }

    /// The mean behind both entry points: tensor by tensor for a borrowed first model,
    /// statistics first for an owned one.
    #[allow(clippy::type_complexity)]
    fn run<M: Module>(
        &self,
        first: Model<'_, M>,
        others: &[&M],
        base: Option<&M>,
        control: &mut MergeControl<'_>,
    ) -> Result<(M, Vec<MeanStats>), (MergeError, Option<M>)> {
        let give_back = |e: MergeError, first: Model<'_, M>| match first {
            Model::Owned(m) => (e, Some(m)),
            Model::Borrowed(_) => (e, None),
        };
        if let Err(e) = self.validate(others.len() + 1) {
            return Err(give_back(e, first));
        }
        let names: Vec<String> = (0..=others.len()).map(|i| i.to_string()).collect();
        let mut named: Vec<(&str, &M)> = names[1..]
            .iter()
            .map(String::as_str)
            .zip(others.iter().copied())
            .collect();
        named.extend(base.map(|base| ("base", base)));
        // The base walks as the last of the others.
        let others: Vec<&M> = named.iter().map(|(_, m)| *m).collect();
        let others = others.as_slice();
        let structure = match check_structure((&names[0], first.get()), &named) {
            Ok(structure) => structure,
            Err(e) => return Err(give_back(e, first)),
        };
        let totals = totals(&structure);
        let paths: Vec<&str> = structure.floats().map(|s| s.path.as_str()).collect();
        let mut weights = HashMap::new();
        for (path, position) in paths.iter().zip(layer_positions(&paths)) {
            match self.weights_at(path, position) {
                Ok(w) => weights.insert(path.to_string(), w),
                Err(e) => return Err(give_back(e, first)),
            };
        }
        let combine = &mut MeanCombine {
            mean: self,
            base: base.is_some(),
            weights,
            cancelling: None,
            queued: Vec::new(),
        };
        // Statistics first for an owned model (nothing is written before every tensor is
        // known to merge), and on CubeCL devices, where the Gram matrices of every tensor
        // come back in one read.
        let on_device = structure
            .floats()
            .any(|s| s.info.device.as_ref().is_some_and(kernels::is_cube));
        let mapped = match first {
            Model::Borrowed(_) if !on_device => map_pairs(first, others, combine, control, totals),
            _ => {
                let mut prepass = prepare_pairs(first.get(), others, combine, control, totals);
                if prepass.stop != Some(Stop::Cancelled)
                    && let Err((path, refusal)) = self.resolve(combine, &mut prepass.prepared)
                {
                    // The tensors queued were all visited before any the pass stopped at.
                    combine.refused(&path, refusal);
                    prepass.stop = Some(Stop::NonFinite(path));
                }
                if let Some(stop) = prepass.stop.clone() {
                    return Err(give_back(combine.error(stop), first));
                }
                apply_pairs(first, prepass, combine, control, totals)
            }
        };
        if let Some(stop) = mapped.stop {
            return Err((combine.error(stop), None));
        }
        let stats = mapped
            .stats
            .into_iter()
            .map(|(path, stats)| MeanStats { path, ..stats })
            .collect();
        Ok((mapped.module, stats))
    }

    /// The coefficients of every tensor whose Gram pass was queued on a device
    /// ([`MeanPlan::Queued`]), from one read per device, in the order the walk visited them;
    /// the first tensor refused, with why, if one is.
    fn resolve(
        &self,
        combine: &mut MeanCombine<'_>,
        prepared: &mut HashMap<String, MeanPrepared>,
    ) -> Result<(), (String, Refusal)> {
        let order = std::mem::take(&mut combine.queued);
        let mut queued: Vec<(String, Tensor<1>)> = Vec::new();
        for path in &order {
            if let Some(MeanPrepared {
                plan: MeanPlan::Queued { gram, .. },
                ..
            }) = prepared.get(path)
            {
                let len = gram.shape().num_elements();
                queued.push((path.clone(), (**gram).clone().reshape([len])));
            }
        }
        let mut values: HashMap<String, Vec<f32>> = HashMap::new();
        while let Some((_, first)) = queued.first() {
            let device = first.device();
            let (group, rest): (Vec<_>, Vec<_>) =
                queued.into_iter().partition(|(_, g)| g.device() == device);
            queued = rest;
            let lens: Vec<usize> = group.iter().map(|(_, g)| g.dims()[0]).collect();
            let (paths, grams): (Vec<String>, Vec<Tensor<1>>) = group.into_iter().unzip();
            // The one host read per device.
            let all: Vec<f32> = Tensor::cat(grams, 0).into_data().iter::<f32>().collect();
            let mut offset = 0;
            for (path, len) in paths.into_iter().zip(lens) {
                values.insert(path, all[offset..offset + len].to_vec());
                offset += len;
            }
        }
        for path in order {
            let Some(values) = values.get(&path) else {
                continue;
            };
            let entry = prepared.get_mut(&path).expect("queued paths are prepared");
            let MeanPlan::Queued { k, weights, .. } = &entry.plan else {
                unreachable!("only queued plans are resolved");
            };
            let gram = &engine::device_grams(*k, values)[0];
            match self.coefficients(gram, entry.stats.numel, weights) {
                Ok((coefficients, stats)) => {
                    *entry = MeanPrepared {
                        plan: MeanPlan::Host(coefficients),
                        stats,
                    };
                }
                Err(refusal) => return Err((path, refusal)),
            }
        }
        Ok(())
    }

    /// The rule of the family and the inputs that take part: those of weight ≠ 0, or every
    /// input for mergekit's `karcher`, which weighs them equally.
    fn rule(&self, weights: &[f64]) -> (Rule, Vec<usize>) {
        let all: Vec<usize> = (0..weights.len()).collect();
        let weighted: Vec<usize> = all.iter().copied().filter(|i| weights[*i] != 0.0).collect();
        match self.method {
            MeanMethod::Karcher => (
                Rule::Karcher(KarcherOptions {
                    tolerance: self.tolerance,
                    max_steps: self.max_steps,
                    eps: self.eps,
                }),
                weighted,
            ),
            MeanMethod::MergekitKarcher { max_iter, tol } => {
                (Rule::MergekitKarcher { max_iter, tol }, all)
            }
            MeanMethod::Multislerp {
                normalize_weights,
                eps,
            } => (
                Rule::Multislerp {
                    normalize_weights,
                    eps,
                },
                weighted,
            ),
            MeanMethod::Nuslerp => (
                Rule::Nuslerp {
                    t: nuslerp_t(weights[0], weights[1]),
                },
                all,
            ),
            MeanMethod::Linear => (Rule::Linear, weighted),
        }
    }

    /// The inputs that take part, by index: those of weight ≠ 0, or every input for
    /// mergekit's `karcher`, which weighs them equally.
    pub(crate) fn taking(&self, weights: &[f64]) -> Vec<usize> {
        self.rule(weights).1
    }

    /// The inputs that take part, as the engine computes them (the first model's tensor
    /// moved, not copied, so that the combine may write over it).
    fn inputs<const D: usize>(
        &self,
        tensors: Vec<Tensor<D>>,
        base: Option<Tensor<D>>,
        weights: &[f64],
    ) -> Inputs<D> {
        let mut slots: Vec<Option<Tensor<D>>> = tensors.into_iter().map(Some).collect();
        Inputs::new(
            self.taking(weights)
                .iter()
                .map(|i| slots[*i].take().expect("each input once"))
                .collect(),
            base,
        )
    }

    /// The coefficients of the inputs that take part ([`taking`](Self::taking)), from their
    /// Gram matrix, and what was computed for a tensor of `numel` elements.
    pub(crate) fn coefficients(
        &self,
        gram: &Gram,
        numel: usize,
        weights: &[f64],
    ) -> Result<(Vec<f64>, MeanStats), Refusal> {
        let (rule, taking) = self.rule(weights);
        let weights: Vec<f64> = taking.iter().map(|i| weights[*i]).collect();
        let outcome = rule.coefficients(gram, &weights)?;
        let stats = MeanStats {
            path: String::new(),
            numel,
            branch: outcome.branch,
            steps: outcome.steps,
            residual: outcome.residual,
        };
        Ok((outcome.coeffs, stats))
    }

    /// The statistics pass of one tensor: the Gram matrix and the coefficients, nothing
    /// written.
    fn prepare<const D: usize>(
        &self,
        inputs: &Inputs<D>,
        weights: &[f64],
    ) -> Result<MeanPrepared, Refusal> {
        let numel = inputs.numel();
        if numel == 0 {
            return Ok(MeanPrepared {
                plan: MeanPlan::Empty,
                stats: MeanStats::before(numel),
            });
        }
        let (coefficients, stats) = self.coefficients(&inputs.gram(1)[0], numel, weights)?;
        Ok(MeanPrepared {
            plan: MeanPlan::Host(coefficients),
            stats,
        })
    }

    /// [`prepare`](Self::prepare) where the Gram pass can be queued on the device, to be read
    /// with every other tensor's by [`resolve`](Self::resolve).
    fn queue<const D: usize>(
        &self,
        inputs: &Inputs<D>,
        weights: &[f64],
    ) -> Result<MeanPrepared, Refusal> {
        let numel = inputs.numel();
        match inputs.queue_gram(1) {
            Some(gram) if numel > 0 => Ok(MeanPrepared {
                plan: MeanPlan::Queued {
                    gram: Box::new(gram),
                    k: inputs.k(),
                    weights: weights.to_vec(),
                },
                // Replaced by what the coefficients give once the Gram matrix is read.
                stats: MeanStats::before(numel),
            }),
            _ => self.prepare(inputs, weights),
        }
    }

    /// The mean of tensors known to match, without autodiff.
    pub(crate) fn compute<const D: usize>(
        &self,
        tensors: Vec<Tensor<D>>,
        base: Option<Tensor<D>>,
        weights: &[f64],
    ) -> Result<(Tensor<D>, MeanStats), Refusal> {
        let inputs = self.inputs(tensors, base, weights);
        let prepared = self.prepare(&inputs, weights)?;
        Ok(prepared.apply(inputs))
    }
}

impl MeanStats {
    /// The statistics of a tensor of `numel` elements before any coefficient is computed (an
    /// empty tensor's, as it stays).
    fn before(numel: usize) -> Self {
        Self {
            path: String::new(),
            numel,
            branch: Branch::Slerp,
            steps: 0,
            residual: 0.0,
        }
    }
}

/// What the statistics pass of a mean leaves for its write pass.
struct MeanPrepared {
    plan: MeanPlan,
    stats: MeanStats,
}

/// How the write pass of a mean makes its tensor.
enum MeanPlan {
    /// An empty tensor: the first input as it is.
    Empty,
    /// One coefficient per input that takes part.
    Host(Vec<f64>),
    /// The Gram pass of the `k` inputs that take part, queued on a CubeCL device and not read
    /// yet, with the weights the coefficients need.
    Queued {
        gram: Box<Tensor<2>>,
        k: usize,
        weights: Vec<f64>,
    },
}

impl MeanPrepared {
    fn apply<const D: usize>(self, inputs: Inputs<D>) -> (Tensor<D>, MeanStats) {
        let out = match self.plan {
            MeanPlan::Host(c) => inputs.combine(&[c]),
            MeanPlan::Empty => inputs.into_first(),
            MeanPlan::Queued { .. } => unreachable!("queued plans are resolved before writing"),
        };
        (out, self.stats)
    }
}

/// The spherical mean of each float tensor.
struct MeanCombine<'a> {
    mean: &'a SphericalMean,
    /// Whether the last of the other models is the base of task vectors.
    base: bool,
    /// Every model's weight at each float parameter.
    weights: HashMap<String, Vec<f64>>,
    /// The parameter whose weighted directions cancelled ([`Refusal::Cancelling`]): the walk
    /// stops there as at a non-finite one, and the error names it.
    cancelling: Option<String>,
    /// The paths whose Gram pass is queued on a device, in the order the walk visited them.
    queued: Vec<String>,
}

impl MeanCombine<'_> {
    /// Every model's tensor in order, and the base's.
    fn split<const D: usize>(
        &self,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> (Vec<Tensor<D>>, Option<Tensor<D>>) {
        let mut all = vec![first];
        all.extend(others);
        let base = if self.base { all.pop() } else { None };
        (all, base)
    }

    /// The error a walk stopped with, told apart from a non-finite input.
    fn error(&self, stop: Stop) -> MergeError {
        match (stop, &self.cancelling) {
            (Stop::NonFinite(path), Some(cancelling)) if &path == cancelling => {
                MergeError::CancellingDirections { path }
            }
            (stop, _) => stop.into_error(),
        }
    }

    fn refused(&mut self, path: &str, refusal: Refusal) {
        if refusal == Refusal::Cancelling {
            self.cancelling = Some(path.to_string());
        }
    }
}

impl Combine for MeanCombine<'_> {
    type Stats = MeanStats;
    type Prepared = MeanPrepared;

    fn prepare<const D: usize>(
        &mut self,
        path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Option<(MeanPrepared, Option<MeanStats>)> {
        let (all, base) = self.split(first, others);
        let weights = &self.weights[path];
        match self
            .mean
            .queue(&self.mean.inputs(all, base, weights), weights)
        {
            Ok(prepared) => {
                if matches!(prepared.plan, MeanPlan::Queued { .. }) {
                    self.queued.push(path.to_string());
                }
                Some((prepared, None))
            }
            Err(refusal) => {
                self.refused(path, refusal);
                None
            }
        }
    }

    fn apply<const D: usize>(
        &mut self,
        path: &str,
        prepared: MeanPrepared,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> (Tensor<D>, Option<MeanStats>) {
        let (all, base) = self.split(first, others);
        let (out, stats) = prepared.apply(self.mean.inputs(all, base, &self.weights[path]));
        (out, Some(stats))
    }

    fn combine<const D: usize>(
        &mut self,
        path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Interpolated<D, MeanStats> {
        let shape = first.shape();
        let dtype = first.dtype();
        let device = first.device();
        let (all, base) = self.split(first, others);
        match self.mean.compute(all, base, &self.weights[path]) {
            Ok((out, stats)) => Interpolated::Done(out, Some(stats)),
            Err(refusal) => {
                self.refused(path, refusal);
                Interpolated::NonFinite(Tensor::zeros(shape, (&device, dtype)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_schedules_give_each_path_its_weights() {
        let mean = SphericalMean::new(vec![1.0, 2.0, 3.0])
            .unwrap()
            .with_weight_schedule(
                1,
                Schedule::new().with_rule("**.mlp.**", vec![0.0, 4.0].into()),
            )
            .with_weight_schedule(2, Schedule::new().with_rule("head.*", 0.5.into()));
        assert_eq!(
            mean.weights_at("layers.3.mlp.w", 0.25).unwrap(),
            [1.0, 1.0, 3.0]
        );
        assert_eq!(mean.weights_at("head.w", 0.0).unwrap(), [1.0, 2.0, 0.5]);
        assert_eq!(mean.weights_at("embed", 0.0).unwrap(), [1.0, 2.0, 3.0]);
        // Weights are not bounded by 1; a negative one is refused by the exact Karcher mean,
        // by name, and taken by multislerp.
        let negative = mean
            .clone()
            .with_weight_schedule(0, Schedule::new().with_rule("**", (-1.0).into()));
        assert!(negative.validate(3).is_ok());
        match negative.weights_at("embed", 0.0) {
            Err(MergeError::InvalidWeights { reason }) => {
                assert!(
                    reason.contains("`embed`") && reason.contains("Karcher"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let multislerp = negative.with_method(MeanMethod::Multislerp {
            normalize_weights: true,
            eps: 1e-8,
        });
        assert_eq!(
            multislerp.weights_at("embed", 0.0).unwrap(),
            [-1.0, 2.0, 3.0]
        );
        let nan = mean
            .clone()
            .with_weight_schedule(0, Schedule::new().with_rule("**", f64::NAN.into()));
        assert!(matches!(
            nan.validate(3),
            Err(MergeError::InvalidSchedule { .. })
        ));
        assert!(matches!(
            mean.validate(2),
            Err(MergeError::InvalidWeights { .. })
        ));
        assert!(mean.validate(3).is_ok());
    }
}
