//! [`SlerpMerger`]: pairs two modules' parameters by path, checks the whole structure, then maps
//! model `a` into the merged model.

use std::any::Any;
use std::collections::HashMap;

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor};

use crate::report::{MergePlan, MergeReport, PlanEntry, Sweep, SweepPoint};
use crate::schedule::{LayerPositions, Resolver};
use crate::slerp::{Leaf, Path, Summary, check_dtype, interpolate, resolve, same_device};
use crate::{MergeError, SlerpConfig, TensorStats};

/// Merges two Burn modules of one architecture by SLERP of every float parameter.
///
/// The merge runs on the device the models live on (Burn 0.22 carries the backend in the
/// tensor's device): flex or ndarray on the CPU, wgpu on the GPU.
///
/// * Parameters are paired by module path (`encoder.layers.2.weight`), never by `ParamId`.
/// * Float parameters, BatchNorm running statistics included, are interpolated.
/// * Int and bool parameters and flags (such as BatchNorm's `training`) are taken from `a`, and
///   so are the `ParamId`s and the require-grad settings.
/// * Neither input is modified. Running statistics that a training step has left pending are
///   folded in first, exactly as [`Module::valid`] does.
///
/// # Example
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn_slerp::{SlerpConfig, SlerpMerger};
/// # let device = burn::tensor::Device::flex();
/// let (a, b) = (LinearConfig::new(4, 2).init(&device), LinearConfig::new(4, 2).init(&device));
/// let merged = SlerpMerger::new(SlerpConfig::new(0.5))?.merge(&a, &b)?;
/// assert_eq!(merged.weight.dims(), [4, 2]); // Burn stores Linear weights as [d_input, d_output]
/// # Ok::<(), burn_slerp::MergeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SlerpMerger {
    config: SlerpConfig,
}

impl SlerpMerger {
    /// Creates a merger after checking the configuration.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] when `t` is not a finite number in [0, 1];
    /// [`MergeError::InvalidConfig`] when `eps` or `dot_threshold` is out of range.
    pub fn new(config: SlerpConfig) -> Result<Self, MergeError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration this merger applies.
    pub fn config(&self) -> &SlerpConfig {
        &self.config
    }

    /// Merges `a` and `b` into a new module.
    ///
    /// The whole structure is checked first (same parameter paths, kinds, shapes and devices);
    /// only then is anything computed. `t = 0` returns `a`'s values and `t = 1` `b`'s, bit for
    /// bit, without a finiteness check.
    ///
    /// On the CPU backends each tensor's statistics (a few numbers per tensor or row) are read
    /// back as it is merged. On CubeCL devices (wgpu) nothing is read until every tensor has
    /// been queued; then the statistics of all of them come back in one read per device, so
    /// the device never waits on the host in the middle of a merge.
    ///
    /// # Arguments
    ///
    /// * `a` - the model at `t = 0`; it also gives the structure, ids, int and bool parameters
    ///   and flags of the result.
    /// * `b` - the model at `t = 1`.
    ///
    /// # Returns
    ///
    /// The merged module, on the devices of `a`'s parameters; on an autodiff device its float
    /// parameters are fresh leaves with `a`'s require-grad settings.
    ///
    /// # Errors
    ///
    /// [`MergeError::MissingParam`], [`MergeError::UnexpectedParam`],
    /// [`MergeError::KindMismatch`], [`MergeError::ShapeMismatch`],
    /// [`MergeError::DeviceMismatch`] and [`MergeError::UnsupportedDType`] before any work;
    /// [`MergeError::NonFinite`] when a parameter of `a` or `b` holds a NaN or an infinity (the
    /// partly built output is dropped). The error names the first offending parameter in `a`'s
    /// order.
    pub fn merge<M: Module>(&self, a: &M, b: &M) -> Result<M, MergeError> {
        self.merge_with_stats(a, b).map(|(merged, _)| merged)
    }

