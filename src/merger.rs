//! [`SlerpMerger`]: pairs two modules' parameters by path, checks the whole structure, then maps
//! model `a` into the merged model.

use std::any::Any;
use std::collections::HashMap;

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Bool, DType, Device, Int, Tensor};

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
        check_structure(a, b)?;

        // What the result takes from `a` as it is: int and bool params, flags, autodiff state.
        let mut originals = Originals::default();
        a.visit(&mut originals);
        // `valid()` builds fresh running-state cells: mapping a plain clone of `a` would write
        // the merged BatchNorm statistics into `a`'s own (clones share them).
        let fresh_a = a.valid();
        let mut others = FloatCollector::default();
        b.valid().visit(&mut others);

        let mut mapper = SlerpMapper {
            config: &self.config,
            path: PathStack::default(),
            originals,
            others: others.tensors,
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

/// A stack of module names, joined into dotted paths.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn push(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn pop(&mut self) {
        self.0.pop();
    }
    fn current(&self) -> String {
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
fn check_structure<M: Module>(a: &M, b: &M) -> Result<(), MergeError> {
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
struct Originals {
    path: PathStack,
    leaves: HashMap<String, Leaf>,
    /// `Param<Tensor<D, Int>>` and `Param<Tensor<D, Bool>>`, type-erased over `D`.
    discrete: HashMap<String, Box<dyn Any + Send>>,
    flags: HashMap<String, Param<Flag>>,
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
struct FloatCollector {
    path: PathStack,
    tensors: HashMap<String, Box<dyn Any + Send>>,
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
struct SlerpMapper<'a> {
    config: &'a SlerpConfig,
    path: PathStack,
    originals: Originals,
    others: HashMap<String, Box<dyn Any + Send>>,
    /// The first parameter found to hold a NaN or an infinity; nothing is computed after it.
    non_finite: Option<String>,
    /// What was computed for each float parameter, in `a`'s order.
    stats: Vec<(String, Summary)>,
}

impl SlerpMapper<'_> {
    fn take_discrete<T: 'static>(&mut self, param: T) -> T {
        match self.originals.discrete.remove(&self.path.current()) {
            Some(original) => original.downcast::<T>().map_or(param, |p| *p),
            None => param,
        }
    }
}

impl ModuleMapper for SlerpMapper<'_> {
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
        let leaf = self.originals.leaves.get(&path).copied();
        let config = self.config;
        let mut summary = None;
        let mut finite = true;
        let param = param.map(
            |a| match interpolate(a.clone(), *other, config, Path::Auto) {
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
            },
        );
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
