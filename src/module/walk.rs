//! Walking modules by parameter path: the one path stack ([`ParamPath`]), the structure check
//! ([`check_structure`]) and the one pairing mapper that SLERP, task vectors and the spherical
//! mean all use: tensor by tensor ([`map_pairs`]), or every tensor's statistics first
//! ([`prepare_pairs`]) and then every write ([`apply_pairs`]).

use std::any::Any;
use std::collections::{HashMap, HashSet};

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Bool, Int, Tensor};

use crate::control::{MergeControl, Stage, Tally};
use crate::error::MergeError;
use crate::interpolate::{AutodiffState, Interpolated, TensorInfo, check_pair};

/// The dotted path of the parameter being visited (`encoder.layers.2.weight`): module names
/// pushed on entry, popped on exit. Burn's derive enters every field, the parameter leaf
/// included; `Vec`s, arrays and tuples enter their indices, enums their variant names.
#[derive(Debug, Default)]
struct ParamPath(Vec<String>);

impl ParamPath {
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

/// A visitor that is told each parameter's path; every method defaults to doing nothing.
pub(crate) trait VisitParams {
    fn float<const D: usize>(&mut self, _path: String, _param: &Param<Tensor<D>>) {}
    fn int<const D: usize>(&mut self, _path: String, _param: &Param<Tensor<D, Int>>) {}
    fn bool<const D: usize>(&mut self, _path: String, _param: &Param<Tensor<D, Bool>>) {}
    fn flag(&mut self, _path: String, _flag: &Param<Flag>) {}
}

/// Runs `visitor` over every parameter of `module`, with its path.
pub(crate) fn visit<M: Module, V: VisitParams>(module: &M, visitor: &mut V) {
    struct WithPath<'v, V> {
        path: ParamPath,
        inner: &'v mut V,
    }
    impl<V: VisitParams> ModuleVisitor for WithPath<'_, V> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.inner.float(self.path.current(), param);
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            self.inner.int(self.path.current(), param);
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
            self.inner.bool(self.path.current(), param);
        }
        fn visit_flag(&mut self, flag: &Param<Flag>) {
            self.inner.flag(self.path.current(), flag);
        }
    }
    module.visit(&mut WithPath {
        path: ParamPath::default(),
        inner: visitor,
    });
}

/// The kind of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Float,
    Int,
    Bool,
    Flag,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Float => "float",
            Kind::Int => "int",
            Kind::Bool => "bool",
            Kind::Flag => "flag",
        }
    }
}

/// One parameter as the structure check sees it; nothing is initialised to read it.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) path: String,
    pub(crate) kind: Kind,
    pub(crate) info: TensorInfo,
}

/// Every parameter of a module, in visiting order, and the first path seen twice.
#[derive(Debug, Default)]
pub(crate) struct Structure {
    pub(crate) slots: Vec<Slot>,
    seen: HashSet<String>,
    duplicate: Option<String>,
}

impl Structure {
    pub(crate) fn of<M: Module>(module: &M) -> Self {
        let mut structure = Self::default();
        visit(module, &mut structure);
        structure
    }

    fn add(&mut self, path: String, kind: Kind, info: TensorInfo) {
        if !self.seen.insert(path.clone()) && self.duplicate.is_none() {
            self.duplicate = Some(path.clone());
        }
        self.slots.push(Slot { path, kind, info });
    }

    /// The float parameters.
    pub(crate) fn floats(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.kind == Kind::Float)
    }
}

impl VisitParams for Structure {
    fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
        // The dtype is known only once a tensor exists; lazy ones take the device default.
        let info = TensorInfo {
            shape: param.lazy_shape().as_slice().to_vec(),
            device: Some(param.lazy_device()),
            dtype: param.is_initialized().then(|| param.val().dtype()),
        };
        self.add(path, Kind::Float, info);
    }
    fn int<const D: usize>(&mut self, path: String, param: &Param<Tensor<D, Int>>) {
        self.add(path, Kind::Int, shape_only(param.lazy_shape().as_slice()));
    }
    fn bool<const D: usize>(&mut self, path: String, param: &Param<Tensor<D, Bool>>) {
        self.add(path, Kind::Bool, shape_only(param.lazy_shape().as_slice()));
    }
    fn flag(&mut self, path: String, _flag: &Param<Flag>) {
        self.add(path, Kind::Flag, shape_only(&[]));
    }
}

