//! What a merge will do ([`MergePlan`]), what it did ([`MergeReport`]) and a spectrum of merges
//! ([`Sweep`]), each printable as a table.

use std::fmt;

use serde::Serialize;

use crate::config::{Granularity, Method};
use crate::numerics::{Branch, LerpReason};
use crate::stats::TensorStats;

/// Below this numel-weighted mean cosine the report warns that the inputs do not look like
/// relatives: fine-tunes of one base sit near 1, independently initialised networks near 0.
pub const RELATIVES_COSINE: f64 = 0.5;

/// The dry run of a merge: per float tensor what would be computed, and warnings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergePlan {
    /// One entry per float tensor, in `a`'s order.
    pub entries: Vec<PlanEntry>,
    /// Schedule rules that match no parameter, and the like.
    pub warnings: Vec<String>,
}

/// One float tensor of a [`MergePlan`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanEntry {
    /// Dotted module path.
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// dtype, when the tensor exists (`None` for a lazy parameter not yet initialised).
    pub dtype: Option<String>,
    /// The factor it will be merged at.
    pub t: f64,
    /// Index of the schedule rule that gave `t`; `None` for the config's default.
    pub rule: Option<usize>,
    /// Its layer position in [0, 1], which gradients are read at.
    pub position: f64,
    /// Whole tensor or per row.
    pub granularity: Granularity,
    /// SLERP or lerp.
    pub method: Method,
}

/// Writes rows of cells as columns padded to their widest cell.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        writeln!(f, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

impl fmt::Display for MergePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![
            [
                "path",
                "shape",
                "dtype",
                "t",
                "rule",
                "layer",
                "granularity",
                "method",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for e in &self.entries {
            rows.push(vec![
                e.path.clone(),
                format!("{:?}", e.shape),
                e.dtype.clone().unwrap_or_else(|| "lazy".into()),
                format!("{:.4}", e.t),
                e.rule.map_or("-".into(), |r| r.to_string()),
                format!("{:.3}", e.position),
                format!("{:?}", e.granularity),
                format!("{:?}", e.method),
            ]);
        }
        table(f, &rows)?;
        let params: usize = self
            .entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum();
        writeln!(f, "{} tensors, {params} parameters", self.entries.len())?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// What a merge did: per tensor statistics, a summary and warnings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeReport {
    /// One entry per merged float tensor, in `a`'s order (empty at `t = 0` or `1`, where
    /// nothing is computed).
    pub tensors: Vec<TensorStats>,
    /// Totals over the tensors.
    pub summary: ReportSummary,
    /// Things worth a look, such as inputs that do not look like relatives.
    pub warnings: Vec<String>,
}

/// The totals of a [`MergeReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportSummary {
    /// Tensors merged.
    pub tensors: usize,
    /// Parameters (elements) merged.
    pub params: usize,
    /// Smallest, median and largest angle over the tensors that have one, in radians.
    pub theta_min: Option<f64>,
    /// See [`ReportSummary::theta_min`].
    pub theta_median: Option<f64>,
    /// See [`ReportSummary::theta_min`].
    pub theta_max: Option<f64>,
    /// Mean cosine over the tensors, weighted by their number of elements.
    pub mean_cos: Option<f64>,
    /// Tensors (rows, with row granularity) interpolated spherically.
    pub slerp: usize,
    /// Tensors (rows) linearly interpolated because a norm was ≤ `eps`.
    pub lerp_zero_norm: usize,
    /// Tensors (rows) linearly interpolated because they were antiparallel.
    pub lerp_antiparallel: usize,
    /// Tensors (rows) linearly interpolated by the mergekit-compatible threshold.
    pub lerp_dot_threshold: usize,
    /// Tensors linearly interpolated by the lerp method or one-element rows.
    pub lerp_method: usize,
}

