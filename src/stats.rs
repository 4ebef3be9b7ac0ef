//! What a merge computed for each tensor: the statistics the reductions give anyway.

use serde::Serialize;

use crate::numerics::{Branch, Coefficients, LerpReason, PairStats, angle};

/// The statistics of one merged float tensor, taken from the reductions the merge computes
/// anyway (no extra pass over the weights).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorStats {
    /// Dotted module path (empty for the free function).
    pub path: String,
    /// The interpolation factor this tensor was merged at (a schedule may give each tensor
    /// its own).
    pub t: f64,
    /// Number of elements.
    pub numel: usize,
    /// `‖a‖` of the whole tensor.
    pub norm_a: f64,
    /// `‖b‖` of the whole tensor.
    pub norm_b: f64,
    /// `cos θ` of the whole tensor; `None` when a norm is 0.
    pub cos: Option<f64>,
    /// The angle θ between the whole tensors, in radians; `None` when a norm is 0.
    pub theta: Option<f64>,
    /// How the tensor was interpolated: for whole-tensor granularity the branch taken; for row
    /// granularity [`Branch::Slerp`] when the rows were interpolated one by one (see
    /// [`TensorStats::rows`]).
    pub branch: Branch,
    /// With [`Granularity::Row`](crate::Granularity::Row) on a tensor whose rows have more than
    /// one element: the per-row angles and branches, summarised.
    pub rows: Option<RowStats>,
}

/// Per-row statistics of one tensor, summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowStats {
    /// Number of rows.
    pub count: usize,
    /// Smallest, median and largest angle over the rows that have one (both norms non-zero).
    pub theta_min: Option<f64>,
    /// See [`RowStats::theta_min`].
    pub theta_median: Option<f64>,
    /// See [`RowStats::theta_min`].
    pub theta_max: Option<f64>,
    /// Rows interpolated spherically.
    pub slerp: usize,
    /// Rows linearly interpolated because a norm was ≤ `eps`.
    pub lerp_zero_norm: usize,
    /// Rows linearly interpolated because they were antiparallel.
    pub lerp_antiparallel: usize,
    /// Rows linearly interpolated by the mergekit-compatible threshold.
    pub lerp_dot_threshold: usize,
}

impl TensorStats {
    /// Summarises the statistics and coefficients of one tensor's rows (one row for
    /// whole-tensor granularity).
    pub(crate) fn new(
        numel: usize,
        t: f64,
        stats: &[PairStats],
        coefficients: &[Coefficients],
        per_row: bool,
    ) -> Self {
        let total = stats
            .iter()
            .fold(PairStats::default(), |acc, s| acc.add(*s));
        let whole = angle(total);
        let rows = per_row.then(|| {
            let mut thetas: Vec<f64> = stats
                .iter()
                .filter_map(|s| angle(*s))
                .map(|a| a.theta)
                .collect();
            thetas.sort_by(f64::total_cmp);
            let count_of = |b: Branch| coefficients.iter().filter(|c| c.branch == b).count();
            RowStats {
                count: stats.len(),
                theta_min: thetas.first().copied(),
                theta_median: (!thetas.is_empty()).then(|| thetas[thetas.len() / 2]),
                theta_max: thetas.last().copied(),
                slerp: count_of(Branch::Slerp),
                lerp_zero_norm: count_of(Branch::Lerp(LerpReason::ZeroNorm)),
                lerp_antiparallel: count_of(Branch::Lerp(LerpReason::Antiparallel)),
                lerp_dot_threshold: count_of(Branch::Lerp(LerpReason::DotThreshold)),
            }
        });
        Self {
            path: String::new(),
            t,
            numel,
            norm_a: total.aa.sqrt(),
            norm_b: total.bb.sqrt(),
            cos: whole.map(|w| w.cos),
            theta: whole.map(|w| w.theta),
            branch: if per_row {
                Branch::Slerp
            } else {
                coefficients[0].branch
            },
            rows,
        }
    }
}