    /// [`merge`](Self::merge), also returning what the merge computed for each float tensor:
    /// norms, cosine, angle and the branch of the numerics table taken (per-row summaries with
    /// [`Granularity::Row`](crate::Granularity::Row)), in `a`'s parameter order. The statistics
    /// come from the reductions the merge does anyway. At `t = 0` and `t = 1` nothing is
    /// computed and the list is empty.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge).
    pub fn merge_with_stats<M: Module>(
        &self,
        a: &M,
        b: &M,
    ) -> Result<(M, Vec<TensorStats>), MergeError> {
        self.run(None, a, b, self.config.t)
    }

    /// [`merge`](Self::merge), also returning a [`MergeReport`]: per tensor its factor, angle,
    /// cosine, norms and branch, a summary (parameters merged, angle distribution, lerp
    /// fallbacks by reason) and warnings, such as inputs that do not look like relatives. The
    /// report comes from the reductions the merge does anyway; it prints as a table and
    /// serializes to JSON.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge).
    pub fn merge_with_report<M: Module>(
        &self,
        a: &M,
        b: &M,
    ) -> Result<(M, MergeReport), MergeError> {
        let (merged, tensors) = self.run(None, a, b, self.config.t)?;
        Ok((merged, MergeReport::new(tensors)))
    }

    /// Task-vector SLERP: `base + slerp(a − base, b − base, t)` for every float parameter.
    ///
    /// Fine-tunes of one base differ from it by a few percent, so the SLERP of their weights
    /// is nearly a lerp; their task vectors (`a − base`, `b − base`) are nearly orthogonal,
    /// and there lerp keeps only `≈ 0.71` of their norm at `t = 0.5` while SLERP keeps all of
    /// it. `t = 0` and `t = 1` return `a` and `b` bit for bit; int and bool parameters, flags
    /// and autodiff state come from `a`. The schedule applies as in [`merge`](Self::merge).
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), with `base` checked against `a` like `b` is.
    pub fn merge_with_base<M: Module>(&self, base: &M, a: &M, b: &M) -> Result<M, MergeError> {
        check_structure(a, base)?;
        self.run(Some(base), a, b, self.config.t)
            .map(|(merged, _)| merged)
    }

    /// The dry run of [`merge`](Self::merge): every check `merge` makes before computing
    /// (configuration, schedule, structure, shapes, devices, dtypes; not finiteness, which
    /// needs the data), and per float tensor the path, shape, dtype (when the tensor exists:
    /// lazy parameters are not initialised to find out), factor, layer position, granularity
    /// and method. Nothing is computed. Schedule rules that match no parameter are warnings.
    ///
    /// # Errors
    ///
    /// As [`merge`](Self::merge), except [`MergeError::NonFinite`].
    pub fn plan<M: Module>(&self, a: &M, b: &M) -> Result<MergePlan, MergeError> {
        check_structure(a, b)?;
        let assignment = assign(&self.config, self.config.t, a)?;
        let mut slots = StructureCollector::default();
        a.visit(&mut slots);
        let entries = slots
            .order
            .into_iter()
            .filter(|(_, slot)| slot.kind == "float")
            .map(|(path, slot)| {
                let (t, rule, position) = assignment.by_path[&path];
                PlanEntry {
                    path,
                    shape: slot.shape,
                    dtype: slot.dtype.map(|d| format!("{d:?}")),
                    t,
                    rule,
                    position,
                    granularity: self.config.granularity,
                    method: self.config.method,
                }
            })
            .collect();
        Ok(MergePlan {
            entries,
            warnings: assignment.warnings,
        })
    }

    /// Merges `a` and `b` at every factor of `ts` and scores each merged model with `score`
    /// (higher is better; negate a loss), for picking a model from the spectrum between the
    /// two. Every point is merged from the inputs, nothing accumulates; the swept factor
    /// replaces the configuration's `t`, and schedule rules keep their own values. A score
    /// that is NaN is recorded but never best.
    ///
    /// # Errors
    ///
    /// [`MergeError::InvalidT`] for a factor outside [0, 1] (before anything is merged); the
    /// errors of [`merge`](Self::merge).
    pub fn sweep<M: Module>(
        &self,
        a: &M,
        b: &M,
        ts: impl IntoIterator<Item = f64>,
        mut score: impl FnMut(&M, f64) -> f64,
    ) -> Result<Sweep, MergeError> {
        let ts: Vec<f64> = ts.into_iter().collect();
        for t in &ts {
            self.config.clone().with_t(*t).validate()?;
        }
        let mut points = Vec::with_capacity(ts.len());
        for t in ts {
            let (merged, _) = self.run(None, a, b, t)?;
            points.push(SweepPoint {
                t,
                score: score(&merged, t),
            });
        }
        Ok(Sweep::new(points))
    }

    /// The merge behind every public entry point: `b` (and `base` for task vectors) paired
    /// with `a` by path, `default_t` for parameters no schedule rule matches.
    fn run<M: Module>(
        &self,
        base: Option<&M>,
        a: &M,
        b: &M,
        default_t: f64,
    ) -> Result<(M, Vec<TensorStats>), MergeError> {
        check_structure(a, b)?;
        let assignment = assign(&self.config, default_t, a)?;

        // What the result takes from `a` as it is: int and bool params, flags, autodiff state.
        let mut originals = Originals::default();
        a.visit(&mut originals);
        // `valid()` builds fresh running-state cells: mapping a plain clone of `a` would write
        // the merged BatchNorm statistics into `a`'s own (clones share them).
        let fresh_a = a.valid();
        let mut others = FloatCollector::default();
        b.valid().visit(&mut others);
        let bases = base.map(|base| {
            let mut bases = FloatCollector::default();
            base.valid().visit(&mut bases);
            bases.tensors
        });

        let mut mapper = SlerpMapper {
            config: SlerpConfig {
                schedule: None,
                ..self.config.clone()
            },
            ts: assignment.by_path,
            path: PathStack::default(),
            originals,
            others: others.tensors,
            bases,
            non_finite: None,
            stats: Vec::new(),
        };
        let merged = fresh_a.map(&mut mapper);
        // Statistics still on the device (CubeCL) are read here, all at once; the first
        // parameter in `a`'s order that is not finite is the one reported.
        let mut slots: Vec<(String, Option<TensorStats>)> = Vec::new();
        let mut pending = Vec::new();
        for (path, summary) in mapper.stats {
            match summary {
                Summary::Ready(stats) => slots.push((path, Some(stats))),
                Summary::Pending(p) => {
                    pending.push((slots.len(), p));
                    slots.push((path, None));
                }
            }
        }
        if !pending.is_empty() {
            let (indices, pending): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
            for (i, stats) in indices.into_iter().zip(resolve(pending)) {
                slots[i].1 = stats;
            }
        }
        let mut stats = Vec::with_capacity(slots.len());
        for (path, s) in slots {
            let Some(mut s) = s else {
                return Err(MergeError::NonFinite { path });
            };
            s.path = path;
            stats.push(s);
        }
        match mapper.non_finite {
            Some(path) => Err(MergeError::NonFinite { path }),
            None => Ok((merged, stats)),
        }
    }
}