impl MergeReport {
    pub(crate) fn new(tensors: Vec<TensorStats>) -> Self {
        let mut thetas: Vec<f64> = tensors.iter().filter_map(|s| s.theta).collect();
        thetas.sort_by(f64::total_cmp);
        let (mut weight, mut weighted) = (0.0, 0.0);
        for s in &tensors {
            if let Some(cos) = s.cos {
                weight += s.numel as f64;
                weighted += s.numel as f64 * cos;
            }
        }
        let mean_cos = (weight > 0.0).then(|| weighted / weight);
        let mut summary = ReportSummary {
            tensors: tensors.len(),
            params: tensors.iter().map(|s| s.numel).sum(),
            theta_min: thetas.first().copied(),
            theta_median: (!thetas.is_empty()).then(|| thetas[thetas.len() / 2]),
            theta_max: thetas.last().copied(),
            mean_cos,
            slerp: 0,
            lerp_zero_norm: 0,
            lerp_antiparallel: 0,
            lerp_dot_threshold: 0,
            lerp_method: 0,
        };
        for s in &tensors {
            match &s.rows {
                Some(rows) => {
                    summary.slerp += rows.slerp;
                    summary.lerp_zero_norm += rows.lerp_zero_norm;
                    summary.lerp_antiparallel += rows.lerp_antiparallel;
                    summary.lerp_dot_threshold += rows.lerp_dot_threshold;
                }
                None => match s.branch {
                    Branch::Slerp => summary.slerp += 1,
                    Branch::Lerp(LerpReason::ZeroNorm) => summary.lerp_zero_norm += 1,
                    Branch::Lerp(LerpReason::Antiparallel) => summary.lerp_antiparallel += 1,
                    Branch::Lerp(LerpReason::DotThreshold) => summary.lerp_dot_threshold += 1,
                    Branch::Lerp(LerpReason::Method) => summary.lerp_method += 1,
                },
            }
        }
        let mut warnings = Vec::new();
        if let Some(cos) = mean_cos
            && cos < RELATIVES_COSINE
        {
            warnings.push(format!(
                "the models do not look like relatives: mean cosine {cos:.3} (fine-tunes of one \
                 base have cosines near 1, independently initialised networks near 0); merging \
                 unrelated models usually gives a broken model"
            ));
        }
        Self {
            tensors,
            summary,
            warnings,
        }
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn branch_name(b: Branch) -> &'static str {
    match b {
        Branch::Slerp => "slerp",
        Branch::Lerp(LerpReason::ZeroNorm) => "lerp (zero norm)",
        Branch::Lerp(LerpReason::Antiparallel) => "lerp (antiparallel)",
        Branch::Lerp(LerpReason::DotThreshold) => "lerp (dot threshold)",
        Branch::Lerp(LerpReason::Method) => "lerp (method)",
    }
}

impl fmt::Display for MergeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![
            ["path", "numel", "t", "|a|", "|b|", "cos", "theta", "branch"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &self.tensors {
            let branch = match &s.rows {
                Some(r) => format!(
                    "rows: {} slerp, {} lerp; theta {}/{}/{}",
                    r.slerp,
                    r.count - r.slerp,
                    opt(r.theta_min, 3),
                    opt(r.theta_median, 3),
                    opt(r.theta_max, 3)
                ),
                None => branch_name(s.branch).into(),
            };
            rows.push(vec![
                s.path.clone(),
                s.numel.to_string(),
                format!("{:.4}", s.t),
                format!("{:.4e}", s.norm_a),
                format!("{:.4e}", s.norm_b),
                opt(s.cos, 6),
                opt(s.theta, 6),
                branch,
            ]);
        }
        table(f, &rows)?;
        let m = &self.summary;
        writeln!(
            f,
            "{} tensors, {} parameters; theta min/median/max {}/{}/{} rad; mean cos {}",
            m.tensors,
            m.params,
            opt(m.theta_min, 4),
            opt(m.theta_median, 4),
            opt(m.theta_max, 4),
            opt(m.mean_cos, 4)
        )?;
        writeln!(
            f,
            "slerp {}; lerp: zero norm {}, antiparallel {}, dot threshold {}, method {}",
            m.slerp, m.lerp_zero_norm, m.lerp_antiparallel, m.lerp_dot_threshold, m.lerp_method
        )?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// One point of a [`Sweep`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SweepPoint {
    /// The factor the model was merged at.
    pub t: f64,
    /// Its score (higher is better).
    pub score: f64,
}

/// Scores of the merges along `t`, and the best of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep {
    /// Every point, in the order swept.
    pub points: Vec<SweepPoint>,
    /// The highest score (the first one on a tie); `None` when every score is NaN.
    pub best: Option<SweepPoint>,
}

impl Sweep {
    pub(crate) fn new(points: Vec<SweepPoint>) -> Self {
        let best =
            points
                .iter()
                .filter(|p| !p.score.is_nan())
                .fold(None::<SweepPoint>, |best, p| match best {
                    Some(b) if b.score >= p.score => Some(b),
                    _ => Some(*p),
                });
        Self { points, best }
    }

    /// A text plot of score against `t`, `height` lines high, one column per point.
    pub fn plot(&self, height: usize) -> String {
        let scores: Vec<f64> = self
            .points
            .iter()
            .map(|p| p.score)
            .filter(|s| s.is_finite())
            .collect();
        let (lo, hi) = scores
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
                (lo.min(*s), hi.max(*s))
            });
        let height = height.max(2);
        let mut out = String::new();
        for level in (0..height).rev() {
            let threshold = lo + (hi - lo) * level as f64 / (height - 1) as f64;
            let label = format!("{threshold:>9.4} |");
            out.push_str(&label);
            for p in &self.points {
                let hit = p.score.is_finite()
                    && (if hi > lo {
                        ((p.score - lo) / (hi - lo) * (height - 1) as f64).round() as usize == level
                    } else {
                        level == 0
                    });
                out.push_str(if hit { " * " } else { "   " });
            }
            out.push('\n');
        }
        out.push_str(&format!("{:>9} +", ""));
        out.push_str(&"---".repeat(self.points.len()));
        out.push('\n');
        out.push_str(&format!("{:>9}  ", "t"));
        for p in &self.points {
            out.push_str(&format!(
                "{:<3}",
                format!("{:.1}", p.t).trim_start_matches('0')
            ));
        }
        out.push('\n');
        out
    }
}

impl fmt::Display for Sweep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![vec!["t".to_string(), "score".to_string(), String::new()]];
        for p in &self.points {
            let best = self.best.is_some_and(|b| b.t == p.t && b.score == p.score);
            rows.push(vec![
                format!("{:.3}", p.t),
                format!("{:.4}", p.score),
                if best {
                    "<- best".into()
                } else {
                    String::new()
                },
            ]);
        }
        table(f, &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_picks_the_highest_finite_score() {
        let points = [(0.0, 0.2), (0.5, f64::NAN), (0.6, 0.9), (1.0, 0.9)]
            .map(|(t, score)| SweepPoint { t, score })
            .to_vec();
        let sweep = Sweep::new(points);
        assert_eq!(sweep.best, Some(SweepPoint { t: 0.6, score: 0.9 }));
        let text = sweep.to_string();
        assert!(text.lines().nth(3).unwrap().ends_with("<- best"), "{text}");
        assert_eq!(sweep.plot(4).lines().count(), 6);
        let none = Sweep::new(vec![SweepPoint {
            t: 0.5,
            score: f64::NAN,
        }]);
        assert_eq!(none.best, None);
    }
}
