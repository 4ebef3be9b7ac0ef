//! The numbers of the numerics contract, apart from any tensor: the statistics of one pair of
//! vectors ([`PairStats`]), the coefficients computed from them ([`Coefficients`]), the branch
//! of the policy table taken ([`Branch`]) and the constants that decide it.
//!
//! Everything here is host arithmetic in f64; the kernels for the CubeCL devices evaluate the
//! same formulas on the device, with the same constants.

use serde::Serialize;

use crate::config::{Method, SlerpConfig, ZeroNorm};

/// `cos θ` below `-(1 - ANTIPARALLEL_MARGIN)` counts as antiparallel: the geodesic is undefined at
/// π, so the pair is linearly interpolated. The spherical mean uses the same margin for a model
/// antipodal to the mean.
pub(crate) const ANTIPARALLEL_MARGIN: f64 = 5e-4;

/// Below `SINC_SERIES` in magnitude, [`sinc`] takes its Taylor series.
const SINC_SERIES: f64 = 1e-3;

/// Why a pair of vectors was linearly interpolated instead of spherically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum LerpReason {
    /// `‖a‖ ≤ eps` or `‖b‖ ≤ eps`: a zero tensor has no direction.
    ZeroNorm,
    /// `cos θ < −(1 − 5e-4)`: the geodesic is undefined at π.
    Antiparallel,
    /// mergekit-compatible mode and `|cos θ| > dot_threshold`.
    DotThreshold,
    /// [`Method::Lerp`] was asked for, or the rows have one element.
    Method,
}

/// Which row of the numerics table a pair of vectors fell in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Branch {
    /// Spherical interpolation (which tends to lerp as θ → 0, with no threshold).
    Slerp,
    /// Linear interpolation, and why.
    Lerp(LerpReason),
}

impl Branch {
    /// Every branch, in the order of their codes.
    const BY_CODE: [Branch; 5] = [
        Branch::Slerp,
        Branch::Lerp(LerpReason::ZeroNorm),
        Branch::Lerp(LerpReason::Antiparallel),
        Branch::Lerp(LerpReason::DotThreshold),
        Branch::Lerp(LerpReason::Method),
    ];

    /// The number a device kernel writes for this branch (0 for [`Branch::Slerp`]).
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) const fn code(self) -> u32 {
        match self {
            Branch::Slerp => 0,
            Branch::Lerp(LerpReason::ZeroNorm) => 1,
            Branch::Lerp(LerpReason::Antiparallel) => 2,
            Branch::Lerp(LerpReason::DotThreshold) => 3,
            Branch::Lerp(LerpReason::Method) => 4,
        }
    }

    /// The branch a code stands for; unknown codes read as [`Branch::Slerp`].
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) fn from_code(code: u32) -> Self {
        Self::BY_CODE
            .get(code as usize)
            .copied()
            .unwrap_or(Branch::Slerp)
    }
}

/// Squared norms and dot product of one pair of vectors, in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PairStats {
    /// `‖a‖²`.
    pub(crate) aa: f64,
    /// `‖b‖²`.
    pub(crate) bb: f64,
    /// `a·b`.
    pub(crate) ab: f64,
}

impl PairStats {
    /// Whether every statistic is finite: false exactly when `a` or `b` holds a NaN or an
    /// infinity (the reductions cannot overflow).
    pub(crate) fn is_finite(&self) -> bool {
        self.aa.is_finite() && self.bb.is_finite() && self.ab.is_finite()
    }

    /// Decodes a flat `[aa, bb, ab, aa, bb, ab, …]` buffer, one triple per row.
    pub(crate) fn triples(values: &[f64]) -> Vec<Self> {
        values
            .chunks_exact(3)
            .map(|v| Self {
                aa: v[0],
                bb: v[1],
                ab: v[2],
            })
            .collect()
    }

    /// The statistics of two disjoint parts taken together.
    pub(crate) fn add(self, other: Self) -> Self {
        Self {
            aa: self.aa + other.aa,
            bb: self.bb + other.bb,
            ab: self.ab + other.ab,
        }
    }
}

/// `out = c0·a + c1·b` for one pair, and the branch that gave the coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Coefficients {
    pub(crate) c0: f64,
    pub(crate) c1: f64,
    pub(crate) branch: Branch,
}

