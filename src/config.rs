//! What a merge computes: [`SlerpConfig`], [`Granularity`] and [`Method`].

use burn::config::Config;

use crate::MergeError;

/// How a tensor is split into the vectors that are interpolated.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// The whole tensor is one flat vector: one angle per tensor (the default, as in the
    /// original Python `SLERPModelMerger`).
    Tensor,
    /// Each slice along the first axis, as the tensor is stored, is its own vector: one angle
    /// per row. Burn's `Linear` stores its weight as `[d_input, d_output]`, so on an in-memory
    /// `Linear` a row is an input feature (in PyTorch-layout files a row is an output neuron);
    /// convolution weights are `[out, in, k…]` in both. A 1-D tensor is `n` one-element rows,
    /// which is exactly linear interpolation.
    Row,
}

/// The interpolation applied to each pair of vectors.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Method {
    /// Spherical linear interpolation (the default).
    Slerp,
    /// Linear interpolation `(1 − t)·a + t·b`: the baseline, with the same pairing, checks and
    /// finiteness test as [`Method::Slerp`].
    Lerp,
}

/// Configuration of a SLERP merge.
///
/// Build it with [`SlerpConfig::new`] and the `with_*` setters; it serializes to JSON with
/// Burn's [`Config`] trait (`save`/`load`), so a merge can be recorded and replayed.
///
/// ```
/// use burn_slerp::{Granularity, Method, SlerpConfig};
///
/// let config = SlerpConfig::new(0.3)
///     .with_granularity(Granularity::Row)
///     .with_dot_threshold(Some(0.9995))
///     .with_method(Method::Slerp);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct SlerpConfig {
    /// Interpolation factor, in [0, 1]: 0 gives model `a`, 1 gives model `b`.
    pub t: f64,
    /// Whole-tensor (default) or per-row interpolation.
    #[config(default = "Granularity::Tensor")]
    pub granularity: Granularity,
    /// `None` (default): exact SLERP, continuous down to identical tensors, no threshold.
    /// `Some(x)`, `x` finite in (0, 1]: mergekit-compatible, linear interpolation whenever
    /// `|cos θ| > x` (mergekit uses 0.9995).
    pub dot_threshold: Option<f64>,
    /// Norm below which a tensor counts as zero and the pair is linearly interpolated.
    /// Finite and ≥ 0; default 1e-8.
    #[config(default = 1e-8)]
    pub eps: f64,
    /// SLERP (default) or the linear baseline.
    #[config(default = "Method::Slerp")]
    pub method: Method,
}

impl SlerpConfig {
    /// Checks every field against its range.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] when `t` is not a finite number in [0, 1];
    /// [`MergeError::InvalidConfig`] when `eps` is negative or not finite, or `dot_threshold`
    /// is not finite or outside (0, 1].
    pub fn validate(&self) -> Result<(), MergeError> {
        if !(self.t.is_finite() && (0.0..=1.0).contains(&self.t)) {
            return Err(MergeError::InvalidT { t: self.t });
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(MergeError::InvalidConfig {
                field: "eps",
                value: self.eps,
            });
        }
        if let Some(threshold) = self.dot_threshold
            && !(threshold.is_finite() && threshold > 0.0 && threshold <= 1.0)
        {
            return Err(MergeError::InvalidConfig {
                field: "dot_threshold",
                value: threshold,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_exact_slerp_per_tensor() {
        let c = SlerpConfig::new(0.5);
        assert_eq!(c.granularity, Granularity::Tensor);
        assert_eq!(c.dot_threshold, None);
        assert_eq!(c.eps, 1e-8);
        assert_eq!(c.method, Method::Slerp);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn json_round_trip_is_bit_exact() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let file =
            std::env::temp_dir().join(format!("burn-slerp-config-{}.json", std::process::id()));
        for i in 0..500 {
            let config = SlerpConfig::new(rng.random::<f64>())
                .with_eps(rng.random::<f64>() * 10f64.powi(-rng.random_range(0..20)))
                .with_dot_threshold((i % 3 != 0).then(|| 1.0 - rng.random::<f64>() * 1e-3))
                .with_granularity(if i % 2 == 0 {
                    Granularity::Tensor
                } else {
                    Granularity::Row
                })
                .with_method(if i % 5 == 0 {
                    Method::Lerp
                } else {
                    Method::Slerp
                });
            config.save(&file).unwrap();
            let loaded = SlerpConfig::load(&file).unwrap();
            assert_eq!(loaded.t.to_bits(), config.t.to_bits());
            assert_eq!(loaded.eps.to_bits(), config.eps.to_bits());
            assert_eq!(
                loaded.dot_threshold.map(f64::to_bits),
                config.dot_threshold.map(f64::to_bits)
            );
            assert_eq!(loaded, config);
        }
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn ranges_are_enforced() {
        for t in [f64::NAN, f64::INFINITY, -f64::INFINITY, -1e-12, 1.0 + 1e-12] {
            assert!(matches!(
                SlerpConfig::new(t).validate(),
                Err(MergeError::InvalidT { t: bad }) if bad.to_bits() == t.to_bits()
            ));
        }
        for t in [0.0, 1.0, 0.25] {
            assert!(SlerpConfig::new(t).validate().is_ok());
        }
        for eps in [-1e-30, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                SlerpConfig::new(0.5).with_eps(eps).validate(),
                Err(MergeError::InvalidConfig { field: "eps", .. })
            ));
        }
        assert!(SlerpConfig::new(0.5).with_eps(0.0).validate().is_ok());
        for th in [0.0, -0.5, 1.0 + 1e-9, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                SlerpConfig::new(0.5)
                    .with_dot_threshold(Some(th))
                    .validate(),
                Err(MergeError::InvalidConfig {
                    field: "dot_threshold",
                    ..
                })
            ));
        }
        for th in [1e-9, 0.9995, 1.0] {
            assert!(
                SlerpConfig::new(0.5)
                    .with_dot_threshold(Some(th))
                    .validate()
                    .is_ok()
            );
        }
    }
}
