//! mergekit YAML recipes (`merge_method: slerp`), read as they are and merged as mergekit 0.1.5
//! merges them: `models:` or `slices:` of `sources:` with `layer_range`, `base_model` as the
//! `t = 0` side, `t` from the slice's `parameters`, then the top level (numbers, gradients, or
//! lists of `{filter, value}` entries matched by substring), `dtype` and `out_dtype`.
//!
//! Parsed with serde-saphyr, a maintained YAML deserializer for serde built on the saphyr parser
//! (`serde_yaml` and `serde_yml` are unmaintained); every struct denies unknown keys, so a key
//! this reader does not know is an error naming it (mergekit ignores such keys).

use std::path::Path;

use burn::tensor::{DType, Device};
use serde::Deserialize;

use super::family::{Family, Method, Resolution, resolve_family};
use super::syntax::{
    Parameters, Recipe, Resolved, YamlTensor, after_layers, dtype_of, layer_index, refused,
    renumber, resolve,
};
use crate::checkpoint::plan::is_float;
use crate::checkpoint::plan::{Listed, Listing, check_listed};
use crate::checkpoint::{
    Checkpoint, CheckpointError, FileMerge, FilePlan, OutDType, Progress, TokenizerSource,
};
use crate::config::{Granularity, SlerpConfig, ZeroNorm};
use crate::module::mean::MeanStats;
use crate::report::MergeReport;

/// A recipe resolved against its models: what [`yaml_files`] writes.
pub struct YamlPlan {
    /// Every output tensor, in A's order within each slice.
    pub tensors: Vec<YamlTensor>,
    /// Keys mergekit reads but ignores for slerp (source-level and per-model `t`).
    pub warnings: Vec<String>,
    /// The models, as the recipe names them: A (`base_model`) and B.
    pub models: (String, String),
    inputs: Option<(Checkpoint, Checkpoint)>,
    out_dtype: Option<DType>,
    input_dtype: Option<DType>,
    tokenizer_source: TokenizerSource,
    layers: Option<Vec<usize>>,
    exact: bool,
    /// What a `nuslerp`, `multislerp` or `karcher` recipe merges.
    family: Option<Family>,
}

impl YamlPlan {
    /// The plan of a `nuslerp`, `multislerp` or `karcher` recipe.
    fn family(resolution: Resolution) -> Self {
        let Resolution {
            tensors,
            warnings,
            models,
            family,
        } = resolution;
        Self {
            tensors,
            warnings,
            models,
            inputs: None,
            out_dtype: None,
            input_dtype: None,
            tokenizer_source: TokenizerSource::A,
            layers: None,
            exact: false,
            family: Some(family),
        }
    }

    /// Whether the recipe is a mean (`nuslerp`, `multislerp`, `karcher`) rather than `slerp`:
    /// [`yaml_files`] then returns [`YamlResult::Mean`].
    pub fn is_mean(&self) -> bool {
        self.family.is_some()
    }
}