fn shape_only(shape: &[usize]) -> TensorInfo {
    TensorInfo {
        shape: shape.to_vec(),
        device: None,
        dtype: None,
    }
}

/// Everything a merge checks before computing anything: `first` and each of `others` (each
/// named for messages: `a`, `b`, `base`, the index of a model in a mean) hold the same parameter paths, each once, of the same kinds
/// and shapes, float tensors on one device in dtypes that can be computed in. Errors name the
/// first offending parameter in `first`'s order. Returns `first`'s structure.
pub(crate) fn check_structure<M: Module>(
    (first_name, first): (&str, &M),
    others: &[(&str, &M)],
) -> Result<Structure, MergeError> {
    let structure = Structure::of(first);
    let duplicate = |s: &Structure, model: &str| match &s.duplicate {
        Some(path) => Err(MergeError::DuplicateParam {
            path: path.clone(),
            model: model.to_string(),
        }),
        None => Ok(()),
    };
    duplicate(&structure, first_name)?;
    for (name, other) in others {
        let theirs = Structure::of(*other);
        duplicate(&theirs, name)?;
        let by_path: HashMap<&str, &Slot> =
            theirs.slots.iter().map(|s| (s.path.as_str(), s)).collect();
        for mine in &structure.slots {
            let path = &mine.path;
            let Some(their) = by_path.get(path.as_str()) else {
                return Err(MergeError::MissingParam { path: path.clone() });
            };
            if mine.kind != their.kind {
                return Err(MergeError::KindMismatch {
                    path: path.clone(),
                    a: mine.kind.name(),
                    b: their.kind.name(),
                });
            }
            check_pair(path, &mine.info, &their.info)?;
        }
        if let Some(extra) = theirs
            .slots
            .iter()
            .find(|s| !structure.seen.contains(&s.path))
        {
            return Err(MergeError::UnexpectedParam {
                path: extra.path.clone(),
            });
        }
    }
    Ok(structure)
}

/// What the result takes from the first model as it is, by path: the autodiff state of its
/// float tensors, its int and bool parameters, its flags.
#[derive(Default)]
struct Inherited {
    autodiff: HashMap<String, AutodiffState>,
    /// `Param<Tensor<D, Int>>` and `Param<Tensor<D, Bool>>`, type-erased over `D`.
    discrete: HashMap<String, Box<dyn Any + Send>>,
    flags: HashMap<String, Param<Flag>>,
}

impl Inherited {
    /// The original parameter at `path`, in place of `param`.
    fn take_discrete<T: 'static>(&mut self, path: &str, param: T) -> T {
        match self.discrete.remove(path) {
            Some(original) => original.downcast::<T>().map_or(param, |p| *p),
            None => param,
        }
    }
}

impl VisitParams for Inherited {
    fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
        self.autodiff.insert(path, AutodiffState::of(&param.val()));
    }
    fn int<const D: usize>(&mut self, path: String, param: &Param<Tensor<D, Int>>) {
        self.discrete.insert(path, Box::new(param.clone()));
    }
    fn bool<const D: usize>(&mut self, path: String, param: &Param<Tensor<D, Bool>>) {
        self.discrete.insert(path, Box::new(param.clone()));
    }
    fn flag(&mut self, path: String, flag: &Param<Flag>) {
        self.flags.insert(path, flag.clone());
    }
}

/// A model's float values by path, without autodiff (type-erased over the rank).
#[derive(Default)]
pub(crate) struct FloatTensors(HashMap<String, Box<dyn Any + Send>>);

impl FloatTensors {
    /// The float values of `module` as [`Module::valid`] gives them: running statistics left
    /// pending by a training step folded in, no autodiff.
    pub(crate) fn of<M: Module>(module: &M) -> Self {
        let mut tensors = Self::default();
        visit(&module.valid(), &mut tensors);
        tensors
    }

