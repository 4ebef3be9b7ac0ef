//! The SLERP family on the host: every method as a function from the Gram matrix of the
//! vectors it works on (with its weights, `t` and options) to the coefficients `cᵢ` of the
//! combination `Σ cᵢ·xᵢ` it returns. Nothing here knows tensors: the engine computes the Gram
//! matrix in one pass, these functions turn it into coefficients in f64, and the engine
//! writes the combination in one more pass.
//!
//! Where a method works on task vectors (`xᵢ − base`), the Gram matrix given here is the task
//! vectors' own (reduced from the differences, never derived from the raw Gram matrix), and
//! the coefficients apply to the task vectors.

use crate::numerics::{ANTIPARALLEL_MARGIN, Branch, LerpReason, PairStats, sinc};

/// The Gram matrix `Gᵢⱼ = xᵢ·xⱼ` of k vectors, in f64.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gram {
    k: usize,
    /// Row-major, symmetric.
    g: Vec<f64>,
}

impl Gram {
    /// From the packed upper triangle `(0,0), (0,1), …, (0,k−1), (1,1), …, (k−1,k−1)`.
    pub(crate) fn from_upper(k: usize, upper: &[f64]) -> Self {
        debug_assert_eq!(upper.len(), k * (k + 1) / 2);
        let mut g = vec![0.0; k * k];
        let mut next = upper.iter();
        for i in 0..k {
            for j in i..k {
                let v = *next.next().expect("k(k+1)/2 values");
                g[i * k + j] = v;
                g[j * k + i] = v;
            }
        }
        Self { k, g }
    }

    /// The number of vectors.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// `xᵢ·xⱼ`.
    pub(crate) fn at(&self, i: usize, j: usize) -> f64 {
        self.g[i * self.k + j]
    }

    /// False exactly when an input holds a NaN or an infinity (the reductions cannot overflow).
    pub(crate) fn is_finite(&self) -> bool {
        self.g.iter().all(|v| v.is_finite())
    }

    /// `‖xᵢ‖`.
    pub(crate) fn norm(&self, i: usize) -> f64 {
        self.at(i, i).max(0.0).sqrt()
    }

    /// The two-vector statistics of the pair `(0, 1)`.
    pub(crate) fn pair(&self) -> PairStats {
        PairStats {
            aa: self.at(0, 0),
            bb: self.at(1, 1),
            ab: self.at(0, 1),
        }
    }
}

/// The Gram matrix of the unit directions `uᵢ = xᵢ/sᵢ` for the given scales `sᵢ`, over the
/// inputs `idx`: `Ĝ[a][b] = G[idx a][idx b]/(s_a·s_b)`.
struct Directions {
    g: Vec<f64>,
    k: usize,
}

impl Directions {
    fn new(gram: &Gram, idx: &[usize], scale: &[f64]) -> Self {
        let k = idx.len();
        let mut g = vec![0.0; k * k];
        for (a, &i) in idx.iter().enumerate() {
            for (b, &j) in idx.iter().enumerate() {
                g[a * k + b] = gram.at(i, j) / (scale[a] * scale[b]);
            }
        }
        Self { g, k }
    }

    /// `Ĝ·γ`: the dot products of `Σ γᵢuᵢ` with each `uⱼ`.
    fn times(&self, gamma: &[f64]) -> Vec<f64> {
        (0..self.k)
            .map(|a| (0..self.k).map(|b| self.g[a * self.k + b] * gamma[b]).sum())
            .collect()
    }

    /// `‖Σ γᵢuᵢ‖ = √(γᵀĜγ)`, clamped at 0 against rounding.
    fn length(&self, gamma: &[f64]) -> f64 {
        let q: f64 = self
            .times(gamma)
            .iter()
            .zip(gamma)
            .map(|(x, y)| x * y)
            .sum();
        q.max(0.0).sqrt()
    }
}

/// The coefficients one method computed for one vector (a tensor, or one of its rows), and
/// what it did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    /// One per input, in the inputs' order: the result is `Σ cᵢ·xᵢ` (of the task vectors,
    /// plus the base, where the method works on task vectors).
    pub(crate) coeffs: Vec<f64>,
    /// Which branch of the method's table was taken.
    pub(crate) branch: Branch,
    /// Iterative methods: the steps taken (0 otherwise).
    pub(crate) steps: usize,
    /// Iterative methods: the length of the last step, in radians (0 otherwise).
    pub(crate) residual: f64,
}