/// The factor of every float parameter: `(t, rule, layer position)` by path, and the
/// schedule's warnings.
struct Assignment {
    by_path: HashMap<String, (f64, Option<usize>, f64)>,
    warnings: Vec<String>,
}

fn assign<M: Module>(
    config: &SlerpConfig,
    default_t: f64,
    a: &M,
) -> Result<Assignment, MergeError> {
    config.clone().with_t(default_t).validate()?;
    let mut resolver = Resolver::new(config.schedule.as_ref(), default_t)?;
    let mut positions = LayerPositions::default();
    a.visit(&mut positions);
    let by_path = positions
        .finish()
        .into_iter()
        .map(|(path, position)| {
            let (t, rule) = resolver.resolve(&path, position);
            (path, (t, rule, position))
        })
        .collect();
    let warnings = resolver.unused("parameter");
    Ok(Assignment { by_path, warnings })
}

/// A stack of module names, joined into dotted paths.
#[derive(Default)]
pub(crate) struct PathStack(Vec<String>);

impl PathStack {
    pub(crate) fn push(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(crate) fn pop(&mut self) {
        self.0.pop();
    }
    pub(crate) fn current(&self) -> String {
        self.0.join(".")
    }
}

/// One parameter as the structure check sees it; nothing is initialized to read it.
#[derive(Debug, Clone)]
struct Slot {
    kind: &'static str,
    shape: Vec<usize>,
    device: Option<Device>,
    dtype: Option<DType>,
}

#[derive(Default)]
struct StructureCollector {
    path: PathStack,
    order: Vec<(String, Slot)>,
}

impl StructureCollector {
    fn add(&mut self, slot: Slot) {
        self.order.push((self.path.current(), slot));
    }
}

impl ModuleVisitor for StructureCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // The dtype is known only once a tensor exists; lazy ones take the device default.
        let dtype = param.is_initialized().then(|| param.val().dtype());
        self.add(Slot {
            kind: "float",
            shape: param.lazy_shape().as_slice().to_vec(),
            device: Some(param.lazy_device()),
            dtype,
        });
    }
    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        self.add(Slot {
            kind: "int",
            shape: param.lazy_shape().as_slice().to_vec(),
            device: None,
            dtype: None,
        });
    }
    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        self.add(Slot {
            kind: "bool",
            shape: param.lazy_shape().as_slice().to_vec(),
            device: None,
            dtype: None,
        });
    }
    fn visit_flag(&mut self, _flag: &Param<Flag>) {
        self.add(Slot {
            kind: "flag",
            shape: Vec::new(),
            device: None,
            dtype: None,
        });
    }
}