    fn take<const D: usize>(&mut self, path: &str) -> Option<Tensor<D>> {
        self.0
            .remove(path)
            .and_then(|t| t.downcast::<Tensor<D>>().ok())
            .map(|t| *t)
    }

    /// A handle on the tensor at `path`, which stays here.
    fn get<const D: usize>(&self, path: &str) -> Option<Tensor<D>> {
        self.0
            .get(path)
            .and_then(|t| t.downcast_ref::<Tensor<D>>())
            .cloned()
    }
}

impl VisitParams for FloatTensors {
    fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
        self.0.insert(path, Box::new(param.val().inner()));
    }
}

/// The bytes of a tensor's values in its dtype.
fn byte_size<const D: usize>(tensor: &Tensor<D>) -> u64 {
    (tensor.shape().num_elements() * tensor.dtype().size()) as u64
}

/// The first model of a walk: borrowed (the result is new, the model untouched) or owned (the
/// result is written over its tensors where nothing else holds them).
pub(crate) enum Model<'m, M> {
    Borrowed(&'m M),
    Owned(M),
}

impl<M: Module> Model<'_, M> {
    pub(crate) fn get(&self) -> &M {
        match self {
            Model::Borrowed(m) => m,
            Model::Owned(m) => m,
        }
    }

    /// What the result inherits, and the module to map into the result: [`Module::valid`]'s
    /// fresh copy (fresh running-state cells, so that the caller's model and its clones are
    /// never written; pending running statistics folded in). An owned model is dropped once
    /// copied, so that the copy's tensors are held by the copy alone, unless a clone of the
    /// model, an autodiff graph or a file buffer holds them too.
    fn into_fresh(self) -> (M, Inherited) {
        let mut inherited = Inherited::default();
        visit(self.get(), &mut inherited);
        let fresh = self.get().valid();
        drop(self);
        (fresh, inherited)
    }
}

/// What [`map_pairs`] does with each float tensor of the first model.
pub(crate) trait Combine {
    /// What it learns of each tensor.
    type Stats;
    /// What a statistics pass leaves for the write pass of each tensor.
    type Prepared: Send + 'static;