impl Outcome {
    fn direct(coeffs: Vec<f64>, branch: Branch) -> Self {
        Self {
            coeffs,
            branch,
            steps: 0,
            residual: 0.0,
        }
    }
}

/// Why a method gave no coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// An input holds a NaN or an infinity.
    NonFinite,
    /// mergekit's `multislerp` of more than two inputs whose weighted directions cancel: it
    /// raises an error there, and so does this.
    Cancelling,
}

/// The options of the exact weighted Karcher mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KarcherOptions {
    /// Step length, in radians, below which the iteration stops.
    pub(crate) tolerance: f64,
    /// Most steps.
    pub(crate) max_steps: usize,
    /// Norm at or below which an input counts as zero.
    pub(crate) eps: f64,
}

/// One member of the family of k inputs, with everything but its inputs. Two-input SLERP
/// (exact, or mergekit's `slerp`) is [`crate::numerics::coefficients`] of the pair's
/// statistics ([`Gram::pair`]), with its per-row policies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Rule {
    /// mergekit 0.1.5's `nuslerp` of two inputs at `t` (flattened).
    Nuslerp {
        /// The interpolation factor ([`nuslerp_t`] of the weights).
        t: f64,
    },
    /// The exact weighted Karcher mean (weights ≥ 0, normalised here).
    Karcher(KarcherOptions),
    /// mergekit 0.1.5's `karcher`: equal weights over every input.
    MergekitKarcher {
        /// Most iterations (mergekit's `max_iter`, 10 by default).
        max_iter: usize,
        /// mergekit's `tol` (1e-5 by default).
        tol: f64,
    },
    /// mergekit 0.1.5's `multislerp`.
    Multislerp {
        /// Whether the weights are divided by their sum first.
        normalize_weights: bool,
        /// Added to each norm (mergekit's `eps`, 1e-8 by default).
        eps: f64,
    },
    /// The weighted linear mean `Σ wᵢxᵢ / Σ wᵢ`.
    Linear,
}

impl Rule {
    /// The coefficients of one vector from its inputs' Gram matrix and the weights (one per
    /// input; [`Rule::Nuslerp`] and [`Rule::MergekitKarcher`] ignore them).
    pub(crate) fn coefficients(&self, gram: &Gram, weights: &[f64]) -> Result<Outcome, Refusal> {
        if !gram.is_finite() {
            return Err(Refusal::NonFinite);
        }
        match self {
            Rule::Nuslerp { t } => Ok(nuslerp(gram, *t)),
            Rule::Karcher(options) => Ok(karcher(gram, weights, options)),
            Rule::MergekitKarcher { max_iter, tol } => Ok(mergekit_karcher(gram, *max_iter, *tol)),
            Rule::Multislerp {
                normalize_weights,
                eps,
            } => multislerp(gram, weights, *normalize_weights, *eps),
            Rule::Linear => Ok(linear(weights, LerpReason::Method)),
        }
    }
}

/// `wᵢ / Σ w`: the weighted linear mean.
fn linear(weights: &[f64], reason: LerpReason) -> Outcome {
    let total: f64 = weights.iter().sum();
    Outcome::direct(
        weights.iter().map(|w| w / total).collect(),
        Branch::Lerp(reason),
    )
}

/// mergekit's `t` of `nuslerp` from the two weights: `w₂/(w₁ + w₂)`, or 0.5 when they sum to
/// less than 1e-6 in magnitude. A negative weight can put it outside [0, 1], where the
/// interpolation extrapolates, as mergekit's does.
pub(crate) fn nuslerp_t(w0: f64, w1: f64) -> f64 {
    let total = w0 + w1;
    if total.abs() < 1e-6 { 0.5 } else { w1 / total }
}