/// Everything `merge` checks before computing anything.
pub(crate) fn check_structure<M: Module>(a: &M, b: &M) -> Result<(), MergeError> {
    let mut in_a = StructureCollector::default();
    a.visit(&mut in_a);
    let mut in_b = StructureCollector::default();
    b.visit(&mut in_b);
    let b_slots: HashMap<&str, &Slot> = in_b.order.iter().map(|(p, s)| (p.as_str(), s)).collect();

    for (path, slot_a) in &in_a.order {
        let Some(slot_b) = b_slots.get(path.as_str()) else {
            return Err(MergeError::MissingParam { path: path.clone() });
        };
        if slot_a.kind != slot_b.kind {
            return Err(MergeError::KindMismatch {
                path: path.clone(),
                a: slot_a.kind,
                b: slot_b.kind,
            });
        }
        if slot_a.shape != slot_b.shape {
            return Err(MergeError::ShapeMismatch {
                path: path.clone(),
                a: slot_a.shape.clone(),
                b: slot_b.shape.clone(),
            });
        }
        if let (Some(da), Some(db)) = (&slot_a.device, &slot_b.device)
            && !same_device(da, db)
        {
            return Err(MergeError::DeviceMismatch {
                path: path.clone(),
                a: Box::new(da.clone()),
                b: Box::new(db.clone()),
            });
        }
        for dtype in [slot_a.dtype, slot_b.dtype].into_iter().flatten() {
            check_dtype(dtype, path)?;
        }
    }
    let a_paths: std::collections::HashSet<&str> =
        in_a.order.iter().map(|(p, _)| p.as_str()).collect();
    if let Some((path, _)) = in_b
        .order
        .iter()
        .find(|(p, _)| !a_paths.contains(p.as_str()))
    {
        return Err(MergeError::UnexpectedParam { path: path.clone() });
    }
    Ok(())
}

/// What the result takes from the original `a`, by path.
#[derive(Default)]
pub(crate) struct Originals {
    path: PathStack,
    pub(crate) leaves: HashMap<String, Leaf>,
    /// `Param<Tensor<D, Int>>` and `Param<Tensor<D, Bool>>`, type-erased over `D`.
    discrete: HashMap<String, Box<dyn Any + Send>>,
    pub(crate) flags: HashMap<String, Param<Flag>>,
}

impl Originals {
    /// `a`'s int or bool parameter at `path`, in place of `param`.
    pub(crate) fn take_discrete<T: 'static>(&mut self, path: &str, param: T) -> T {
        match self.discrete.remove(path) {
            Some(original) => original.downcast::<T>().map_or(param, |p| *p),
            None => param,
        }
    }
}

impl ModuleVisitor for Originals {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.leaves
            .insert(self.path.current(), Leaf::of(&param.val()));
    }
    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        self.discrete
            .insert(self.path.current(), Box::new(param.clone()));
    }
    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        self.discrete
            .insert(self.path.current(), Box::new(param.clone()));
    }
    fn visit_flag(&mut self, flag: &Param<Flag>) {
        self.flags.insert(self.path.current(), flag.clone());
    }
}