impl Coefficients {
    /// Linear interpolation at `t`, for `reason`.
    pub(crate) fn lerp(t: f64, reason: LerpReason) -> Self {
        Self {
            c0: 1.0 - t,
            c1: t,
            branch: Branch::Lerp(reason),
        }
    }
}

/// The cosine and angle of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Angle {
    pub(crate) cos: f64,
    /// θ in radians, in [0, π].
    pub(crate) theta: f64,
}

/// `sin(x)/x`, with its Taylor series near 0 so that it is exact to f64 rounding everywhere.
pub(crate) fn sinc(x: f64) -> f64 {
    if x.abs() < SINC_SERIES {
        let x2 = x * x;
        1.0 - x2 / 6.0 + x2 * x2 / 120.0
    } else {
        x.sin() / x
    }
}

/// The cosine and angle of one pair; `None` when a norm is 0.
///
/// θ = 2·atan2(‖â − b̂‖, ‖â + b̂‖), with ‖â ∓ b̂‖² = 2 ∓ 2·cos: accurate for small angles, where
/// `acos(cos)` is not.
pub(crate) fn angle(stats: PairStats) -> Option<Angle> {
    let (na, nb) = (stats.aa.sqrt(), stats.bb.sqrt());
    if na == 0.0 || nb == 0.0 {
        return None;
    }
    let cos = (stats.ab / (na * nb)).clamp(-1.0, 1.0);
    let theta = 2.0
        * (2.0 - 2.0 * cos)
            .max(0.0)
            .sqrt()
            .atan2((2.0 + 2.0 * cos).max(0.0).sqrt());
    Some(Angle { cos, theta })
}

