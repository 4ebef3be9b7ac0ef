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
    ModelEntry, Parameters, Recipe, Resolved, SliceEntry, YamlTensor, after_layers, dtype_of,
    layer_count, layer_index, no_lora, refused, renumber, resolve,
};
use crate::checkpoint::plan::is_float;
use crate::checkpoint::plan::{Listed, Listing, check_listed};
use crate::checkpoint::{
    Checkpoint, CheckpointError, FileMerge, FilePlan, OutDType, Progress, TokenizerSource, Written,
};
use crate::config::{Granularity, SlerpConfig, ZeroNorm};

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

    /// Refuses a further file the command would write (a report) where it names one of the
    /// recipe's models or `out`, before anything is computed.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Output`] naming `path`.
    pub fn check_side_output(&self, path: &Path, out: &Path) -> Result<(), CheckpointError> {
        let opened: Vec<&Checkpoint> = match (&self.inputs, &self.family) {
            (Some((a, b)), _) => vec![a, b],
            (None, Some(family)) => family
                .inputs
                .iter()
                .chain(family.base.as_ref().map(|(c, _)| c))
                .collect(),
            (None, None) => Vec::new(),
        };
        crate::checkpoint::plan::check_side_output(path, &opened, out)
    }

    /// Whether the recipe is a mean (`nuslerp`, `multislerp`, `karcher`) rather than `slerp`:
    /// [`yaml_files`] then fills [`Written::means`] rather than [`Written::report`].
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
    let (parsed, family) = parse_recipe(recipe)?;
    match family {
        Some(method) => resolve_family(parsed, method, exact).map(YamlPlan::family),
        None => resolve_recipe(parsed, exact),
    }
}

/// The models a recipe names (`base_model`, `models:`, the sources of `slices:`), each once,
/// in the order they appear: what `--dry-run` looks up on the Hub before anything is opened.
///
/// # Errors
///
/// As [`plan_yaml`] for a recipe that does not parse or is refused.
pub fn recipe_models(recipe: &Path) -> Result<Vec<String>, CheckpointError> {
    let (parsed, _) = parse_recipe(recipe)?;
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &String| {
        if !names.contains(name) {
            names.push(name.clone());
        }
    };
    parsed.base_model.iter().for_each(&mut add);
    for model in parsed.models.iter().flatten() {
        add(&model.model);
    }
    for slice in parsed.slices.iter().flatten() {
        for source in &slice.sources {
            add(&source.model);
        }
    }
    Ok(names)
}

