//! [`SphericalMean`]: the weighted Riemannian (Karcher) mean of N models on the sphere.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::Serialize;

use super::walk::{Combine, Model, apply_pairs, check_structure, map_pairs, prepare_pairs, totals};
use crate::control::MergeControl;
use crate::error::MergeError;
use crate::error::MergeIntoError;
use crate::interpolate::{AutodiffState, Interpolated, TensorInfo, check_pair, compute_dtype};
use crate::numerics::{ANTIPARALLEL_MARGIN, Angle, Branch, LerpReason, angle, sinc};
use crate::reduce::tensor_stats;

/// The weighted Karcher mean of N ≥ 2 models (or tensors) on the sphere.
///
/// Per tensor: each model's direction `uᵢ = xᵢ/‖xᵢ‖`, then the unit vector `m` minimising
/// `Σ wᵢ·θ(m, uᵢ)²`, found by Riemannian gradient steps from the normalised weighted mean
/// (`m ← exp_m(Σ wᵢ log_m(uᵢ) / Σ wᵢ)`); the result is `m` times the weighted mean of the
/// norms. Each step reads `N + 2` numbers back from the device. Iteration stops when the step
/// is shorter than the tolerance (default 1e-7 rad), when it stops shrinking (f32 has nothing
/// more to give), or after `max_steps` (default 32).
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
    /// [`MergeError::InvalidWeights`] when there are fewer than two weights, a weight is
    /// negative or not finite, or they sum to 0.
    pub fn new(weights: Vec<f64>) -> Result<Self, MergeError> {
        let bad = |reason: String| Err(MergeError::InvalidWeights { reason });
        if weights.len() < 2 {
            return bad(format!(
                "a mean needs at least two models, got {}",
                weights.len()
            ));
        }
        if let Some((i, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
        {
            return bad(format!("weight {i} is {w}; weights must be finite and ≥ 0"));
        }
        if weights.iter().sum::<f64>() <= 0.0 {
            return bad("the weights sum to 0".into());
        }
        Ok(Self {
            weights,
            tolerance: 1e-7,
            max_steps: 32,
            eps: 1e-8,
        })
    }

    /// Step length, in radians, below which the iteration stops (finite, > 0).
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Most gradient steps per tensor.
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

    fn validate(&self, models: usize) -> Result<(), MergeError> {
        if models != self.weights.len() {
            return Err(MergeError::InvalidWeights {
                reason: format!("{} weights for {models} models", self.weights.len()),
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
        self.validate(tensors.len())?;
        let first = TensorInfo::of(&tensors[0]);
        for t in &tensors {
            check_pair("", &first, &TensorInfo::of(t))?;
        }
        let autodiff = AutodiffState::of(&tensors[0]);
        let inner: Vec<_> = tensors.into_iter().map(Tensor::inner).collect();
        let (out, stats) = self.compute(&inner).ok_or(MergeError::NonFinite {
            path: String::new(),
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
        self.run(Model::Borrowed(*first), others)
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
        self.run(Model::Owned(first), others).map_err(|(e, model)| {
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
    ) -> Result<(M, Vec<MeanStats>), (MergeError, Option<M>)> {
        let give_back = |e: MergeError, first: Model<'_, M>| match first {
            Model::Owned(m) => (e, Some(m)),
            Model::Borrowed(_) => (e, None),
        };
        if let Err(e) = self.validate(others.len() + 1) {
            return Err(give_back(e, first));
        }
        let names: Vec<String> = (0..=others.len()).map(|i| i.to_string()).collect();
        let named: Vec<(&str, &M)> = names[1..]
            .iter()
            .map(String::as_str)
            .zip(others.iter().copied())
            .collect();
        let structure = match check_structure((&names[0], first.get()), &named) {
            Ok(structure) => structure,
            Err(e) => return Err(give_back(e, first)),
        };
        let totals = totals(&structure);
        let combine = &mut MeanCombine { mean: self };
        let control = &mut MergeControl::new();
        let mapped = match first {
            Model::Borrowed(_) => map_pairs(first, others, combine, control, totals),
            Model::Owned(_) => {
                let prepass = prepare_pairs(first.get(), others, combine, control, totals);
                if let Some(stop) = prepass.stop.clone() {
                    return Err(give_back(stop.into_error(), first));
                }
                apply_pairs(first, prepass, combine, control, totals)
            }
        };
        if let Some(stop) = mapped.stop {
            return Err((stop.into_error(), None));
        }
        let stats = mapped
            .stats
            .into_iter()
            .map(|(path, stats)| MeanStats { path, ..stats })
            .collect();
        Ok((mapped.module, stats))
    }

    /// Whether every weighted tensor is finite (the one way [`compute`](Self::compute) fails).
    fn finite<const D: usize>(&self, tensors: &[Tensor<D>]) -> bool {
        self.weights.iter().zip(tensors).all(|(w, x)| {
            if *w <= 0.0 {
                return true;
            }
            let compute = compute_dtype(x.dtype()).expect("checked before computing");
            let n = x.shape().num_elements();
            let x = x.clone().cast(compute).reshape([n]);
            tensor_stats(x.clone(), x).aa.is_finite()
        })
    }

    /// The mean of tensors known to match, without autodiff; `None` when a weighted one is not
    /// finite.
    fn compute<const D: usize>(&self, tensors: &[Tensor<D>]) -> Option<(Tensor<D>, MeanStats)> {
        let dims = tensors[0].dims();
        let dtype = tensors[0].dtype();
        let n: usize = dims.iter().product();
        let compute = compute_dtype(dtype).expect("checked before computing");
        let total: f64 = self.weights.iter().sum();
        let (weights, xs): (Vec<f64>, Vec<Tensor<1>>) = self
            .weights
            .iter()
            .zip(tensors)
            .filter(|(w, _)| **w > 0.0)
            .map(|(w, x)| (*w / total, x.clone().cast(compute).reshape([n])))
            .unzip();
        let mut stats = MeanStats {
            path: String::new(),
            numel: n,
            branch: Branch::Slerp,
            steps: 0,
            residual: 0.0,
        };
        let finish = |x: Tensor<1>| x.reshape(dims).cast(dtype);
        let linear = |xs: &[Tensor<1>]| {
            xs.iter()
                .zip(&weights)
                .map(|(x, w)| x.clone().mul_scalar(*w))
                .reduce(|acc, x| acc.add(x))
                .expect("at least one weighted model")
        };
        if n == 0 {
            return Some((finish(xs[0].clone()), stats));
        }
        let norms: Vec<f64> = xs
            .iter()
            .map(|x| tensor_stats(x.clone(), x.clone()).aa.sqrt())
            .collect();
        if norms.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let lerp = |reason, stats: &MeanStats| {
            let stats = MeanStats {
                branch: Branch::Lerp(reason),
                residual: 0.0,
                ..stats.clone()
            };
            Some((finish(linear(&xs)), stats))
        };
        if norms.iter().any(|v| *v <= self.eps) {
            return lerp(LerpReason::ZeroNorm, &stats);
        }
        let norm_mean: f64 = norms.iter().zip(&weights).map(|(v, w)| v * w).sum();
        let units: Vec<Tensor<1>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, v)| x.clone().div_scalar(*v))
            .collect();
        // Start from the normalised weighted mean of the directions.
        let start = linear(&units);
        let length = tensor_stats(start.clone(), start.clone()).aa.sqrt();
        if length <= 1e-3 {
            return lerp(LerpReason::Antiparallel, &stats);
        }
        let mut m = start.div_scalar(length);
        let mut previous = f64::INFINITY;
        loop {
            // cos and angle of m to each direction; log_m(uᵢ) = θᵢ/sin θᵢ · (uᵢ − cosᵢ·m).
            let mut alphas = Vec::with_capacity(units.len());
            let mut beta = 0.0;
            for (u, w) in units.iter().zip(&weights) {
                let pair = tensor_stats(m.clone(), u.clone());
                let Some(Angle { cos, theta }) = angle(pair) else {
                    return lerp(LerpReason::ZeroNorm, &stats);
                };
                if cos < -(1.0 - ANTIPARALLEL_MARGIN) {
                    return lerp(LerpReason::Antiparallel, &stats);
                }
                let alpha = w / sinc(theta);
                alphas.push(alpha);
                beta += alpha * cos;
            }
            let step = units
                .iter()
                .zip(&alphas)
                .map(|(u, a)| u.clone().mul_scalar(*a))
                .reduce(|acc, x| acc.add(x))
                .expect("at least one weighted model")
                .sub(m.clone().mul_scalar(beta));
            let size = tensor_stats(step.clone(), step.clone()).aa.sqrt();
            stats.residual = size;
            if size <= self.tolerance || size >= previous || stats.steps >= self.max_steps {
                break;
            }
            previous = size;
            stats.steps += 1;
            // exp_m(step) = cos|step|·m + sin|step|/|step| · step, renormalised against drift.
            let next = m.mul_scalar(size.cos()).add(step.mul_scalar(sinc(size)));
            let length = tensor_stats(next.clone(), next.clone()).aa.sqrt();
            m = next.div_scalar(length);
        }
        Some((finish(m.mul_scalar(norm_mean)), stats))
    }
}

/// The spherical mean of each float tensor.
struct MeanCombine<'a> {
    mean: &'a SphericalMean,
}

impl Combine for MeanCombine<'_> {
    type Stats = MeanStats;
    type Prepared = ();

    fn prepare<const D: usize>(
        &mut self,
        _path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Option<((), Option<MeanStats>)> {
        let mut all = vec![first];
        all.extend(others);
        self.mean.finite(&all).then_some(((), None))
    }

    fn apply<const D: usize>(
        &mut self,
        _path: &str,
        _prepared: (),
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> (Tensor<D>, Option<MeanStats>) {
        let mut all = vec![first];
        all.extend(others);
        let (out, stats) = self
            .mean
            .compute(&all)
            .expect("the inputs were found finite in the statistics pass");
        (out, Some(stats))
    }

    fn combine<const D: usize>(
        &mut self,
        _path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Interpolated<D, MeanStats> {
        let mut all = vec![first];
        all.extend(others);
        match self.mean.compute(&all) {
            Some((out, stats)) => Interpolated::Done(out, Some(stats)),
            None => Interpolated::NonFinite(all.swap_remove(0)),
        }
    }
}