/// mergekit 0.1.5's `nuslerp` (flattened): norms clamped at 1e-7 (so a zero vector has cosine
/// 0 and angle π/2 with the other, giving `sin(tπ/2)·` the other), linear interpolation where
/// `1 − cos² ≤ 1e-16`, otherwise `sin((1−t)θ)/sin θ·x₀ + sin(tθ)/sin θ·x₁` with `θ = acos`.
fn nuslerp(gram: &Gram, t: f64) -> Outcome {
    const NORM_FLOOR: f64 = 1e-7;
    const EPS: f64 = 1e-8;
    let (n0, n1) = (gram.norm(0).max(NORM_FLOOR), gram.norm(1).max(NORM_FLOOR));
    let cos = (gram.at(0, 1) / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= EPS * EPS {
        return Outcome::direct(vec![1.0 - t, t], Branch::Lerp(LerpReason::DotThreshold));
    }
    let theta = cos.acos();
    let s = theta.sin();
    Outcome::direct(
        vec![((1.0 - t) * theta).sin() / s, (t * theta).sin() / s],
        Branch::Slerp,
    )
}

/// The weighted Karcher mean, iterated to convergence on the coefficients of the mean
/// direction `m = Σ γᵢuᵢ` (`uᵢ = xᵢ/‖xᵢ‖`): `cos θⱼ = (Ĝγ)ⱼ`, the tangent
/// `v = Σ wⱼ·θⱼ/sin θⱼ·(uⱼ − cos θⱼ·m)` is `Σ βᵢuᵢ` with `‖v‖² = βᵀĜβ`, and each step
/// `m ← cos‖v‖·m + sin‖v‖·v/‖v‖` is an update of γ. The result is `m` times the weighted mean
/// of the norms. Inputs of weight 0 take no part; a zero input, an input antipodal to the
/// mean, or weighted directions that cancel give the weighted linear mean.
fn karcher(gram: &Gram, weights: &[f64], options: &KarcherOptions) -> Outcome {
    let total: f64 = weights.iter().sum();
    let idx: Vec<usize> = (0..gram.k()).filter(|&i| weights[i] > 0.0).collect();
    let w: Vec<f64> = idx.iter().map(|&i| weights[i] / total).collect();
    let norms: Vec<f64> = idx.iter().map(|&i| gram.norm(i)).collect();
    if norms.iter().any(|n| *n <= options.eps) {
        return linear(weights, LerpReason::ZeroNorm);
    }
    let dirs = Directions::new(gram, &idx, &norms);
    // Start from the normalised weighted mean of the directions.
    let length = dirs.length(&w);
    if length <= 1e-3 {
        return linear(weights, LerpReason::Antiparallel);
    }
    let mut gamma: Vec<f64> = w.iter().map(|x| x / length).collect();
    let (mut steps, mut previous) = (0, f64::INFINITY);
    let residual = loop {
        let cos: Vec<f64> = dirs
            .times(&gamma)
            .iter()
            .map(|c| c.clamp(-1.0, 1.0))
            .collect();
        if cos.iter().any(|c| *c < -(1.0 - ANTIPARALLEL_MARGIN)) {
            return linear(weights, LerpReason::Antiparallel);
        }
        // α_j = w_j·θ_j/sin θ_j; v = Σ α_j u_j − (Σ α_j cos θ_j)·m.
        let alpha: Vec<f64> = cos
            .iter()
            .zip(&w)
            .map(|(c, w)| w / sinc(c.acos()))
            .collect();
        let along: f64 = alpha.iter().zip(&cos).map(|(a, c)| a * c).sum();
        let beta: Vec<f64> = alpha
            .iter()
            .zip(&gamma)
            .map(|(a, g)| a - along * g)
            .collect();
        let size = dirs.length(&beta);
        if size <= options.tolerance || size >= previous || steps >= options.max_steps {
            break size;
        }
        previous = size;
        steps += 1;
        let (c, s) = (size.cos(), sinc(size));
        let next: Vec<f64> = gamma
            .iter()
            .zip(&beta)
            .map(|(g, b)| c * g + s * b)
            .collect();
        let length = dirs.length(&next);
        gamma = next.iter().map(|x| x / length).collect();
    };
    let norm_mean: f64 = w.iter().zip(&norms).map(|(w, n)| w * n).sum();
    let mut coeffs = vec![0.0; gram.k()];
    for (a, &i) in idx.iter().enumerate() {
        coeffs[i] = norm_mean * gamma[a] / norms[a];
    }
    Outcome {
        coeffs,
        branch: Branch::Slerp,
        steps,
        residual,
    }
}

/// mergekit 0.1.5's `karcher`, step for step on the coefficients: equal weights `1/k` over
/// every input; inputs with norm ≤ `tol` dropped (all of them: the zero tensor); the start
/// is the normalised mean of the directions (the first direction when that mean is shorter
/// than `tol`); in each of at most `max_iter` steps an input with `acos(cos) < tol` is
/// skipped, and the iteration stops once the tangent is shorter than `tol`; the result is the
/// mean direction times `Σ ‖xᵢ‖/k` (zero inputs counting 0).
fn mergekit_karcher(gram: &Gram, max_iter: usize, tol: f64) -> Outcome {
    let k = gram.k();
    let all: Vec<f64> = (0..k).map(|i| gram.norm(i)).collect();
    let idx: Vec<usize> = (0..k).filter(|&i| all[i] > tol).collect();
    if idx.is_empty() {
        return Outcome::direct(vec![0.0; k], Branch::Lerp(LerpReason::ZeroNorm));
    }
    let norms: Vec<f64> = idx.iter().map(|&i| all[i]).collect();
    let alpha = 1.0 / idx.len() as f64;
    let dirs = Directions::new(gram, &idx, &norms);
    let start = vec![alpha; idx.len()];
    let length = dirs.length(&start);
    let mut gamma = if length < tol {
        let mut first = vec![0.0; idx.len()];
        first[0] = 1.0;
        first
    } else {
        start.iter().map(|g| g / length).collect()
    };
    let (mut steps, mut residual) = (0, 0.0);
    for _ in 0..max_iter {
        let cos = dirs.times(&gamma);
        let mut beta = vec![0.0; idx.len()];
        for (j, c) in cos.iter().enumerate() {
            let dot = c.clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let f = alpha * theta / theta.sin();
            beta[j] += f;
            for (b, g) in beta.iter_mut().zip(&gamma) {
                *b -= f * dot * g;
            }
        }
        let size = dirs.length(&beta);
        residual = size;
        if size < tol {
            break;
        }
        steps += 1;
        let (c, s) = (size.cos(), size.sin() / size);
        gamma = gamma
            .iter()
            .zip(&beta)
            .map(|(g, b)| c * g + s * b)
            .collect();
        let unit = dirs.length(&gamma);
        if unit > tol {
            gamma.iter_mut().for_each(|g| *g /= unit);
        }
    }
    let scale: f64 = all.iter().map(|n| n / k as f64).sum();
    let mut coeffs = vec![0.0; k];
    for (a, &i) in idx.iter().enumerate() {
        coeffs[i] = scale * gamma[a] / norms[a];
    }
    Outcome {
        coeffs,
        branch: Branch::Slerp,
        steps,
        residual,
    }
}

/// mergekit 0.1.5's `multislerp`, as what it computes: its tangent step
/// `v = Σ wᵢ(uᵢ − (uᵢ·m)m)` is exactly `M − ‖M‖·m = 0` for `m = M/‖M‖`, `M = Σ wᵢuᵢ`,
/// `uᵢ = xᵢ/(‖xᵢ‖ + eps)`, so the result is `m·cos(eps)·Σ wᵢ‖xᵢ‖`: a normalised weighted
/// linear mean of the directions, scaled by the weighted mean of the norms. One input is
/// returned as it is; when `‖M‖ < eps`, two inputs give the weighted sum and more are refused,
/// unless every input is zero (where mergekit raises as well): then the result is zero.
fn multislerp(
    gram: &Gram,
    weights: &[f64],
    normalize_weights: bool,
    eps: f64,
) -> Result<Outcome, Refusal> {
    let k = gram.k();
    if k == 1 {
        return Ok(Outcome::direct(vec![1.0], Branch::Slerp));
    }
    let total: f64 = weights.iter().sum();
    let w: Vec<f64> = if normalize_weights {
        weights.iter().map(|w| w / total).collect()
    } else {
        weights.to_vec()
    };
    let norms: Vec<f64> = (0..k).map(|i| gram.norm(i)).collect();
    let idx: Vec<usize> = (0..k).collect();
    let scale: Vec<f64> = norms.iter().map(|n| n + eps).collect();
    let dirs = Directions::new(gram, &idx, &scale);
    let length = dirs.length(&w);
    if length < eps {
        if k == 2 {
            return Ok(Outcome::direct(w, Branch::Lerp(LerpReason::Antiparallel)));
        }
        // Where every input is zero (a bias initialised to zero and never trained, say)
        // mergekit raises too; the mean of zeros is zero.
        if norms.iter().all(|n| *n == 0.0) {
            return Ok(Outcome::direct(w, Branch::Lerp(LerpReason::ZeroNorm)));
        }
        return Err(Refusal::Cancelling);
    }
    let avg: f64 = w.iter().zip(&norms).map(|(w, n)| w * n).sum();
    let factor = eps.cos() * avg / length;
    let coeffs = w.iter().zip(&scale).map(|(w, s)| factor * w / s).collect();
    Ok(Outcome::direct(coeffs, Branch::Slerp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram(xs: &[&[f64]]) -> Gram {
        let k = xs.len();
        let mut upper = Vec::new();
        for i in 0..k {
            for j in i..k {
                upper.push(xs[i].iter().zip(xs[j]).map(|(a, b)| a * b).sum());
            }
        }
        Gram::from_upper(k, &upper)
    }

    fn combine(coeffs: &[f64], xs: &[&[f64]]) -> Vec<f64> {
        (0..xs[0].len())
            .map(|e| coeffs.iter().zip(xs).map(|(c, x)| c * x[e]).sum())
            .collect()
    }

    fn norm(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    fn unit(x: &[f64]) -> Vec<f64> {
        let n = norm(x);
        x.iter().map(|v| v / n).collect()
    }

    fn dot(x: &[f64], y: &[f64]) -> f64 {
        x.iter().zip(y).map(|(a, b)| a * b).sum()
    }

    const EXACT: KarcherOptions = KarcherOptions {
        tolerance: 1e-13,
        max_steps: 1000,
        eps: 1e-8,
    };

    /// The Karcher mean iterated on the vectors themselves, in f64.
    fn karcher_on_vectors(xs: &[&[f64]], w: &[f64]) -> Vec<f64> {
        let total: f64 = w.iter().sum();
        let units: Vec<Vec<f64>> = xs.iter().map(|x| unit(x)).collect();
        let n = xs[0].len();
        let mut m = vec![0.0; n];
        for (u, w) in units.iter().zip(w) {
            for e in 0..n {
                m[e] += w / total * u[e];
            }
        }
        m = unit(&m);
        for _ in 0..200 {
            let mut v = vec![0.0; n];
            for (u, w) in units.iter().zip(w) {
                let c = dot(&m, u).clamp(-1.0, 1.0);
                let theta = c.acos();
                let f = if theta < 1e-300 {
                    1.0
                } else {
                    theta / theta.sin()
                };
                for e in 0..n {
                    v[e] += w / total * f * (u[e] - c * m[e]);
                }
            }
            let s = norm(&v);
            if s < 1e-15 {
                break;
            }
            for e in 0..n {
                m[e] = s.cos() * m[e] + s.sin() / s * v[e];
            }
            m = unit(&m);
        }
        let scale: f64 = xs.iter().zip(w).map(|(x, w)| w / total * norm(x)).sum();
        m.iter().map(|v| v * scale).collect()
    }

    fn close(got: &[f64], want: &[f64], tol: f64) {
        let err: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let rel = err.sqrt() / norm(want);
        assert!(rel <= tol, "relative error {rel:e}: {got:?} vs {want:?}");
    }

    #[test]
    fn karcher_of_three_spread_vectors_matches_the_iteration_on_vectors() {
        let (a, b, c) = (
            [1.0, 0.2, -0.3, 0.5],
            [0.1, 1.5, 0.4, -0.2],
            [-0.2, 0.3, 2.0, 0.1],
        );
        let xs: [&[f64]; 3] = [&a, &b, &c];
        let w = [0.5, 0.3, 0.2];
        let out = karcher(&gram(&xs), &w, &EXACT);
        assert_eq!(out.branch, Branch::Slerp);
        assert!(out.steps > 2 && out.residual < 1e-12, "{out:?}");
        close(
            &combine(&out.coeffs, &xs),
            &karcher_on_vectors(&xs, &w),
            1e-12,
        );
        // The Karcher condition: Σ wᵢ log_m(uᵢ) = 0 at the result.
        let m = unit(&combine(&out.coeffs, &xs));
        let mut v = [0.0; 4];
        for (x, w) in xs.iter().zip(w) {
            let u = unit(x);
            let c = dot(&m, &u);
            let theta = c.acos();
            for e in 0..4 {
                v[e] += w * theta / theta.sin() * (u[e] - c * m[e]);
            }
        }
        assert!(norm(&v) < 1e-12, "{v:?}");
    }

    #[test]
    fn karcher_of_two_equal_norm_vectors_is_slerp() {
        let (a, b) = ([3.0, 0.0, 0.0], [0.0, 3.0, 0.0]);
        let t: f64 = 0.3;
        let out = karcher(&gram(&[&a, &b]), &[1.0 - t, t], &EXACT);
        let half_pi = std::f64::consts::FRAC_PI_2;
        let want = [3.0 * (t * half_pi).cos(), 3.0 * (t * half_pi).sin(), 0.0];
        close(&combine(&out.coeffs, &[&a, &b]), &want, 1e-13);
    }

    #[test]
    fn karcher_falls_back_to_the_linear_mean() {
        let (a, b) = ([1.0, 2.0], [0.0, 0.0]);
        let out = karcher(&gram(&[&a, &b]), &[1.0, 3.0], &EXACT);
        assert_eq!(out.branch, Branch::Lerp(LerpReason::ZeroNorm));
        assert_eq!(out.coeffs, vec![0.25, 0.75]);
        let (a, b) = ([1.0, 2.0], [-1.0, -2.0]);
        let out = karcher(&gram(&[&a, &b]), &[1.0, 1.0], &EXACT);
        assert_eq!(out.branch, Branch::Lerp(LerpReason::Antiparallel));
        // A zero weight takes no part: the mean of one input is that input.
        let out = karcher(&gram(&[&a, &[5.0, 1.0]]), &[2.0, 0.0], &EXACT);
        close(&combine(&out.coeffs, &[&a, &[5.0, 1.0]]), &a, 1e-15);
    }

    #[test]
    fn multislerp_is_the_normalised_weighted_mean_of_directions() {
        let (a, b, c) = ([1.0, 0.2, -0.3], [0.1, 1.5, 0.4], [-0.2, 0.3, 2.0]);
        let xs: [&[f64]; 3] = [&a, &b, &c];
        let w = [2.0, 1.0, 1.0];
        let eps = 1e-8;
        let out = multislerp(&gram(&xs), &w, true, eps).unwrap();
        // mergekit's formula, written out.
        let wn: Vec<f64> = w.iter().map(|x| x / 4.0).collect();
        let mut mean = [0.0; 3];
        for (x, w) in xs.iter().zip(&wn) {
            let n = norm(x);
            for e in 0..3 {
                mean[e] += w * x[e] / (n + eps);
            }
        }
        let m = unit(&mean);
        let avg: f64 = xs.iter().zip(&wn).map(|(x, w)| w * norm(x)).sum();
        let want: Vec<f64> = m.iter().map(|v| v * eps.cos() * avg).collect();
        close(&combine(&out.coeffs, &xs), &want, 1e-15);
        // Unnormalised weights scale the norms' mean.
        let out = multislerp(&gram(&xs), &w, false, eps).unwrap();
        let got = combine(&out.coeffs, &xs);
        assert!((norm(&got) - 4.0 * avg).abs() < 1e-12);
    }

    #[test]
    fn multislerp_cancelling_directions() {
        let (a, b, c) = ([1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]);
        let out = multislerp(&gram(&[&a, &b]), &[1.0, 1.0], true, 1e-8).unwrap();
        assert_eq!(out.coeffs, vec![0.5, 0.5]);
        assert_eq!(
            multislerp(&gram(&[&a, &b, &c]), &[1.0, 1.0, 0.0], true, 1e-8),
            Err(Refusal::Cancelling)
        );
        let zeros = multislerp(
            &gram(&[&[0.0, 0.0], &[0.0, 0.0], &[0.0, 0.0]]),
            &[1.0; 3],
            true,
            1e-8,
        );
        assert_eq!(zeros.unwrap().branch, Branch::Lerp(LerpReason::ZeroNorm));
        let one = multislerp(&gram(&[&c]), &[0.3], true, 1e-8).unwrap();
        assert_eq!(one.coeffs, vec![1.0]);
    }

    #[test]
    fn nuslerp_follows_mergekit() {
        let (a, b) = ([0.0, 0.0, 0.0], [3.0, 4.0, 0.0]);
        // A zero vector: norm clamped at 1e-7, cos 0, θ = π/2: sin(tπ/2)·b.
        let out = nuslerp(&gram(&[&a, &b]), 0.5);
        assert!((out.coeffs[1] - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-15);
        // Colinear: lerp.
        let out = nuslerp(&gram(&[&b, &[6.0, 8.0, 0.0]]), 0.25);
        assert_eq!(out.coeffs, vec![0.75, 0.25]);
        assert_eq!(out.branch, Branch::Lerp(LerpReason::DotThreshold));
        // Otherwise sin((1−t)θ)/sin θ, sin(tθ)/sin θ with θ = acos.
        let (x, y) = ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0]);
        let out = nuslerp(&gram(&[&x, &y]), 0.3);
        let theta = std::f64::consts::FRAC_PI_4;
        let s = theta.sin();
        assert!((out.coeffs[0] - (0.7 * theta).sin() / s).abs() < 1e-15);
        assert!((out.coeffs[1] - (0.3 * theta).sin() / s).abs() < 1e-15);
        assert_eq!(nuslerp_t(1.0, 3.0), 0.75);
        assert_eq!(nuslerp_t(1.0, -1.0), 0.5);
        assert_eq!(nuslerp_t(-1.0, 2.0), 2.0);
    }

    #[test]
    fn mergekit_karcher_follows_its_loop() {
        // Written out as mergekit's loop over vectors, equal weights.
        let (a, b, c) = ([1.0, 0.2, -0.3], [0.1, 1.5, 0.4], [0.0, 0.0, 0.0]);
        let xs: [&[f64]; 3] = [&a, &b, &c];
        let (max_iter, tol) = (10, 1e-5);
        let out = mergekit_karcher(&gram(&xs), max_iter, tol);
        let valid: Vec<Vec<f64>> = [&a, &b].iter().map(|x| unit(*x)).collect();
        let alpha = 0.5;
        let mut m = unit(&[
            alpha * (valid[0][0] + valid[1][0]),
            alpha * (valid[0][1] + valid[1][1]),
            alpha * (valid[0][2] + valid[1][2]),
        ]);
        for _ in 0..max_iter {
            let mut v = [0.0; 3];
            for u in &valid {
                let d = dot(&m, u).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < tol {
                    continue;
                }
                for e in 0..3 {
                    v[e] += alpha * th / th.sin() * (u[e] - d * m[e]);
                }
            }
            let s = norm(&v);
            if s < tol {
                break;
            }
            for e in 0..3 {
                m[e] = s.cos() * m[e] + s.sin() * v[e] / s;
            }
            m = unit(&m);
        }
        let scale = (norm(&a) + norm(&b)) / 3.0;
        let want: Vec<f64> = m.iter().map(|v| v * scale).collect();
        close(&combine(&out.coeffs, &xs), &want, 1e-14);
        assert_eq!(out.coeffs[2], 0.0);
    }

    #[test]
    fn fine_tunes_with_a_nearly_singular_gram_matrix() {
        // Cosines of about 0.999999: the Gram matrix is nearly rank one.
        let n = 64;
        let base: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.7).sin()).collect();
        let xs: Vec<Vec<f64>> = (0..3)
            .map(|k| {
                base.iter()
                    .enumerate()
                    .map(|(i, v)| v + 1e-3 * (((i * (k + 3)) as f64) * 1.3).cos())
                    .collect()
            })
            .collect();
        let refs: Vec<&[f64]> = xs.iter().map(Vec::as_slice).collect();
        let w = [0.2, 0.5, 0.3];
        let out = karcher(&gram(&refs), &w, &EXACT);
        close(
            &combine(&out.coeffs, &refs),
            &karcher_on_vectors(&refs, &w),
            1e-12,
        );
    }
}