    /// Combines the first model's tensor at `path` with the other models' tensors there, in
    /// the order the models were given; all of one shape and device, without autodiff. The
    /// first tensor is handed over by value, and nothing else in the walk holds it.
    ///
    /// [`Interpolated::NonFinite`] (with a tensor of the first model's shape) when an input
    /// holds a NaN or an infinity: the walk then combines nothing more.
    fn combine<const D: usize>(
        &mut self,
        path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Interpolated<D, Self::Stats>;

    /// The statistics pass of one tensor ([`prepare_pairs`]): everything [`Combine::apply`]
    /// needs, with nothing written; `None` when an input holds a NaN or an infinity.
    fn prepare<const D: usize>(
        &mut self,
        path: &str,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> Option<(Self::Prepared, Option<Self::Stats>)>;

    /// The write pass of one tensor ([`apply_pairs`]), with what its statistics pass prepared;
    /// it cannot fail. The same bits as [`Combine::combine`].
    fn apply<const D: usize>(
        &mut self,
        path: &str,
        prepared: Self::Prepared,
        first: Tensor<D>,
        others: Vec<Tensor<D>>,
    ) -> (Tensor<D>, Option<Self::Stats>);
}

/// Why a walk stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The parameter at this path holds a NaN or an infinity.
    NonFinite(String),
    /// The control's flag was set.
    Cancelled,
}

impl Stop {
    pub(crate) fn into_error(self) -> MergeError {
        match self {
            Stop::NonFinite(path) => MergeError::NonFinite { path },
            Stop::Cancelled => MergeError::Cancelled,
        }
    }
}

/// The result of [`map_pairs`] and [`apply_pairs`].
pub(crate) struct Mapped<M, S> {
    /// The first model, each float tensor combined.
    pub(crate) module: M,
    /// What was learnt of each combined tensor, in the first model's order.
    pub(crate) stats: Vec<(String, S)>,
    /// Why nothing was combined after some tensor, if it was not.
    pub(crate) stop: Option<Stop>,
}

/// What the walks count progress against: the float tensors of `structure` and their bytes
/// (lazy tensors of unknown dtype counted at 4 bytes per value).
pub(crate) fn totals(structure: &Structure) -> (usize, u64) {
    structure.floats().fold((0, 0), |(n, bytes), slot| {
        let numel: usize = slot.info.shape.iter().product();
        let size = slot.info.dtype.map_or(4, |d| d.size());
        (n + 1, bytes + (numel * size) as u64)
    })
}

/// Pairs `others` with `first` by path (checked by [`check_structure`] beforehand) and maps
/// [`Model::into_fresh`]'s copy of `first` into the result, tensor by tensor: each float tensor
/// through [`Combine::combine`], int and bool parameters, flags and the autodiff state of float
/// tensors from `first` as it is. The control is told of each tensor and read before each.
pub(crate) fn map_pairs<M: Module, C: Combine>(
    first: Model<'_, M>,
    others: &[&M],
    combine: &mut C,
    control: &mut MergeControl<'_>,
    totals: (usize, u64),
) -> Mapped<M, C::Stats> {
    let others = others.iter().map(|m| FloatTensors::of(*m)).collect();
    let (fresh, inherited) = first.into_fresh();
    let mut mapper = PairingMapper {
        combine,
        pass: Pass::Combine,
        path: ParamPath::default(),
        inherited,
        others,
        stop: None,
        stats: Vec::new(),
        control,
        tally: Tally::new(Stage::Combine, totals.0, totals.1),
        cancellable: true,
    };
    let module = fresh.map(&mut mapper);
    Mapped {
        module,
        stats: mapper.stats,
        stop: mapper.stop,
    }
}

/// The statistics pass of a walk that reads every tensor before it writes any: each float
/// tensor of `first` (as [`Module::valid`] gives it) through [`Combine::prepare`], nothing
/// written. The control is read before each tensor and told after it.
pub(crate) struct Prepass<P, S> {
    /// What each float tensor's write pass needs, by path.
    pub(crate) prepared: HashMap<String, P>,
    /// What was learnt of each tensor, in the first model's order.
    pub(crate) stats: Vec<(String, S)>,
    /// Why the pass stopped before its end, if it did.
    pub(crate) stop: Option<Stop>,
    /// The other models' tensors, for the write pass.
    others: Vec<FloatTensors>,
}

pub(crate) fn prepare_pairs<M: Module, C: Combine>(
    first: &M,
    others: &[&M],
    combine: &mut C,
    control: &mut MergeControl<'_>,
    totals: (usize, u64),
) -> Prepass<C::Prepared, C::Stats> {
    struct Preparer<'c, 'k, C: Combine> {
        combine: &'c mut C,
        others: &'c [FloatTensors],
        pass: Prepass<C::Prepared, C::Stats>,
        control: &'c mut MergeControl<'k>,
        tally: Tally,
    }
    impl<C: Combine> VisitParams for Preparer<'_, '_, C> {
        fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
            if self.pass.stop.is_some() {
                return;
            }
            if self.control.cancelled() {
                self.pass.stop = Some(Stop::Cancelled);
                return;
            }
            let Some(others) = self
                .others
                .iter()
                .map(|o| o.get::<D>(&path))
                .collect::<Option<Vec<_>>>()
            else {
                return;
            };
            let first = param.val();
            let bytes = byte_size(&first);
            match self.combine.prepare(&path, first, others) {
                Some((prepared, stats)) => {
                    self.tally.done(self.control, &path, bytes);
                    if let Some(stats) = stats {
                        self.pass.stats.push((path.clone(), stats));
                    }
                    self.pass.prepared.insert(path, prepared);
                }
                None => self.pass.stop = Some(Stop::NonFinite(path)),
            }
        }
    }
    let others: Vec<FloatTensors> = others.iter().map(|m| FloatTensors::of(*m)).collect();
    let mut preparer = Preparer {
        combine,
        others: &others,
        pass: Prepass {
            prepared: HashMap::new(),
            stats: Vec::new(),
            stop: None,
            others: Vec::new(),
        },
        control,
        tally: Tally::new(Stage::Statistics, totals.0, totals.1),
    };
    // The values the write pass will see: `valid()` of `first`, dropped before it starts.
    visit(&first.valid(), &mut preparer);
    let mut pass = preparer.pass;
    pass.others = others;
    pass
}

