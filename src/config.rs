//! What a merge computes: [`SlerpConfig`], [`Granularity`] and [`Method`].

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::error::MergeError;
use crate::schedule::Schedule;

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

/// What a pair does when a vector's norm is at most `eps` (a zero vector).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ZeroNorm {
    /// Linear interpolation (the default): the geodesic is undefined there.
    Lerp,
    /// As mergekit 0.1.5 does: the zero norm counts as 1, so the vector is left as it is, the
    /// cosine is (nearly) 0 and the angle π/2, and a zero tensor against a non-zero `b` gives
    /// `sin(tπ/2)·b` (0.707·b at t = 0.5). For reproducing mergekit only.
    Mergekit,
}

/// Configuration of a SLERP merge: a recipe.
///
/// Build it with [`SlerpConfig::new`] and the `with_*` setters. It is a Burn [`Config`]
/// (`save`/`load` as JSON), so a merge can be recorded and replayed bit for bit; a hand-written
/// recipe may leave out every field that has a default (`{"t": 0.5}` is a whole recipe), and a
/// field the recipe does not know is an error rather than silently ignored.
///
/// ```
/// use burn_slerp::{Granularity, Method, Schedule, SlerpConfig};
///
/// let config = SlerpConfig::new(0.3)
///     .with_granularity(Granularity::Row)
///     .with_dot_threshold(Some(0.9995))
///     .with_method(Method::Slerp)
///     .with_schedule(Some(Schedule::new().with_rule("**.attn.**", vec![0.0, 1.0].into())));
/// assert!(config.validate().is_ok());
///
/// let recipe: SlerpConfig = serde_json::from_str(r#"{"t": 0.5}"#).unwrap();
/// assert_eq!(recipe, SlerpConfig::new(0.5));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlerpConfig {
    /// Interpolation factor, in [0, 1]: 0 gives model `a`, 1 gives model `b`. With a
    /// schedule, the factor of the parameters no rule matches.
    pub t: f64,
    /// Whole-tensor (default) or per-row interpolation.
    #[serde(default = "default_granularity")]
    pub granularity: Granularity,
    /// `None` (default): exact SLERP, continuous down to identical tensors, no threshold.
    /// `Some(x)`, `x` finite in (0, 1]: mergekit-compatible, linear interpolation whenever
    /// `|cos θ| > x` (mergekit uses 0.9995).
    #[serde(default)]
    pub dot_threshold: Option<f64>,
    /// Norm below which a tensor counts as zero and the pair is linearly interpolated.
    /// Finite and ≥ 0; default 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// SLERP (default) or the linear baseline.
    #[serde(default = "default_method")]
    pub method: Method,
    /// Per-parameter factors (`None` by default: `t` everywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// What a zero vector does ([`ZeroNorm::Lerp`] by default).
    #[serde(default = "default_zero_norm", skip_serializing_if = "is_lerp")]
    pub zero_norm: ZeroNorm,
}

fn default_zero_norm() -> ZeroNorm {
    ZeroNorm::Lerp
}

fn is_lerp(z: &ZeroNorm) -> bool {
    *z == ZeroNorm::Lerp
}

fn default_granularity() -> Granularity {
    Granularity::Tensor
}

fn default_eps() -> f64 {
    1e-8
}

fn default_method() -> Method {
    Method::Slerp
}

impl Config for SlerpConfig {}

impl std::fmt::Display for SlerpConfig {
    /// The recipe as JSON.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string_pretty(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

impl SlerpConfig {
    /// A configuration with factor `t` and every other field at its default.
    pub fn new(t: f64) -> Self {
        Self {
            t,
            granularity: default_granularity(),
            dot_threshold: None,
            eps: default_eps(),
            method: default_method(),
            schedule: None,
            zero_norm: default_zero_norm(),
        }
    }

    /// Sets [`SlerpConfig::zero_norm`].
    pub fn with_zero_norm(mut self, zero_norm: ZeroNorm) -> Self {
        self.zero_norm = zero_norm;
        self
    }

    /// Sets [`SlerpConfig::t`].
    pub fn with_t(mut self, t: f64) -> Self {
        self.t = t;
        self
    }

    /// Sets [`SlerpConfig::granularity`].
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// Sets [`SlerpConfig::dot_threshold`].
    pub fn with_dot_threshold(mut self, dot_threshold: Option<f64>) -> Self {
        self.dot_threshold = dot_threshold;
        self
    }

    /// Sets [`SlerpConfig::eps`].
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets [`SlerpConfig::method`].
    pub fn with_method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Sets [`SlerpConfig::schedule`].
    pub fn with_schedule(mut self, schedule: Option<Schedule>) -> Self {
        self.schedule = schedule;
        self
    }
}

impl SlerpConfig {
    /// Checks every field against its range.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] when `t` is not a finite number in [0, 1];
    /// [`MergeError::InvalidConfig`] when `eps` is negative or not finite, or `dot_threshold`
    /// is not finite or outside (0, 1]; [`MergeError::InvalidSchedule`] for a bad rule.
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
        if let Some(schedule) = &self.schedule {
            schedule.validate()?;
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
    fn hand_written_recipes_may_leave_out_defaults() {
        let minimal: SlerpConfig = serde_json::from_str(r#"{"t": 0.5}"#).unwrap();
        assert_eq!(minimal, SlerpConfig::new(0.5));
        let full: SlerpConfig = serde_json::from_str(
            r#"{"t": 0.25, "granularity": "Row", "schedule": [
                {"filter": "**.attn.**", "t": [0.0, 0.5, 1.0]},
                {"filter": "head.*", "t": 0.75}
            ]}"#,
        )
        .unwrap();
        let want = SlerpConfig::new(0.25)
            .with_granularity(Granularity::Row)
            .with_schedule(Some(
                Schedule::new()
                    .with_rule("**.attn.**", vec![0.0, 0.5, 1.0].into())
                    .with_rule("head.*", 0.75.into()),
            ));
        assert_eq!(full, want);
        // A misspelt field is an error, not a silent default.
        let typo = serde_json::from_str::<SlerpConfig>(r#"{"t": 0.5, "granularty": "Row"}"#);
        assert!(typo.unwrap_err().to_string().contains("granularty"));
        assert!(serde_json::from_str::<SlerpConfig>(r#"{"eps": 0.1}"#).is_err());
    }

    #[test]
    fn recipes_with_schedules_replay_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let file =
            std::env::temp_dir().join(format!("burn-slerp-recipe-{}.json", std::process::id()));
        for _ in 0..100 {
            let gradient: Vec<f64> = (0..rng.random_range(1..6)).map(|_| rng.random()).collect();
            let config = SlerpConfig::new(rng.random()).with_schedule(Some(
                Schedule::new()
                    .with_rule("layers.*.attn.**", gradient.into())
                    .with_rule("**.bias", rng.random::<f64>().into()),
            ));
            config.save(&file).unwrap();
            let loaded = SlerpConfig::load(&file).unwrap();
            assert_eq!(loaded, config);
            assert_eq!(loaded.to_string(), config.to_string());
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
