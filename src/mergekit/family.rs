//! mergekit's other SLERP-family methods in YAML recipes: `nuslerp`, `multislerp` and
//! `karcher`, read as mergekit 0.1.5 reads them and merged by [`SphericalMean`] over the files,
//! tensor by tensor, with mergekit's formulas evaluated in f64 from the widened inputs and
//! rounded once.
//!
//! - `weight`: per model (its `parameters`, filters matching the model's tensor name), then the
//!   top level's `parameters`; a number, a gradient over the layer position, or a filter list.
//!   nuslerp and multislerp have no default (a missing weight is an error naming the model and
//!   the tensor); the base model's weight is ignored; karcher takes none (a warning when one is
//!   given, and every input weighs the same).
//! - `eps`, `normalize_weights` (multislerp), `nuslerp_flatten`, `nuslerp_row_wise` (nuslerp),
//!   `max_iter`, `tol` (karcher): the top level's `parameters`, with mergekit's defaults;
//!   booleans and integers pick a gradient entry (`values[⌊pos·(n − 1)⌋]`). One value per
//!   recipe: a value that varies between tensors is refused, naming the parameter.
//! - Arity: nuslerp two models besides the base, multislerp two or more, karcher the models
//!   and `base_model` appended as one more input of equal weight.

use std::collections::HashMap;

use burn::tensor::DType;

use super::syntax::{
    ModelEntry, Parameters, Read, Recipe, Resolved, TValue, YamlTensor, dtype_of, layer_count,
    layer_index, no_lora, refused, resolve_value,
};
use crate::checkpoint::plan::is_float;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::module::mean::{MeanMethod, SphericalMean};

/// A member of the family other than slerp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    Nuslerp,
    Multislerp,
    Karcher,
}

impl Method {
    pub(super) fn of(name: &str) -> Option<Self> {
        match name {
            "nuslerp" => Some(Self::Nuslerp),
            "multislerp" => Some(Self::Multislerp),
            "karcher" => Some(Self::Karcher),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Nuslerp => "nuslerp",
            Self::Multislerp => "multislerp",
            Self::Karcher => "karcher",
        }
    }

    /// The parameters mergekit's method reads.
    fn reads(self) -> &'static [&'static str] {
        match self {
            Self::Nuslerp => &["weight", "nuslerp_flatten", "nuslerp_row_wise"],
            Self::Multislerp => &["weight", "normalize_weights", "eps"],
            Self::Karcher => &["max_iter", "tol"],
        }
    }
}

/// What a family recipe merges: the inputs in order, the base of the task vectors (nuslerp and
/// multislerp), and the mean with every tensor's weights.
pub(super) struct Family {
    /// The inputs, opened once, and as the recipe names them.
    pub(super) inputs: Vec<Checkpoint>,
    pub(super) names: Vec<String>,
    pub(super) base: Option<(Checkpoint, String)>,
    /// `None` for multislerp of one model, which returns it as it is.
    pub(super) mean: Option<SphericalMean>,
    /// `out_dtype`: the output's dtype (the first model's by default).
    pub(super) out_dtype: Option<DType>,
}

/// The top-level parameter `key` over every tensor: one value, or its default when no tensor
/// gets one; a value that varies between tensors is refused.
struct Single {
    key: &'static str,
    read: Read,
    value: Option<(f64, String)>,
}

impl Single {
    fn new(key: &'static str, read: Read) -> Self {
        Self {
            key,
            read,
            value: None,
        }
    }