/// The recipe, parsed, its method checked first, with the refusals every method shares.
fn parse_recipe(recipe: &Path) -> Result<(Recipe, Option<Method>), CheckpointError> {
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
    Ok((parsed, family))
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
    let mut warnings = unread_by_slerp(&recipe);
    let Pair {
        base,
        other,
        slices,
    } = pair_of(&recipe, &mut warnings)?;
    no_lora([&base, &other])?;
    let tokenizer_source = tokenizer_source(&recipe, &base, &other)?;
    let (input_dtype, out_dtype) = dtypes(&recipe)?;
    let open = |model: &str| Checkpoint::open(Path::new(model));
    let (a, b) = (open(&base)?, open(&other)?);
    let la = layer_count(&a.names());
    let ranges = fit_ranges(slices, la, layer_count(&b.names()))?;
    let layout = Layout {
        a: &a,
        names: a.names(),
        ranges: &ranges,
        top: recipe.parameters.as_ref(),
    };
    // Tensors outside the layers: before them, then the layers slice by slice, then after.
    let (mut tensors, after) = outside_tensors(&layout, &architecture(&a))?;
    let (layered, layers) = layer_tensors(&layout)?;
    tensors.extend(layered);
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

/// The warnings for the parameters slerp does not read, at the top level and in each slice.
fn unread_by_slerp(recipe: &Recipe) -> Vec<String> {
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
    let mut warnings = Vec::new();
    for (level, p) in levels_given {
        for unread in p.given_except(&["t"]) {
            warnings.push(format!(
                "`{unread}` at {level} is not a parameter of slerp; ignored, as mergekit ignores it"
            ));
        }
    }
    warnings
}

/// The two models of a slerp recipe and its slices, as the recipe gives them.
struct Pair {
    /// `base_model`: A, the model at `t = 0`.
    base: String,
    /// The other model: B.
    other: String,
    slices: Vec<SliceSpec>,
}

/// A slice as the recipe gives it: A's and B's layer ranges (`None`: every layer) and its
/// parameters.
struct SliceSpec {
    a: Option<[usize; 2]>,
    b: Option<[usize; 2]>,
    parameters: Option<Parameters>,
}

/// A slice against the opened models: A's and B's layer ranges and its parameters.
struct SliceRange {
    a: [usize; 2],
    b: [usize; 2],
    parameters: Option<Parameters>,
}

/// `base_model`, the other model and the slices of a slerp recipe, from its `models:` or its
/// `slices:`; a `t` given per model or per source is a warning.
fn pair_of(recipe: &Recipe, warnings: &mut Vec<String>) -> Result<Pair, CheckpointError> {
    let base = recipe
        .base_model
        .clone()
        .ok_or_else(|| refused("slerp needs `base_model` (the model at t = 0)".into()))?;
    let (other, slices) = match (&recipe.models, &recipe.slices) {
        (Some(_), Some(_)) => {
            return Err(refused("give `models:` or `slices:`, not both".into()));
        }
        (None, None) => {
            return Err(refused(
                "the recipe has neither `models:` nor `slices:`".into(),
            ));
        }
        (Some(models), None) => {
            let every_layer = SliceSpec {
                a: None,
                b: None,
                parameters: None,
            };
            (other_of_models(models, &base, warnings)?, vec![every_layer])
        }
        (None, Some(slices)) => slices_of(slices, &base, warnings)?,
    };
    Ok(Pair {
        base,
        other,
        slices,
    })
}

/// The one model of `models:` other than `base_model`; a `t` given per model is a warning.
fn other_of_models(
    models: &[ModelEntry],
    base: &str,
    warnings: &mut Vec<String>,
) -> Result<String, CheckpointError> {
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
        .filter(|m| m.as_str() != base)
        .collect();
    match others.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(refused(format!(
            "slerp merges `base_model` with exactly one other model; `models:` lists {}",
            models.len()
        ))),
    }
}

/// The other model and the slices of `slices:`; every slice merges the same other model.
fn slices_of(
    slices: &[SliceEntry],
    base: &str,
    warnings: &mut Vec<String>,
) -> Result<(String, Vec<SliceSpec>), CheckpointError> {
    let mut other: Option<String> = None;
    let mut out = Vec::new();
    for (i, slice) in slices.iter().enumerate() {
        out.push(slice_of(i, slice, base, &mut other, warnings)?);
    }
    Ok((
        other.ok_or_else(|| refused("no slice names a second model".into()))?,
        out,
    ))
}

/// Slice `i`: one source from `base_model` (A's range) and one from `other`, the model of the
/// earlier slices (B's range), of the same length; a `t` given per source is a warning.
fn slice_of(
    i: usize,
    slice: &SliceEntry,
    base: &str,
    other: &mut Option<String>,
    warnings: &mut Vec<String>,
) -> Result<SliceSpec, CheckpointError> {
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
                    other.as_deref().unwrap_or_default()
                )));
            }
            *other = Some(source.model.clone());
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
    Ok(SliceSpec {
        a: ra,
        b: rb,
        parameters: slice.parameters.clone(),
    })
}