/// The write pass after [`prepare_pairs`]: maps [`Model::into_fresh`]'s copy of `first` into
/// the result, each float tensor through [`Combine::apply`] with what was prepared for it (the
/// same inheritance as [`map_pairs`]). Nothing can fail, and the control is told of each
/// tensor but not read: a consuming walk is past its point of no return.
pub(crate) fn apply_pairs<M: Module, C: Combine>(
    first: Model<'_, M>,
    prepass: Prepass<C::Prepared, C::Stats>,
    combine: &mut C,
    control: &mut MergeControl<'_>,
    totals: (usize, u64),
) -> Mapped<M, C::Stats> {
    let (fresh, inherited) = first.into_fresh();
    let mut mapper = PairingMapper {
        combine,
        pass: Pass::Apply(prepass.prepared),
        path: ParamPath::default(),
        inherited,
        others: prepass.others,
        stop: None,
        stats: prepass.stats,
        control,
        tally: Tally::new(Stage::Combine, totals.0, totals.1),
        cancellable: false,
    };
    let module = fresh.map(&mut mapper);
    Mapped {
        module,
        stats: mapper.stats,
        stop: mapper.stop,
    }
}

/// How the mapper makes each float tensor.
enum Pass<P> {
    /// [`Combine::combine`], tensor by tensor.
    Combine,
    /// [`Combine::apply`], with what the statistics pass prepared for each path.
    Apply(HashMap<String, P>),
}

struct PairingMapper<'c, 'k, C: Combine> {
    combine: &'c mut C,
    pass: Pass<C::Prepared>,
    path: ParamPath,
    inherited: Inherited,
    others: Vec<FloatTensors>,
    stop: Option<Stop>,
    stats: Vec<(String, C::Stats)>,
    control: &'c mut MergeControl<'k>,
    tally: Tally,
    /// Whether the control's flag is read before each tensor.
    cancellable: bool,
}

impl<C: Combine> ModuleMapper for PairingMapper<'_, '_, C> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.stop.is_some() {
            return param;
        }
        if self.cancellable && self.control.cancelled() {
            self.stop = Some(Stop::Cancelled);
            return param;
        }
        let path = self.path.current();
        // The structure check guarantees every other model has the tensor, of the same rank.
        let Some(others) = self
            .others
            .iter_mut()
            .map(|o| o.take::<D>(&path))
            .collect::<Option<Vec<_>>>()
        else {
            return param;
        };
        let autodiff = self.inherited.autodiff.get(&path).copied();
        let mut learnt = None;
        let mut finite = true;
        let mut bytes = 0;
        let combine = &mut *self.combine;
        let pass = &mut self.pass;
        let param = param.map(|first| {
            bytes = byte_size(&first);
            let out = match pass {
                Pass::Combine => match combine.combine(&path, first, others) {
                    Interpolated::Done(out, stats) => {
                        learnt = stats;
                        out
                    }
                    Interpolated::NonFinite(first) => {
                        finite = false;
                        return first;
                    }
                },
                Pass::Apply(prepared) => {
                    let prepared = prepared.remove(&path).expect("prepared in the first pass");
                    let (out, stats) = combine.apply(&path, prepared, first, others);
                    learnt = stats;
                    out
                }
            };
            match autodiff {
                Some(state) => state.restore(out),
                None => out,
            }
        });
        if !finite {
            self.stop = Some(Stop::NonFinite(path));
            return param;
        }
        self.tally.done(self.control, &path, bytes);
        if let Some(stats) = learnt {
            self.stats.push((path, stats));
        }
        param
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        self.inherited.take_discrete(&self.path.current(), param)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<D, Bool>>,
    ) -> Param<Tensor<D, Bool>> {
        self.inherited.take_discrete(&self.path.current(), param)
    }

    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        self.inherited
            .flags
            .remove(&self.path.current())
            .unwrap_or(flag)
    }
}