    fn see(&mut self, name: &str, pos: f64, top: Option<&TValue>) -> Result<(), CheckpointError> {
        let levels = [("top level".to_string(), top)];
        let Some(Resolved { t, .. }) = resolve_value(name, pos, &levels, self.read) else {
            return Ok(());
        };
        match &self.value {
            None => self.value = Some((t, name.to_string())),
            Some((v, first)) if *v != t && !(v.is_nan() && t.is_nan()) => {
                return Err(refused(format!(
                    "`{}` is {v} for `{first}` and {t} for `{name}`: a value that varies between \
                     tensors is not supported",
                    self.key
                )));
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn or(&self, default: f64) -> f64 {
        self.value.as_ref().map_or(default, |(v, _)| *v)
    }
}

/// A family recipe resolved: its output tensors with their weights, the warnings, the first
/// two models' names, and what the file layer merges.
pub(super) struct Resolution {
    pub(super) tensors: Vec<YamlTensor>,
    pub(super) warnings: Vec<String>,
    pub(super) models: (String, String),
    pub(super) family: Family,
}

/// Resolves a `nuslerp`, `multislerp` or `karcher` recipe against its models (opened to read
/// their tensor names; nothing computed).
pub(super) fn resolve_family(
    recipe: Recipe,
    method: Method,
    exact: bool,
) -> Result<Resolution, CheckpointError> {
    let (models, base) = models_of(&recipe, method)?;
    let top = recipe.parameters.clone().unwrap_or_default();
    let warnings = unread_keys(method, &top, models, base.as_ref());
    // The models merged, in order (the base is not one of them).
    let others: Vec<&ModelEntry> = models
        .iter()
        .filter(|m| Some(&m.model) != base.as_ref())
        .collect();
    check_arity(method, others.len(), base.is_some())?;
    let out_dtype = out_dtype_of(&recipe, method)?;
    check_tokenizer_source(&recipe, method, &others[0].model)?;
    let first = Checkpoint::open(std::path::Path::new(&others[0].model))?;
    let Weighed {
        tensors,
        weights,
        singles,
    } = tensor_weights(&first, method, &others, &top, base.is_some())?;
    let mean_method = mean_method(method, exact, &singles)?;
    let Inputs {
        inputs,
        names,
        base: task_base,
    } = open_inputs(method, first, &others, base.as_ref())?;
    let mean = if inputs.len() == 1 {
        None
    } else {
        let mean = SphericalMean::new(vec![1.0; inputs.len()]).map_err(CheckpointError::Merge)?;
        Some(mean.with_method(mean_method).with_path_weights(weights))
    };
    check_eps(mean_method)?;
    Ok(Resolution {
        tensors,
        warnings,
        models: (
            others[0].model.clone(),
            others.get(1).map_or_else(String::new, |m| m.model.clone()),
        ),
        family: Family {
            inputs,
            names,
            base: task_base,
            mean,
            out_dtype,
        },
    })
}

/// The `models:` of a family recipe and its `base_model`; `slices:` and LoRA sources are
/// refused.
fn models_of(
    recipe: &Recipe,
    method: Method,
) -> Result<(&[ModelEntry], Option<String>), CheckpointError> {
    let name = method.name();
    if recipe.slices.is_some() {
        return Err(refused(format!(
            "`slices:` with merge_method `{name}` is not supported: list the models under \
             `models:` (every layer of each)"
        )));
    }
    let models = recipe
        .models
        .as_deref()
        .ok_or_else(|| refused("the recipe has no `models:`".into()))?;
    let base = recipe.base_model.clone();
    no_lora(models.iter().map(|m| &m.model).chain(&base))?;
    Ok((models, base))
}

/// The warnings for the keys `method` does not read: at the top level, per model, and the
/// base model's `weight`.
fn unread_keys(
    method: Method,
    top: &Parameters,
    models: &[ModelEntry],
    base: Option<&String>,
) -> Vec<String> {
    let name = method.name();
    let mut warnings = Vec::new();
    for unread in top.given_except(method.reads()) {
        warnings.push(format!(
            "`{unread}` is not a parameter of {name}; ignored, as mergekit ignores it"
        ));
    }
    for m in models {
        let Some(p) = &m.parameters else { continue };
        let keep: &[&str] = if method == Method::Karcher {
            &[]
        } else {
            &["weight"]
        };
        for unread in p.given_except(keep) {
            let why = if Some(&m.model) == base && unread == "weight" {
                "the base model's weight is not used"
            } else {
                "mergekit ignores it"
            };
            warnings.push(format!(
                "`{unread}` given for model `{}` is ignored: {why}",
                m.model
            ));
        }
        if method != Method::Karcher && Some(&m.model) == base && p.weight.is_some() {
            warnings.push(format!(
                "`weight` given for the base model `{}` is ignored, as mergekit ignores it",
                m.model
            ));
        }
    }
    if method == Method::Karcher && top.weight.is_some() {
        warnings.push(
            "`weight` is ignored by karcher, as mergekit ignores it: every input weighs the same"
                .into(),
        );
    }
    warnings
}

/// Refuses a number of models besides the base (`others`) that `method` does not merge.
fn check_arity(method: Method, others: usize, has_base: bool) -> Result<(), CheckpointError> {
    let name = method.name();
    match (method, others) {
        // mergekit's multislerp returns a lone model as it is.
        (Method::Nuslerp, 2) | (Method::Multislerp, 1..) | (Method::Karcher, 2..) => {}
        (Method::Karcher, 1) if has_base => {}
        (_, n) => {
            let wants = if method == Method::Nuslerp {
                "exactly two models besides `base_model`"
            } else {
                "at least two models"
            };
            return Err(refused(format!(
                "{name} merges {wants}; the recipe lists {n}"
            )));
        }
    }
    Ok(())
}

/// The recipe's `out_dtype`; `dtype` is refused by name.
fn out_dtype_of(recipe: &Recipe, method: Method) -> Result<Option<DType>, CheckpointError> {
    let name = method.name();
    if recipe.dtype.is_some() {
        return Err(refused(format!(
            "`dtype` (the dtype the inputs are rounded to before merging) is not supported with \
             merge_method `{name}` yet: the merge is computed in f64 from the inputs as they are; \
             `out_dtype` sets the output's dtype"
        )));
    }
    recipe
        .out_dtype
        .as_deref()
        .map(|d| dtype_of(d, "out_dtype"))
        .transpose()
}

/// Refuses a `tokenizer_source` other than the first model, whose side files the output takes.
fn check_tokenizer_source(
    recipe: &Recipe,
    method: Method,
    first: &str,
) -> Result<(), CheckpointError> {
    if recipe
        .tokenizer_source
        .as_deref()
        .is_some_and(|s| s != first)
    {
        return Err(refused(format!(
            "`tokenizer_source` with merge_method `{name}` may only name the first model, \
             `{first}`, whose side files the output takes",
            name = method.name()
        )));
    }
    Ok(())
}

/// The parameters `method` reads once per recipe, with how each one's gradient is read.
fn singles(method: Method) -> Vec<Single> {
    match method {
        Method::Nuslerp => vec![
            Single::new("nuslerp_flatten", Read::Picked),
            Single::new("nuslerp_row_wise", Read::Picked),
        ],
        Method::Multislerp => vec![
            Single::new("normalize_weights", Read::Picked),
            Single::new("eps", Read::Interpolated),
        ],
        Method::Karcher => vec![
            Single::new("max_iter", Read::Picked),
            Single::new("tol", Read::Interpolated),
        ],
    }
}

/// The top level's value of `key`, one of the parameters [`singles`] lists.
fn top_value<'p>(top: &'p Parameters, key: &str) -> Option<&'p TValue> {
    match key {
        "nuslerp_flatten" => top.nuslerp_flatten.as_ref(),
        "nuslerp_row_wise" => top.nuslerp_row_wise.as_ref(),
        "normalize_weights" => top.normalize_weights.as_ref(),
        "eps" => top.eps.as_ref(),
        "max_iter" => top.max_iter.as_ref(),
        _ => top.tol.as_ref(),
    }
}

/// What [`tensor_weights`] reads over the first model's float tensors.
struct Weighed {
    /// The output tensors, with their weights.
    tensors: Vec<YamlTensor>,
    /// The weights of each tensor, by name, for the mean.
    weights: HashMap<String, Vec<f64>>,
    /// The parameters read once per recipe, with the value every tensor got.
    singles: Vec<Single>,
}

/// Every float tensor of the first model at its layer position, with the weight of each input,
/// and the method's once-per-recipe parameters seen at each.
fn tensor_weights(
    first: &Checkpoint,
    method: Method,
    others: &[&ModelEntry],
    top: &Parameters,
    has_base: bool,
) -> Result<Weighed, CheckpointError> {
    let names = first.names();
    let layers = layer_count(&names);
    let position = |tensor: &str| match layer_index(tensor) {
        Some(_) if layers == 1 => 1.0,
        Some((i, _)) => i as f64 / (layers - 1) as f64,
        None => 0.0,
    };
    let float = |n: &str| first.entry(n).and_then(|e| e.dtype).is_some_and(is_float);
    let mut singles = singles(method);
    let mut weights: HashMap<String, Vec<f64>> = HashMap::new();
    let mut tensors = Vec::new();
    for tensor in names.iter().filter(|n| float(n)) {
        // Outside the layers: position 0.
        let pos = position(tensor);
        for single in &mut singles {
            single.see(tensor, pos, top_value(top, single.key))?;
        }
        let (row, matched) = weight_row(method, others, top, tensor, pos, has_base)?;
        tensors.push(YamlTensor {
            name: tensor.clone(),
            sources: (tensor.clone(), tensor.clone()),
            t: None,
            matched: matched.join("; "),
            position: pos,
            weights: row.clone(),
        });
        weights.insert(tensor.clone(), row);
    }
    Ok(Weighed {
        tensors,
        weights,
        singles,
    })
}

/// The weight of each input for `tensor` at layer position `pos` (each model's own, then the
/// top level's; 1 for every input of karcher, its base included), and where each came from.
fn weight_row(
    method: Method,
    others: &[&ModelEntry],
    top: &Parameters,
    tensor: &str,
    pos: f64,
    has_base: bool,
) -> Result<(Vec<f64>, Vec<String>), CheckpointError> {
    let name = method.name();
    let mut row = Vec::with_capacity(others.len() + 1);
    let mut matched = Vec::new();
    for m in others {
        if method == Method::Karcher {
            row.push(1.0);
            continue;
        }
        let levels = [
            (
                format!("model {}", m.model),
                m.parameters.as_ref().and_then(|p| p.weight.as_ref()),
            ),
            ("top level".to_string(), top.weight.as_ref()),
        ];
        let r = resolve_value(tensor, pos, &levels, Read::Interpolated).ok_or_else(|| {
            refused(format!(
                "missing weight for model `{}` at `{tensor}` (no level of the recipe gives \
                 one; {name} has no default)",
                m.model
            ))
        })?;
        if !r.t.is_finite() {
            return Err(refused(format!(
                "weight {} for model `{}` at `{tensor}` ({}, {}) is not finite",
                r.t, m.model, r.level, r.entry
            )));
        }
        matched.push(format!("{}: {}", r.level, r.entry));
        row.push(r.t);
    }
    if method == Method::Karcher && has_base {
        row.push(1.0);
    }
    Ok((row, matched))
}

/// The mean's numerics from the method's parameters, with mergekit's defaults; `exact` makes
/// karcher burn-slerp's own Karcher mean.
fn mean_method(
    method: Method,
    exact: bool,
    singles: &[Single],
) -> Result<MeanMethod, CheckpointError> {
    let value = |key: &str, default: f64| {
        singles
            .iter()
            .find(|s| s.key == key)
            .map_or(default, |s| s.or(default))
    };
    Ok(match method {
        Method::Nuslerp => {
            if value("nuslerp_flatten", 1.0) == 0.0 {
                return Err(refused(
                    "`nuslerp_flatten: false` (SLERP of the vectors along the last axis) is not \
                     supported: only flattened tensors are"
                        .into(),
                ));
            }
            if value("nuslerp_row_wise", 0.0) != 0.0 {
                return Err(refused(
                    "`nuslerp_row_wise: true` (SLERP of the vectors along the first axis) is not \
                     supported: only flattened tensors are"
                        .into(),
                ));
            }
            MeanMethod::Nuslerp
        }
        Method::Multislerp => MeanMethod::Multislerp {
            normalize_weights: value("normalize_weights", 1.0) != 0.0,
            eps: value("eps", 1e-8),
        },
        Method::Karcher if exact => MeanMethod::Karcher,
        Method::Karcher => {
            let max_iter = value("max_iter", 10.0);
            if !(max_iter >= 0.0 && max_iter.fract() == 0.0) {
                return Err(refused(format!(
                    "`max_iter: {max_iter}` is not a number of steps"
                )));
            }
            MeanMethod::MergekitKarcher {
                max_iter: max_iter as usize,
                tol: value("tol", 1e-5),
            }
        }
    })
}

/// The inputs of a family merge, opened: the models merged in order, their names, and the base
/// of the task vectors.
struct Inputs {
    inputs: Vec<Checkpoint>,
    names: Vec<String>,
    base: Option<(Checkpoint, String)>,
}

/// Opens the models after `first` (opened already) and the base: the base of the task vectors
/// for nuslerp and multislerp, one more input for karcher.
fn open_inputs(
    method: Method,
    first: Checkpoint,
    others: &[&ModelEntry],
    base: Option<&String>,
) -> Result<Inputs, CheckpointError> {
    let open = |name: &String| Checkpoint::open(std::path::Path::new(name));
    let mut names: Vec<String> = others.iter().map(|m| m.model.clone()).collect();
    let mut inputs = vec![first];
    for name in &names[1..] {
        inputs.push(open(name)?);
    }
    let base = match (method, base) {
        (Method::Karcher, Some(base)) => {
            inputs.push(open(base)?);
            names.push(base.clone());
            None
        }
        (_, Some(base)) => Some((open(base)?, base.clone())),
        (_, None) => None,
    };
    Ok(Inputs {
        inputs,
        names,
        base,
    })
}

/// Refuses multislerp's `eps` when it is not a finite number ≥ 0.
fn check_eps(mean_method: MeanMethod) -> Result<(), CheckpointError> {
    if let MeanMethod::Multislerp { eps, .. } = mean_method
        && !(eps.is_finite() && eps >= 0.0)
    {
        return Err(refused(format!("`eps: {eps}` is not a finite number ≥ 0")));
    }
    Ok(())
}