/// The input whose tokenizer the output takes: A for `base` or none given, else the model
/// named.
fn tokenizer_source(
    recipe: &Recipe,
    base: &str,
    other: &str,
) -> Result<TokenizerSource, CheckpointError> {
    match recipe.tokenizer_source.as_deref() {
        None | Some("base") => Ok(TokenizerSource::A),
        Some(m) if m == other => Ok(TokenizerSource::B),
        Some(m) if m == base => Ok(TokenizerSource::A),
        Some("union") => Err(refused(
            "`tokenizer_source: union` is not supported: it rebuilds the embeddings; give \
             `base` or one of the models"
                .into(),
        )),
        Some(m) => Err(refused(format!(
            "`tokenizer_source: {m}` is not supported: give `base` or one of the models"
        ))),
    }
}

/// `dtype` (the inputs are rounded to it first) and `out_dtype` (`dtype` when not given).
fn dtypes(recipe: &Recipe) -> Result<(Option<DType>, Option<DType>), CheckpointError> {
    let input_dtype = recipe
        .dtype
        .as_deref()
        .map(|d| dtype_of(d, "dtype"))
        .transpose()?;
    let out_dtype = match recipe.out_dtype.as_deref() {
        Some(d) => Some(dtype_of(d, "out_dtype")?),
        None => input_dtype,
    };
    Ok((input_dtype, out_dtype))
}

/// The slices' layer ranges against the `la` layers of A and the `lb` of B (a range not given:
/// every layer); a range that does not fit is refused.
fn fit_ranges(
    slices: Vec<SliceSpec>,
    la: usize,
    lb: usize,
) -> Result<Vec<SliceRange>, CheckpointError> {
    let ranges: Vec<SliceRange> = slices
        .into_iter()
        .map(|s| SliceRange {
            a: s.a.unwrap_or([0, la]),
            b: s.b.unwrap_or([0, lb]),
            parameters: s.parameters,
        })
        .collect();
    for (i, SliceRange { a: ra, b: rb, .. }) in ranges.iter().enumerate() {
        if ra[1] > la || rb[1] > lb || ra[0] >= ra[1] {
            return Err(refused(format!(
                "slice {i}: layer_range {ra:?} / {rb:?} does not fit the models' {la} / {lb} layers"
            )));
        }
    }
    Ok(ranges)
}