/// The coefficients of one pair, from its statistics, at the configuration's `t`; `None` when
/// a statistic is not finite (which happens exactly when `a` or `b` holds a NaN or an infinity).
pub(crate) fn coefficients(stats: PairStats, config: &SlerpConfig) -> Option<Coefficients> {
    if !stats.is_finite() {
        return None;
    }
    let t = config.t;
    if config.method == Method::Lerp {
        return Some(Coefficients::lerp(t, LerpReason::Method));
    }
    let (na, nb) = (stats.aa.sqrt(), stats.bb.sqrt());
    let zero = na <= config.eps || nb <= config.eps;
    if zero && config.zero_norm == ZeroNorm::Lerp {
        return Some(Coefficients::lerp(t, LerpReason::ZeroNorm));
    }
    let Angle { cos, theta } = if zero {
        // mergekit's rule: a zero norm counts as 1.
        let one = |n: f64| if n <= config.eps { 1.0 } else { n };
        let cos = (stats.ab / (one(na) * one(nb))).clamp(-1.0, 1.0);
        Angle {
            cos,
            theta: cos.acos(),
        }
    } else {
        angle(stats)?
    };
    if let Some(threshold) = config.dot_threshold
        && cos.abs() > threshold
    {
        return Some(Coefficients::lerp(t, LerpReason::DotThreshold));
    }
    if cos < -(1.0 - ANTIPARALLEL_MARGIN) {
        return Some(Coefficients::lerp(t, LerpReason::Antiparallel));
    }
    let s = sinc(theta);
    Some(Coefficients {
        c0: (1.0 - t) * sinc((1.0 - t) * theta) / s,
        c1: t * sinc(t * theta) / s,
        branch: Branch::Slerp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(a: &[f64], b: &[f64]) -> PairStats {
        PairStats {
            aa: a.iter().map(|x| x * x).sum(),
            bb: b.iter().map(|x| x * x).sum(),
            ab: a.iter().zip(b).map(|(x, y)| x * y).sum(),
        }
    }

    #[test]
    fn orthogonal_unit_vectors_follow_the_quarter_circle() {
        for t in [0.1, 0.25, 0.5, 0.9] {
            let c = coefficients(stats(&[1.0, 0.0], &[0.0, 1.0]), &SlerpConfig::new(t)).unwrap();
            let half_pi = std::f64::consts::FRAC_PI_2;
            assert!((c.c0 - (t * half_pi).cos()).abs() < 1e-14);
            assert!((c.c1 - (t * half_pi).sin()).abs() < 1e-14);
            assert_eq!(c.branch, Branch::Slerp);
        }
    }

    #[test]
    fn a_zero_tensor_follows_the_zero_norm_rule() {
        let (a, b) = ([0.0, 0.0], [3.0, 4.0]);
        for t in [0.25, 0.5, 0.8] {
            let lerp = coefficients(stats(&a, &b), &SlerpConfig::new(t)).unwrap();
            assert_eq!(
                (lerp.c1, lerp.branch),
                (t, Branch::Lerp(LerpReason::ZeroNorm))
            );
            // mergekit's rule: the norm counts as 1, cos = 0, θ = π/2: c1 = sin(tπ/2).
            let config = SlerpConfig::new(t)
                .with_dot_threshold(Some(0.9995))
                .with_zero_norm(ZeroNorm::Mergekit);
            let c = coefficients(stats(&a, &b), &config).unwrap();
            let want = (t * std::f64::consts::FRAC_PI_2).sin();
            assert!((c.c1 - want).abs() < 1e-15, "t = {t}: {} vs {want}", c.c1);
        }
    }

    #[test]
    fn identical_vectors_give_lerp_without_a_threshold() {
        let c = coefficients(stats(&[3.0, 4.0], &[3.0, 4.0]), &SlerpConfig::new(0.3)).unwrap();
        assert_eq!(c.branch, Branch::Slerp);
        assert!((c.c0 - 0.7).abs() < 1e-15 && (c.c1 - 0.3).abs() < 1e-15);
    }

    #[test]
    fn coefficients_are_continuous_as_the_angle_vanishes() {
        // A tiny angle: the coefficients must be within O(θ²) of lerp, with no jump.
        let theta: f64 = 1e-6;
        let s = stats(&[1.0, 0.0], &[theta.cos(), theta.sin()]);
        let c = coefficients(s, &SlerpConfig::new(0.5)).unwrap();
        assert!((c.c0 - 0.5).abs() < 1e-12 && (c.c1 - 0.5).abs() < 1e-12);
        // Exact value: sin(θ/2)/sin(θ) = 1/(2 cos(θ/2)).
        let exact = 1.0 / (2.0 * (theta / 2.0).cos());
        assert!((c.c0 - exact).abs() < 1e-15);
    }

    #[test]
    fn branches_follow_the_table() {
        let cfg = SlerpConfig::new(0.4);
        let zero = coefficients(stats(&[0.0, 0.0], &[1.0, 2.0]), &cfg).unwrap();
        assert_eq!(zero.branch, Branch::Lerp(LerpReason::ZeroNorm));
        let anti = coefficients(stats(&[1.0, 2.0], &[-2.0, -4.0]), &cfg).unwrap();
        assert_eq!(anti.branch, Branch::Lerp(LerpReason::Antiparallel));
        let close = stats(&[1.0, 0.0], &[1.0, 0.02]);
        let mk = cfg.clone().with_dot_threshold(Some(0.9995));
        assert_eq!(
            coefficients(close, &mk).unwrap().branch,
            Branch::Lerp(LerpReason::DotThreshold)
        );
        assert_eq!(coefficients(close, &cfg).unwrap().branch, Branch::Slerp);
        let lerp = cfg.clone().with_method(Method::Lerp);
        let c = coefficients(stats(&[1.0, 0.0], &[0.0, 1.0]), &lerp).unwrap();
        assert_eq!((c.c0, c.c1), (1.0 - 0.4, 0.4));
        let nan = PairStats {
            aa: f64::NAN,
            ..PairStats::default()
        };
        assert!(coefficients(nan, &cfg).is_none());
    }

    #[test]
    fn branch_codes_round_trip() {
        for branch in Branch::BY_CODE {
            assert_eq!(Branch::from_code(branch.code()), branch);
        }
        assert_eq!(Branch::from_code(99), Branch::Slerp);
    }

    #[test]
    fn the_angle_comes_from_the_statistics() {
        for theta in [1e-3f64, 0.5, 2.0, 3.0] {
            let a = angle(stats(&[2.0, 0.0], &[3.0 * theta.cos(), 3.0 * theta.sin()])).unwrap();
            assert!(
                (a.theta - theta).abs() < 1e-9 * theta,
                "{theta}: {}",
                a.theta
            );
            assert!((a.cos - theta.cos()).abs() < 1e-15);
        }
        assert!(angle(stats(&[0.0, 0.0], &[1.0, 0.0])).is_none());
    }
}