impl std::fmt::Display for YamlPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(family) = &self.family {
            writeln!(f, "inputs: {}", family.names.join(", "))?;
            if let Some((_, base)) = &family.base {
                writeln!(f, "base of the task vectors: {base}")?;
            }
            for t in &self.tensors {
                let matched = if t.matched.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", t.matched)
                };
                writeln!(
                    f,
                    "{}  weights {:?}  offset {:.4}{matched}",
                    t.name, t.weights, t.position
                )?;
            }
            for w in &self.warnings {
                writeln!(f, "warning: {w}")?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "A (base_model, t = 0): {}; B: {}",
            self.models.0, self.models.1
        )?;
        for t in &self.tensors {
            let sources = if t.sources.0 == t.name && t.sources.1 == t.name {
                String::new()
            } else {
                format!(" <- A:{} B:{}", t.sources.0, t.sources.1)
            };
            match t.t {
                Some(v) => writeln!(
                    f,
                    "{}{sources}  t={v:.6}  ({})  offset {:.4}",
                    t.name, t.matched, t.position
                )?,
                None => writeln!(f, "{}{sources}  copied from A", t.name)?,
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Reads a mergekit YAML recipe and resolves it against its models (opened, nothing computed).
/// `exact` switches mergekit's numerics (threshold `|cos| > 0.9995` → lerp, a zero norm counted
/// as 1) to burn-slerp's exact SLERP and its zero-norm lerp.
///
/// # Errors
///
/// [`CheckpointError::Recipe`] for a recipe this reader refuses (another `merge_method`,
/// `modules:`, LoRA sources, `tokenizer:`, `chat_template`, `tokenizer_source: union`, `t`
/// outside [0, 1], a key it does not know, a tensor no `t` covers), and the errors of opening
/// the models.
pub fn plan_yaml(recipe: &Path, exact: bool) -> Result<YamlPlan, CheckpointError> {
    let text = std::fs::read_to_string(recipe).map_err(|source| CheckpointError::Io {
        path: recipe.to_path_buf(),
        source,
    })?;
    let format = |e: serde_saphyr::Error| CheckpointError::Format {
        path: recipe.to_path_buf(),
        message: format!("not a recipe this reader knows: {e}"),
    };
    // The method first: a recipe for another method is refused for that, not for a key of its
    // own this reader does not know.
    let method: MethodOnly = serde_saphyr::from_str(&text).map_err(format)?;
    let family = match method.merge_method.as_deref() {
        Some("slerp") => None,
        Some(other) => Some(Method::of(other).ok_or_else(|| unsupported_method(other))?),
        None => return Err(refused("the recipe has no `merge_method`".into())),
    };
    let parsed: Recipe = serde_saphyr::from_str(&text).map_err(format)?;
    common_refusals(&parsed)?;
    match family {
        Some(method) => resolve_family(parsed, method, exact).map(YamlPlan::family),
        None => resolve_recipe(parsed, exact),
    }
}

/// The keys refused whatever the method, with what to do instead.
fn common_refusals(recipe: &Recipe) -> Result<(), CheckpointError> {
    if recipe.modules.is_some() {
        return Err(refused(
            "`modules:` is not supported; merge each model separately".into(),
        ));
    }
    if recipe.tokenizer.is_some() {
        return Err(refused(
            "`tokenizer:` is not supported: the tokenizer is copied from one input \
             (`tokenizer_source: base`, or the other model)"
                .into(),
        ));
    }
    if recipe.chat_template.is_some() {
        return Err(refused(
            "`chat_template` is not supported: the chat template comes with the tokenizer source's files"
                .into(),
        ));
    }
    Ok(())
}

/// The one key read before the others.
#[derive(Debug, Deserialize)]
struct MethodOnly {
    #[serde(default)]
    merge_method: Option<String>,
}

fn unsupported_method(method: &str) -> CheckpointError {
    refused(format!(
        "merge_method `{method}` is not supported: only the SLERP family is (`slerp`, `nuslerp`, \
         `multislerp`, `karcher`); for other means of N models see `burn-slerp mean --method`"
    ))
}

/// The recipe against its models, opened here.
fn resolve_recipe(recipe: Recipe, exact: bool) -> Result<YamlPlan, CheckpointError> {
    if recipe.merge_method != "slerp" {
        return Err(unsupported_method(&recipe.merge_method));
    }
    let base = recipe
        .base_model
        .clone()
        .ok_or_else(|| refused("slerp needs `base_model` (the model at t = 0)".into()))?;
    let mut warnings = Vec::new();
    let mut levels_given: Vec<(String, &Parameters)> = Vec::new();
    levels_given.extend(
        recipe
            .parameters
            .iter()
            .map(|p| ("the top level".to_string(), p)),
    );
    for (i, slice) in recipe.slices.iter().flatten().enumerate() {
        levels_given.extend(slice.parameters.iter().map(|p| (format!("slice {i}"), p)));
    }
    for (level, p) in levels_given {
        for unread in p.given_except(&["t"]) {
            warnings.push(format!(
                "`{unread}` at {level} is not a parameter of slerp; ignored, as mergekit ignores it"
            ));
        }
    }
    // (A's range, B's range, parameters) per slice; `None` ranges: every layer.
    type Slice = (Option<[usize; 2]>, Option<[usize; 2]>, Option<Parameters>);
    let (other, slices): (String, Vec<Slice>) = match (&recipe.models, &recipe.slices) {
        (Some(_), Some(_)) => {
            return Err(refused("give `models:` or `slices:`, not both".into()));
        }
        (None, None) => {
            return Err(refused(
                "the recipe has neither `models:` nor `slices:`".into(),
            ));
        }
        (Some(models), None) => {
            for m in models {
                if m.parameters.as_ref().is_some_and(|p| p.t.is_some()) {
                    warnings.push(format!(
                        "the `t` given for model `{}` is ignored, as mergekit ignores it",
                        m.model
                    ));
                }
            }
            let others: Vec<&String> = models
                .iter()
                .map(|m| &m.model)
                .filter(|m| **m != base)
                .collect();
            let other = match others.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(refused(format!(
                        "slerp merges `base_model` with exactly one other model; `models:` lists {}",
                        models.len()
                    )));
                }
            };
            (other, vec![(None, None, None)])
        }
        (None, Some(slices)) => {
            let mut other: Option<String> = None;
            let mut out = Vec::new();
            for (i, slice) in slices.iter().enumerate() {
                if slice.sources.len() != 2 {
                    return Err(refused(format!(
                        "slice {i} has {} sources; slerp takes two",
                        slice.sources.len()
                    )));
                }
                let mut a = None;
                let mut b = None;
                for source in &slice.sources {
                    if source.parameters.as_ref().is_some_and(|p| p.t.is_some()) {
                        warnings.push(format!(
                            "the `t` given for source `{}` of slice {i} is ignored, as mergekit ignores it",
                            source.model
                        ));
                    }
                    if source.model == base && a.is_none() {
                        a = Some(source.layer_range);
                    } else {
                        if other.as_ref().is_some_and(|o| *o != source.model) {
                            return Err(refused(format!(
                                "slice {i} merges `{}`, another model than the earlier slices' `{}`",
                                source.model,
                                other.unwrap_or_default()
                            )));
                        }
                        other = Some(source.model.clone());
                        b = Some(source.layer_range);
                    }
                }
                let (Some(ra), Some(rb)) = (a, b) else {
                    return Err(refused(format!(
                        "slice {i} does not take one source from `base_model` and one from the other model"
                    )));
                };
                if let (Some(x), Some(y)) = (ra, rb)
                    && x[1].saturating_sub(x[0]) != y[1].saturating_sub(y[0])
                {
                    return Err(refused(format!(
                        "slice {i}: layer_range {x:?} and {y:?} are not the same length"
                    )));
                }
                out.push((ra, rb, slice.parameters.clone()));
            }
            (
                other.ok_or_else(|| refused("no slice names a second model".into()))?,
                out,
            )
        }
    };
    for model in [&base, &other] {
        if model.contains('+') {
            return Err(refused(format!(
                "`{model}`: LoRA sources (`model+lora`) are not supported; merge the adapter into the model first"
            )));
        }
    }
    let tokenizer_source = match recipe.tokenizer_source.as_deref() {
        None | Some("base") => TokenizerSource::A,
        Some(m) if m == other => TokenizerSource::B,
        Some(m) if m == base => TokenizerSource::A,
        Some("union") => {
            return Err(refused(
                "`tokenizer_source: union` is not supported: it rebuilds the embeddings; give \
                 `base` or one of the models"
                    .into(),
            ));
        }
        Some(m) => {
            return Err(refused(format!(
                "`tokenizer_source: {m}` is not supported: give `base` or one of the models"
            )));
        }
    };
    let input_dtype = recipe
        .dtype
        .as_deref()
        .map(|d| dtype_of(d, "dtype"))
        .transpose()?;
    let out_dtype = match recipe.out_dtype.as_deref() {
        Some(d) => Some(dtype_of(d, "out_dtype")?),
        None => input_dtype,
    };
    let open = |model: &str| Checkpoint::open(Path::new(model));
    let (a, b) = (open(&base)?, open(&other)?);

    let layers_of = |c: &Checkpoint| {
        c.names()
            .iter()
            .filter_map(|n| layer_index(n).map(|(i, _)| i + 1))
            .max()
            .unwrap_or(0)
    };
    let (la, lb) = (layers_of(&a), layers_of(&b));
    let ranges: Vec<([usize; 2], [usize; 2], Option<Parameters>)> = slices
        .into_iter()
        .map(|(ra, rb, p)| (ra.unwrap_or([0, la]), rb.unwrap_or([0, lb]), p))
        .collect();
    for (i, (ra, rb, _)) in ranges.iter().enumerate() {
        if ra[1] > la || rb[1] > lb || ra[0] >= ra[1] {
            return Err(refused(format!(
                "slice {i}: layer_range {ra:?} / {rb:?} does not fit the models' {la} / {lb} layers"
            )));
        }
    }
    let architecture = a
        .folder()
        .and_then(|f| std::fs::read_to_string(f.join("config.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_default();

    let levels = |slice: usize| -> Vec<(String, Option<&Parameters>)> {
        vec![
            (format!("slice {slice}"), ranges[slice].2.as_ref()),
            ("top level".to_string(), recipe.parameters.as_ref()),
        ]
    };
    let missing = |name: &str| {
        refused(format!(
            "missing t for `{name}` (no level of the recipe gives one)"
        ))
    };
    let check_t = |r: &Resolved, name: &str| {
        if r.t.is_finite() && (0.0..=1.0).contains(&r.t) {
            Ok(())
        } else {
            Err(refused(format!(
                "t = {} for `{name}` ({}, {}) is outside [0, 1]",
                r.t, r.level, r.entry
            )))
        }
    };
    let mut tensors = Vec::new();
    let names = a.names();
    let float = |c: &Checkpoint, n: &str| c.entry(n).and_then(|e| e.dtype).is_some_and(is_float);
    let last = ranges.len() - 1;
    // Tensors outside the layers: before them, then the layers slice by slice, then after.
    let outside: Vec<&String> = names.iter().filter(|n| layer_index(n).is_none()).collect();
    let mut after = Vec::new();
    for name in &outside {
        let is_after = after_layers(&architecture, name);
        let resolved = if float(&a, name) {
            let first = resolve(name, 0.0, &levels(0)).ok_or_else(|| missing(name))?;
            let chosen = match is_after {
                Some(true) => resolve(name, 0.0, &levels(last)).ok_or_else(|| missing(name))?,
                Some(false) => first,
                None => {
                    let other = resolve(name, 0.0, &levels(last)).ok_or_else(|| missing(name))?;
                    if other.t != first.t {
                        return Err(refused(format!(
                            "`{name}` lies outside the layers of an architecture this reader \
                             does not know (`{architecture}`): mergekit would take its t from \
                             the first slice ({}), and the last slice gives {}; make them agree",
                            first.t, other.t
                        )));
                    }
                    first
                }
            };
            check_t(&chosen, name)?;
            Some(chosen)
        } else {
            None
        };
        let tensor = YamlTensor {
            name: (*name).clone(),
            sources: ((*name).clone(), (*name).clone()),
            t: resolved.as_ref().map(|r| r.t),
            matched: resolved
                .map(|r| format!("{}, {}", r.level, r.entry))
                .unwrap_or_default(),
            position: 0.0,
            weights: Vec::new(),
        };
        if is_after == Some(true) {
            after.push(tensor);
        } else {
            tensors.push(tensor);
        }
    }
    let mut layers = Vec::new();
    let mut counter = 0;
    for (s, (ra, rb, _)) in ranges.iter().enumerate() {
        let len = ra[1] - ra[0];
        for k in 0..len {
            let pos = if len == 1 {
                1.0
            } else {
                k as f64 / (len - 1) as f64
            };
            let (la_k, lb_k, out_k) = (ra[0] + k, rb[0] + k, counter + k);
            layers.push(la_k);
            for name in names
                .iter()
                .filter(|n| layer_index(n).map(|(i, _)| i) == Some(la_k))
            {
                let out_name = renumber(name, out_k);
                let b_name = renumber(name, lb_k);
                let resolved = if float(&a, name) {
                    let r =
                        resolve(&out_name, pos, &levels(s)).ok_or_else(|| missing(&out_name))?;
                    check_t(&r, &out_name)?;
                    Some(r)
                } else {
                    None
                };
                tensors.push(YamlTensor {
                    name: out_name,
                    sources: (name.clone(), b_name),
                    t: resolved.as_ref().map(|r| r.t),
                    matched: resolved
                        .map(|r| format!("{}, {}", r.level, r.entry))
                        .unwrap_or_default(),
                    position: pos,
                    weights: Vec::new(),
                });
            }
        }
        counter += len;
    }
    tensors.extend(after);
    // B holds every source, of A's shape and a float dtype where A's is.
    // The checks of every file merge, before anything is planned.
    check_listed(&a, &b, &listed(&tensors))?;
    let identity = layers.len() == la && layers.iter().enumerate().all(|(i, l)| i == *l);
    Ok(YamlPlan {
        tensors,
        warnings,
        models: (base, other),
        inputs: Some((a, b)),
        out_dtype,
        input_dtype,
        tokenizer_source,
        layers: (!identity).then_some(layers),
        exact,
        family: None,
    })
}

/// The numerics of a recipe: mergekit 0.1.5's slerp (one angle per tensor, lerp when
/// `|cos| > 0.9995`, a zero norm counted as 1), or with `exact` burn-slerp's exact SLERP.
///
/// One angle per tensor, not per row: mergekit 0.1.5's kernel keeps "the leading output-batch
/// axis", and that axis is the batch of tensors it merges at once, so each tensor is one vector
/// (measured: its output equals whole-tensor slerp to the bit, and differs from per-row slerp).
fn config(exact: bool) -> SlerpConfig {
    let config = SlerpConfig::new(0.5).with_granularity(Granularity::Tensor);
    if exact {
        config
    } else {
        config
            .with_dot_threshold(Some(0.9995))
            .with_zero_norm(ZeroNorm::Mergekit)
    }
}

/// What [`yaml_files`] computed: the report of a `slerp` recipe, or what the mean computed for
/// each tensor of a `nuslerp`, `multislerp` or `karcher` recipe.
#[derive(Debug)]
pub enum YamlResult {
    /// `merge_method: slerp`.
    Slerp(MergeReport),
    /// `merge_method: nuslerp`, `multislerp` or `karcher`.
    Mean(Vec<MeanStats>),
}

/// Merges what `plan` resolved into `out` (a folder for a model folder, or a `.safetensors` /
/// `.bpk` file), on `device`, one tensor at a time, as
/// [`merge_files`](crate::checkpoint::merge_files) and
/// [`mean_files`](crate::checkpoint::mean_files) do (atomic output, the
/// model files of a model folder).
///
/// # Errors
///
/// As [`merge_files`](crate::checkpoint::merge_files) and
/// [`mean_files`](crate::checkpoint::mean_files).
pub fn yaml_files(
    mut plan: YamlPlan,
    out: &Path,
    device: Device,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<YamlResult, CheckpointError> {
    if let Some(family) = plan.family.take() {
        let mut options = FileMerge::new(config(plan.exact), device);
        options.out_dtype = family.out_dtype.map(out_dtype);
        options.cancel = cancel;
        let Family {
            inputs,
            names,
            base,
            mean,
            ..
        } = family;
        let planned = FilePlan::mean_of(inputs, names, base, &mean, out, &options)?;
        return Ok(YamlResult::Mean(planned.write(progress)?.means));
    }
    slerp_files(plan, out, device, cancel, progress).map(YamlResult::Slerp)
}

/// A dtype [`dtype_of`] reads, as the file layer's output dtype.
fn out_dtype(dtype: DType) -> OutDType {
    match dtype {
        DType::F16 => OutDType::F16,
        DType::BF16 => OutDType::BF16,
        _ => OutDType::F32,
    }
}

/// The output tensors of a `slerp` plan, as the file layer lists them.
fn listed(tensors: &[YamlTensor]) -> Vec<Listed> {
    tensors
        .iter()
        .map(|t| Listed {
            name: t.name.clone(),
            sources: t.sources.clone(),
            t: t.t,
            position: t.position,
        })
        .collect()
}

/// [`yaml_files`] for a `slerp` recipe.
fn slerp_files(
    mut plan: YamlPlan,
    out: &Path,
    device: Device,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    progress: impl FnMut(Progress<'_>) + Send + 'static,
) -> Result<MergeReport, CheckpointError> {
    let (a, b) = plan
        .inputs
        .take()
        .ok_or_else(|| refused("this plan was written already: resolve the recipe again".into()))?;
    let mut options = FileMerge::new(config(plan.exact), device);
    options.out_dtype = plan.out_dtype.map(out_dtype);
    options.tokenizer_source = plan.tokenizer_source;
    options.cancel = cancel;
    let merge = Listing {
        a,
        b,
        names: plan.models.clone(),
        tensors: listed(&plan.tensors),
        round: plan.input_dtype,
        layers: plan.layers.take(),
    };
    Ok(FilePlan::listed(merge, out, &options)?
        .write(progress)?
        .report)
}