/// A's architecture, from the `config.json` of its folder; empty when it has none.
fn architecture(a: &Checkpoint) -> String {
    a.folder()
        .and_then(|f| std::fs::read_to_string(f.join("config.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What the output tensors of a slerp recipe are read from: A and its tensor names, the
/// slices, and the top level's parameters.
struct Layout<'a> {
    a: &'a Checkpoint,
    names: Vec<String>,
    ranges: &'a [SliceRange],
    top: Option<&'a Parameters>,
}

impl Layout<'_> {
    /// Whether A's tensor `name` is a float tensor (merged; the others are copied from A).
    fn float(&self, name: &str) -> bool {
        self.a
            .entry(name)
            .and_then(|e| e.dtype)
            .is_some_and(is_float)
    }

    /// `t` for output tensor `name` at offset `pos` in slice `slice`: the slice's parameters,
    /// then the top level's; refused when no level gives one.
    fn t_of(&self, name: &str, pos: f64, slice: usize) -> Result<Resolved, CheckpointError> {
        let levels = vec![
            (
                format!("slice {slice}"),
                self.ranges[slice].parameters.as_ref(),
            ),
            ("top level".to_string(), self.top),
        ];
        resolve(name, pos, &levels).ok_or_else(|| {
            refused(format!(
                "missing t for `{name}` (no level of the recipe gives one)"
            ))
        })
    }
}

/// Refuses a `t` for output tensor `name` that is not a number in [0, 1].
fn check_t(r: &Resolved, name: &str) -> Result<(), CheckpointError> {
    if r.t.is_finite() && (0.0..=1.0).contains(&r.t) {
        Ok(())
    } else {
        Err(refused(format!(
            "t = {} for `{name}` ({}, {}) is outside [0, 1]",
            r.t, r.level, r.entry
        )))
    }
}

/// An output tensor of a slerp recipe, with its `t` and where it came from; copied from A when
/// `resolved` is `None`.
fn slerp_tensor(
    name: String,
    sources: (String, String),
    resolved: Option<Resolved>,
    position: f64,
) -> YamlTensor {
    YamlTensor {
        name,
        sources,
        t: resolved.as_ref().map(|r| r.t),
        matched: resolved
            .map(|r| format!("{}, {}", r.level, r.entry))
            .unwrap_or_default(),
        position,
        weights: Vec::new(),
    }
}

/// The tensors outside the layers, in A's order: those before the layers, and those after them
/// (for an architecture [`after_layers`] knows).
fn outside_tensors(
    layout: &Layout<'_>,
    architecture: &str,
) -> Result<(Vec<YamlTensor>, Vec<YamlTensor>), CheckpointError> {
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for name in layout.names.iter().filter(|n| layer_index(n).is_none()) {
        let is_after = after_layers(architecture, name);
        let resolved = if layout.float(name) {
            Some(outside_t(layout, architecture, name, is_after)?)
        } else {
            None
        };
        let tensor = slerp_tensor(name.clone(), (name.clone(), name.clone()), resolved, 0.0);
        if is_after == Some(true) {
            after.push(tensor);
        } else {
            before.push(tensor);
        }
    }
    Ok((before, after))
}

/// `t` for a float tensor outside the layers: the first slice's before them, the last slice's
/// after them, and for an architecture [`after_layers`] does not know, both, which must agree.
fn outside_t(
    layout: &Layout<'_>,
    architecture: &str,
    name: &str,
    is_after: Option<bool>,
) -> Result<Resolved, CheckpointError> {
    let last = layout.ranges.len() - 1;
    let first = layout.t_of(name, 0.0, 0)?;
    let chosen = match is_after {
        Some(true) => layout.t_of(name, 0.0, last)?,
        Some(false) => first,
        None => {
            let other = layout.t_of(name, 0.0, last)?;
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
    Ok(chosen)
}

/// The tensors of the layers, slice by slice, renumbered to their place in the output, and the
/// layer of A each output layer comes from.
fn layer_tensors(layout: &Layout<'_>) -> Result<(Vec<YamlTensor>, Vec<usize>), CheckpointError> {
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    let mut counter = 0;
    for (s, range) in layout.ranges.iter().enumerate() {
        let len = range.a[1] - range.a[0];
        for k in 0..len {
            let pos = if len == 1 {
                1.0
            } else {
                k as f64 / (len - 1) as f64
            };
            let (la_k, lb_k, out_k) = (range.a[0] + k, range.b[0] + k, counter + k);
            layers.push(la_k);
            for name in layout
                .names
                .iter()
                .filter(|n| layer_index(n).map(|(i, _)| i) == Some(la_k))
            {
                let out_name = renumber(name, out_k);
                let b_name = renumber(name, lb_k);
                let resolved = if layout.float(name) {
                    let r = layout.t_of(&out_name, pos, s)?;
                    check_t(&r, &out_name)?;
                    Some(r)
                } else {
                    None
                };
                tensors.push(slerp_tensor(
                    out_name,
                    (name.clone(), b_name),
                    resolved,
                    pos,
                ));
            }
        }
        counter += len;
    }
    Ok((tensors, layers))
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
) -> Result<Written, CheckpointError> {
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
        let planned = match mean {
            Some(mean) => FilePlan::mean_of(inputs, names, base, &mean, out, &options)?,
            None => {
                let (Some(input), Some(name)) =
                    (inputs.into_iter().next(), names.into_iter().next())
                else {
                    return Err(refused("the recipe lists no model to merge".into()));
                };
                FilePlan::copy_of(input, name, out, &options)?
            }
        };
        return planned.write(progress);
    }
    slerp_files(plan, out, device, cancel, progress)
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
) -> Result<Written, CheckpointError> {
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
    FilePlan::listed(merge, out, &options)?.write(progress)
}