/// Model `b`'s float values by path, without autodiff (type-erased over the rank).
#[derive(Default)]
pub(crate) struct FloatCollector {
    path: PathStack,
    pub(crate) tensors: HashMap<String, Box<dyn Any + Send>>,
}

impl ModuleVisitor for FloatCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.tensors
            .insert(self.path.current(), Box::new(param.val().inner()));
    }
}

/// Maps the fresh copy of `a` into the merged model.
struct SlerpMapper {
    /// The configuration without its schedule; each tensor gets its own `t`.
    config: SlerpConfig,
    ts: HashMap<String, (f64, Option<usize>, f64)>,
    path: PathStack,
    originals: Originals,
    others: HashMap<String, Box<dyn Any + Send>>,
    /// The base model's float values, for task-vector merges.
    bases: Option<HashMap<String, Box<dyn Any + Send>>>,
    /// The first parameter found to hold a NaN or an infinity; nothing is computed after it.
    non_finite: Option<String>,
    /// What was computed for each float parameter, in `a`'s order.
    stats: Vec<(String, Summary)>,
}

impl SlerpMapper {
    fn take_discrete<T: 'static>(&mut self, param: T) -> T {
        self.originals.take_discrete(&self.path.current(), param)
    }
}

/// `base + slerp(a − base, b − base)`, computed in f32 (f64 for f64 tensors) and returned in
/// `a`'s dtype; `t = 0` and `t = 1` return `a` and `b` themselves.
fn task_vector_merge<const D: usize>(
    base: Tensor<D>,
    a: Tensor<D>,
    b: Tensor<D>,
    config: &SlerpConfig,
) -> Option<(Tensor<D>, Option<Summary>)> {
    let dtype = a.dtype();
    if config.t == 0.0 {
        return Some((a, None));
    }
    if config.t == 1.0 {
        return Some((b.cast(dtype), None));
    }
    let compute = if dtype == DType::F64 {
        FloatDType::F64
    } else {
        FloatDType::F32
    };
    let base = base.cast(compute);
    let (da, db) = (
        a.cast(compute).sub(base.clone()),
        b.cast(compute).sub(base.clone()),
    );
    let (out, summary) = interpolate(da, db, config, Path::Auto)?;
    Some((base.add(out).cast(dtype), summary))
}

impl ModuleMapper for SlerpMapper {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.non_finite.is_some() {
            return param;
        }
        let path = self.path.current();
        // The structure check guarantees the pair exists with the same rank and shape.
        let Some(other) = self
            .others
            .remove(&path)
            .and_then(|b| b.downcast::<Tensor<D>>().ok())
        else {
            return param;
        };
        let base = match &mut self.bases {
            Some(bases) => match bases
                .remove(&path)
                .and_then(|t| t.downcast::<Tensor<D>>().ok())
            {
                Some(base) => Some(*base),
                None => return param,
            },
            None => None,
        };
        let leaf = self.originals.leaves.get(&path).copied();
        let t = self.ts.get(&path).map_or(self.config.t, |(t, _, _)| *t);
        let config = self.config.clone().with_t(t);
        let mut summary = None;
        let mut finite = true;
        let param = param.map(|a| {
            let result = match base {
                Some(base) => task_vector_merge(base, a.clone(), *other, &config),
                None => interpolate(a.clone(), *other, &config, Path::Auto),
            };
            match result {
                Some((out, stats)) => {
                    summary = stats;
                    match leaf {
                        Some(leaf) => leaf.restore(out),
                        None => out,
                    }
                }
                None => {
                    finite = false;
                    a
                }
            }
        });
        if !finite {
            self.non_finite = Some(path);
        } else if let Some(summary) = summary {
            self.stats.push((path, summary));
        }
        param
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        self.take_discrete(param)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<D, Bool>>,
    ) -> Param<Tensor<D, Bool>> {
        self.take_discrete(param)
    }

    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        self.originals
            .flags
            .remove(&self.path.current())
            .unwrap_or(flag)
    }
}
