//! Per-parameter interpolation factors: [`Schedule`], its rules and where each tensor sits in
//! the model's layer stack.

use std::collections::HashMap;

use burn::module::{ModuleVisitor, Param};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::MergeError;

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
/// tensor's layer position (see [`SlerpConfig`](crate::SlerpConfig) and the README).
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
                if let Some(v) = values
                    .iter()
                    .find(|v| !(v.is_finite() && (0.0..=1.0).contains(*v)))
                {
                    return Err(bad(format!("t = {v} is not a number in [0, 1]")));
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

    /// The factor of the tensor at `path` and layer `position`, and the rule that gave it.
    pub(crate) fn resolve(&mut self, path: &str, position: f64) -> (f64, Option<usize>) {
        match self.globs.iter().position(|g| g.matches(path)) {
            Some(r) => {
                self.used[r] = true;
                (self.rules[r].t.at(position), Some(r))
            }
            None => (self.default_t, None),
        }
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

/// A compiled filter: dotted segments, `**` for any run of segments, `*` within a segment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Glob {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    /// `**`: zero or more whole segments.
    Any,
    /// A segment pattern, `*` matching any run of characters within it.
    Pattern(String),
}

impl Glob {
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("the filter is empty".into());
        }
        let segments = pattern
            .split('.')
            .map(|s| match s {
                "" => Err(format!(
                    "`{pattern}` has an empty segment (a leading, trailing or doubled `.`)"
                )),
                "**" => Ok(Segment::Any),
                s if s.contains("**") => Err(format!(
                    "`**` must be a whole segment in `{pattern}` (write `*` within a segment)"
                )),
                s => Ok(Segment::Pattern(s.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { segments })
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('.').collect();
        matches_from(&self.segments, &parts)
    }
}

fn matches_from(pattern: &[Segment], parts: &[&str]) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        Some((Segment::Any, rest)) => {
            (0..=parts.len()).any(|skip| matches_from(rest, &parts[skip..]))
        }
        Some((Segment::Pattern(p), rest)) => {
            !parts.is_empty() && segment_matches(p, parts[0]) && matches_from(rest, &parts[1..])
        }
    }
}

/// `*` matches any run of characters (none included); everything else literally.
fn segment_matches(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    if pieces.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    // Middle pieces in order, each at its leftmost place: greedy is exact for `*` alone.
    let mut rest = &text[first.len()..text.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Where each float parameter sits in the model's layer stack, from one pass over a module.
///
/// A parameter inside a `Vec` of `L` modules at index `i` (the outermost `Vec` on its path)
/// has position `i / (L − 1)` (0 when `L = 1`); sibling `Vec`s each count their own. A
/// parameter outside every `Vec` has position 0 when it comes before the first `Vec`-held
/// parameter (embeddings) and 1 after it (final norm, head).
#[derive(Debug, Default)]
pub(crate) struct LayerPositions {
    stack: Vec<(String, bool)>,
    params: Vec<Visited>,
    lengths: HashMap<String, usize>,
    seen_layer: bool,
}

/// One float parameter as [`LayerPositions`] saw it.
#[derive(Debug)]
struct Visited {
    path: String,
    /// The outermost `Vec` on its path and its index there; `None` outside every `Vec`.
    layer: Option<(String, usize)>,
    /// Whether a `Vec`-held parameter was visited before it (or it is one).
    after_layer: bool,
}

impl LayerPositions {
    /// `(path, position)` of every float parameter, in visiting order.
    pub(crate) fn finish(self) -> Vec<(String, f64)> {
        self.params
            .into_iter()
            .map(
                |Visited {
                     path,
                     layer,
                     after_layer,
                 }| {
                    let position = match layer {
                        Some((vec, index)) => {
                            let len = self.lengths.get(&vec).copied().unwrap_or(1);
                            if len > 1 {
                                index as f64 / (len - 1) as f64
                            } else {
                                0.0
                            }
                        }
                        None if after_layer => 1.0,
                        None => 0.0,
                    };
                    (path, position)
                },
            )
            .collect()
    }
}

impl ModuleVisitor for LayerPositions {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.push((name.to_string(), container_type == "Vec"));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
        let path = self
            .stack
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(".");
        let layer = self.stack.iter().position(|(_, is_vec)| *is_vec).map(|j| {
            let vec = self.stack[..j]
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(".");
            let index: usize = self.stack[j].0.parse().unwrap_or(0);
            let len = self.lengths.entry(vec.clone()).or_insert(0);
            *len = (*len).max(index + 1);
            (vec, index)
        });
        if layer.is_some() {
            self.seen_layer = true;
        }
        self.params.push(Visited {
            path,
            layer,
            after_layer: self.seen_layer,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn globs_anchor_to_the_whole_path() {
        let g = glob("**.attn.*");
        assert!(g.matches("layers.0.attn.query"));
        assert!(g.matches("attn.query"));
        assert!(!g.matches("layers.0.attn.query.weight"));
        assert!(!g.matches("layers.0.attention.query"));
        let g = glob("layers.*.mlp.**");
        assert!(g.matches("layers.3.mlp.fc1.weight"));
        assert!(g.matches("layers.3.mlp"));
        assert!(!g.matches("layers.3.4.mlp.fc1"));
        assert!(!g.matches("head.layers.3.mlp.fc1"));
        let g = glob("*_proj.weight");
        assert!(g.matches("q_proj.weight") && g.matches("_proj.weight"));
        assert!(!g.matches("q_proj.bias") && !g.matches("a.q_proj.weight"));
        let g = glob("a*b*c");
        assert!(g.matches("abc") && g.matches("aXbYc") && g.matches("abbc"));
        assert!(!g.matches("acb") && !g.matches("ab"));
        assert!(glob("**").matches("anything.at.all"));
        assert!(glob("**.bias").matches("bias"));
    }

    #[test]
    fn bad_globs_are_errors() {
        for p in ["", ".a", "a.", "a..b", "a**", "x.**b.y"] {
            assert!(Glob::new(p).is_err(), "{p:?}");
        }
    }

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
