//! Per-parameter interpolation factors: [`Schedule`] and its rules, their filters ([`glob`])
//! and where each tensor sits in the layer stack ([`positions`]).

mod glob;
mod positions;

use serde::{Deserialize, Serialize};

use crate::error::MergeError;
use glob::Glob;
pub(crate) use positions::layer_positions;

/// Per-parameter `t`: an ordered list of rules, the first whose filter matches a parameter's
/// dotted path gives its `t`; parameters no rule matches take the config's `t`.
///
/// In JSON (inside a [`SlerpConfig`](crate::SlerpConfig)) a schedule is a list of rules:
///
/// ```json
/// {
///   "t": 0.5,
///   "schedule": [
///     { "filter": "**.attn.**", "t": [0.0, 0.5, 0.3, 0.7, 1.0] },
///     { "filter": "**.mlp.**",  "t": [1.0, 0.5, 0.7, 0.3, 0.0] }
///   ]
/// }
/// ```
///
/// Filters are globs anchored to the whole dotted path: `*` matches within one segment
/// (`layers.*.bias`, `*_proj`), `**` any number of whole segments, none included
/// (`**.attn.*`, `layers.*.mlp.**`). A gradient is interpolated piecewise-linearly over the
/// tensor's layer position, which comes from its path alone, the same in a module and in a
/// checkpoint file: the first numeric segment of the path is its layer index `i` in a stack of
/// `L` layers (`L` one more than the largest index under the same prefix), at position
/// `i / (L − 1)`; every tensor outside the layers (embeddings, norms, heads) is at position 0,
/// as in mergekit. In a module, `Vec`s, arrays and tuples all give numeric segments
/// (`blocks.3.attn.query.weight`, `norms.1.gamma`, `mlp.0.weight`), as they do in the files
/// Burn saves.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schedule {
    /// The rules, first match wins.
    pub rules: Vec<Rule>,
}

/// One rule of a [`Schedule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Glob over the dotted parameter path.
    pub filter: String,
    /// The factor for the parameters it matches.
    pub t: Factor,
}

/// A rule's factor: one number, or a gradient over the layer stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Factor {
    /// The same `t` wherever the rule matches.
    Constant(f64),
    /// Anchor values spread evenly over layer positions 0 to 1, interpolated linearly between.
    Gradient(Vec<f64>),
}

impl Schedule {
    /// An empty schedule.
    pub fn new() -> Self {
        Self::default()
    }

    /// This schedule with one more rule, after the others.
    pub fn with_rule(mut self, filter: impl Into<String>, t: Factor) -> Self {
        self.rules.push(Rule {
            filter: filter.into(),
            t,
        });
        self
    }

    /// Checks every rule: a valid glob, values finite and in [0, 1], gradients not empty.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidSchedule`] naming the first bad rule (by index and filter).
    pub fn validate(&self) -> Result<(), MergeError> {
        self.compile().map(|_| ())
    }

    pub(crate) fn compile(&self) -> Result<Vec<Glob>, MergeError> {
        self.compile_for(|v| (0.0..=1.0).contains(&v), "t", "a number in [0, 1]")
    }

    /// [`compile`](Self::compile) for a schedule of weights: finite values (the mean checks
    /// them against its method).
    pub(crate) fn compile_weights(&self) -> Result<Vec<Glob>, MergeError> {
        self.compile_for(|_| true, "weight", "a finite number")
    }

    fn compile_for(
        &self,
        in_range: impl Fn(f64) -> bool,
        what: &str,
        range: &str,
    ) -> Result<Vec<Glob>, MergeError> {
        self.rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let bad = |reason: String| MergeError::InvalidSchedule {
                    rule: index,
                    filter: rule.filter.clone(),
                    reason,
                };
                let values: &[f64] = match &rule.t {
                    Factor::Constant(v) => std::slice::from_ref(v),
                    Factor::Gradient(v) if v.is_empty() => {
                        return Err(bad("the gradient has no values".into()));
                    }
                    Factor::Gradient(v) => v,
                };
                if let Some(v) = values.iter().find(|v| !(v.is_finite() && in_range(**v))) {
                    return Err(bad(format!("{what} = {v} is not {range}")));
                }
                Glob::new(&rule.filter).map_err(bad)
            })
            .collect()
    }
}

impl Factor {
    /// The factor at layer position `position` in [0, 1].
    pub fn at(&self, position: f64) -> f64 {
        match self {
            Factor::Constant(v) => *v,
            Factor::Gradient(v) if v.len() == 1 => v[0],
            Factor::Gradient(v) => {
                let x = position.clamp(0.0, 1.0) * (v.len() - 1) as f64;
                let i = (x.floor() as usize).min(v.len() - 2);
                let frac = x - i as f64;
                v[i] + frac * (v[i + 1] - v[i])
            }
        }
    }
}

impl From<f64> for Factor {
    fn from(t: f64) -> Self {
        Factor::Constant(t)
    }
}

impl From<Vec<f64>> for Factor {
    fn from(anchors: Vec<f64>) -> Self {
        Factor::Gradient(anchors)
    }
}

/// The factor one tensor is merged at, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Assignment {
    /// The factor.
    pub(crate) t: f64,
    /// Index of the rule that gave it; `None` for the default.
    pub(crate) rule: Option<usize>,
    /// The tensor's layer position in [0, 1].
    pub(crate) position: f64,
}

/// A schedule ready to apply: each path's factor, and which rules were used.
pub(crate) struct Resolver<'a> {
    rules: &'a [Rule],
    globs: Vec<Glob>,
    used: Vec<bool>,
    default_t: f64,
}

impl<'a> Resolver<'a> {
    /// Compiles `schedule` (none: `default_t` everywhere).
    pub(crate) fn new(schedule: Option<&'a Schedule>, default_t: f64) -> Result<Self, MergeError> {
        let (rules, globs) = match schedule {
            Some(s) => (s.rules.as_slice(), s.compile()?),
            None => (&[][..], Vec::new()),
        };
        Ok(Self {
            rules,
            used: vec![false; globs.len()],
            globs,
            default_t,
        })
    }

    /// [`new`](Self::new) for a schedule of weights (finite values, not bounded by 1).
    pub(crate) fn weights(schedule: &'a Schedule, default: f64) -> Result<Self, MergeError> {
        let globs = schedule.compile_weights()?;
        Ok(Self {
            rules: &schedule.rules,
            used: vec![false; globs.len()],
            globs,
            default_t: default,
        })
    }

    /// The factor of the tensor at `path` and layer `position`, and the rule that gave it.
    pub(crate) fn resolve(&mut self, path: &str, position: f64) -> Assignment {
        match self.globs.iter().position(|g| g.matches(path)) {
            Some(r) => {
                self.used[r] = true;
                Assignment {
                    t: self.rules[r].t.at(position),
                    rule: Some(r),
                    position,
                }
            }
            None => Assignment {
                t: self.default_t,
                rule: None,
                position,
            },
        }
    }

    /// The assignment of every path, in order, each at its layer position.
    pub(crate) fn assign(&mut self, paths: &[&str]) -> Vec<Assignment> {
        let positions = layer_positions(paths);
        paths
            .iter()
            .zip(positions)
            .map(|(path, position)| self.resolve(path, position))
            .collect()
    }

    /// One warning per rule that matched none of the `what`s resolved so far.
    pub(crate) fn unused(&self, what: &str) -> Vec<String> {
        self.used
            .iter()
            .enumerate()
            .filter(|(_, used)| !**used)
            .map(|(r, _)| {
                format!(
                    "schedule rule {r} (`{}`) matches no {what}",
                    self.rules[r].filter
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_between_anchors() {
        let g = Factor::Gradient(vec![0.0, 1.0, 0.5]);
        let cases = [
            (0.0, 0.0),
            (0.25, 0.5),
            (0.5, 1.0),
            (0.75, 0.75),
            (1.0, 0.5),
        ];
        for (p, want) in cases {
            assert!((g.at(p) - want).abs() < 1e-15, "{p}");
        }
        assert_eq!(Factor::Gradient(vec![0.3]).at(0.9), 0.3);
        assert_eq!(Factor::Constant(0.2).at(0.9), 0.2);
    }

    #[test]
    fn rules_are_validated() {
        let ok = Schedule::new()
            .with_rule("**.attn.**", vec![0.0, 1.0].into())
            .with_rule("head.*", 0.2.into());
        assert!(ok.validate().is_ok());
        let cases = [
            Schedule::new().with_rule("a.*", Factor::Gradient(vec![])),
            Schedule::new().with_rule("a.*", 1.5.into()),
            Schedule::new().with_rule("a.*", vec![0.2, f64::NAN].into()),
            Schedule::new()
                .with_rule("ok", 0.5.into())
                .with_rule("a..b", 0.5.into()),
        ];
        for s in cases {
            assert!(
                matches!(s.validate(), Err(MergeError::InvalidSchedule { .. })),
                "{s:?}"
            );
        }
        let err = Schedule::new()
            .with_rule("ok", 0.5.into())
            .with_rule("a**", 0.5.into())
            .validate()
            .unwrap_err();
        assert!(matches!(err, MergeError::InvalidSchedule { rule: 1, .. }));
    }
}
