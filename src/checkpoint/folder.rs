//! What a merged Hugging Face model folder holds besides its weights: the model's files copied
//! from the inputs (`config.json` with its dtype updated when the output dtype changes it, the
//! generation config, the code `auto_map` names, the tokenizer) and a short model card.
//! Nothing else is written: apart from the card and the dtype field, every file is one of an
//! input's, byte for byte.

use std::path::Path;

use burn::tensor::DType;

use super::error::CheckpointError;
use super::options::{FileMerge, TokenizerSource};
use super::plan::Card;

/// The tokenizer's files, whichever exist; `additional_chat_templates` is a folder.
const TOKENIZER_FILES: [&str; 11] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
];

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `from` to `to`: a file's bytes (through any symbolic link, as the Hugging Face cache
/// has them), or a folder's files, recursively.
fn copy(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    if std::fs::metadata(from).map_err(io(from))?.is_dir() {
        std::fs::create_dir(to).map_err(io(to))?;
        for entry in std::fs::read_dir(from).map_err(io(from))? {
            let entry = entry.map_err(io(from))?;
            copy(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    std::fs::copy(from, to).map(drop).map_err(io(from))
}

/// The `.py` files a `config.json`'s `auto_map` names (`"modeling_x.ModelX"`, or
/// `"repo--modeling_x.ModelX"` for code of another repository, which is not copied).
fn auto_map_files(config: &serde_json::Value) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    let mut add = |reference: &str| {
        if reference.contains("--") {
            return;
        }
        if let Some((module, _)) = reference.rsplit_once('.') {
            let file = format!("{module}.py");
            if !files.contains(&file) && Path::new(&file).components().count() == 1 {
                files.push(file);
            }
        }
    };
    if let Some(map) = config.get("auto_map").and_then(|m| m.as_object()) {
        for value in map.values() {
            match value {
                serde_json::Value::String(s) => add(s),
                serde_json::Value::Array(items) => {
                    items.iter().filter_map(|v| v.as_str()).for_each(&mut add)
                }
                _ => {}
            }
        }
    }
    files
}

fn parse_config(text: &str, path: &Path) -> Result<serde_json::Value, CheckpointError> {
    serde_json::from_str(text).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("not a valid config.json: {e}"),
    })
}

/// The name `transformers` gives a dtype in `config.json`.
fn torch_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// `config.json`'s text, with `dtype` and `torch_dtype` (whichever it has) set to `dtype`, or
/// unchanged (byte for byte) when it has neither or already says so.
fn with_dtype(text: &str, dtype: DType, path: &Path) -> Result<String, CheckpointError> {
    let Some(name) = torch_name(dtype) else {
        return Ok(text.to_string());
    };
    let mut config = parse_config(text, path)?;
    let Some(object) = config.as_object_mut() else {
        return Ok(text.to_string());
    };
    let mut changed = false;
    for key in ["dtype", "torch_dtype"] {
        if let Some(value) = object.get_mut(key)
            && value.as_str() != Some(name)
        {
            *value = name.into();
            changed = true;
        }
    }
    if !changed {
        return Ok(text.to_string());
    }
    let out = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    Ok(out + "\n")
}

/// `config.json`'s text with `num_hidden_layers` (GPT-2: `n_layer`) set to the number of output
/// layers, and each
/// per-layer list (a list as long as the input's layer count, such as `layer_types`) taken
/// layer by layer from the input layer each output layer comes from.
fn with_layers(text: &str, layers: &[usize], path: &Path) -> Result<String, CheckpointError> {
    let mut config = parse_config(text, path)?;
    let Some(object) = config.as_object_mut() else {
        return Ok(text.to_string());
    };
    // `n_layer` in GPT-2's config, `num_hidden_layers` elsewhere.
    let Some((key, count)) = ["num_hidden_layers", "n_layer"]
        .into_iter()
        .find_map(|k| object.get(k).and_then(|n| n.as_u64()).map(|n| (k, n)))
    else {
        return Ok(text.to_string());
    };
    if count as usize == layers.len() && layers.iter().enumerate().all(|(i, l)| i == *l) {
        return Ok(text.to_string());
    }
    for value in object.values_mut() {
        if let serde_json::Value::Array(items) = value
            && items.len() == count as usize
            && layers.iter().all(|l| *l < items.len())
        {
            *items = layers.iter().map(|l| items[*l].clone()).collect();
        }
    }
    object.insert(key.into(), layers.len().into());
    Ok(serde_json::to_string_pretty(&config).expect("JSON values serialise") + "\n")
}

/// The model card: the inputs, the method and the recipe.
fn model_card(
    names: &[String],
    base: Option<&str>,
    method: &str,
    options: &FileMerge,
    recipe: &str,
) -> String {
    let inputs: String = names
        .iter()
        .enumerate()
        .map(|(i, name)| match (i, names.len()) {
            (0, 2) => format!("- A (t = 0): `{name}`\n"),
            (1, 2) => format!("- B (t = 1): `{name}`\n"),
            _ => format!("- `{name}`\n"),
        })
        .collect();
    let base = base
        .map(|name| format!("- base: `{name}`\n"))
        .unwrap_or_default();
    let tokenizer = match options.tokenizer_source {
        TokenizerSource::A => "the first input's",
        TokenizerSource::B => "the second input's",
    };
    format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- burn-slerp\n---\n\n\
         # Merged model\n\nMerged with burn-slerp {} by {method}.\n\n\
         ## Inputs\n\n{inputs}{base}\n\
         The configuration and generation settings are the first input's; the tokenizer is \
         {tokenizer}.\n\n## Recipe\n\n```json\n{recipe}\n```\n",
        env!("CARGO_PKG_VERSION"),
    )
}

/// Everything a merged model folder holds besides its weights, written into `dir`: A's
/// `config.json` (dtype updated to `out_dtype` when given), `generation_config.json` and the
/// code files its `auto_map` names, the tokenizer files of `options.tokenizer_source`, and
/// `README.md`. `a_folder`/`b_folder` are the first two inputs' model folders; `names` how the
/// inputs were given, `method` and `recipe` what the card says was done.
pub(super) fn write_model_files(
    dir: &Path,
    a_folder: Option<&Path>,
    b_folder: Option<&Path>,
    out_dtype: Option<DType>,
    options: &FileMerge,
    card: &Card,
) -> Result<(), CheckpointError> {
    let layers = card.layers.as_deref();
    let Some(model) = a_folder.or(b_folder) else {
        return Ok(());
    };
    let config_path = model.join("config.json");
    if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let text = match out_dtype {
            Some(dtype) => with_dtype(&text, dtype, &config_path)?,
            None => text,
        };
        let text = match layers {
            Some(layers) => with_layers(&text, layers, &config_path)?,
            None => text,
        };
        let to = dir.join("config.json");
        std::fs::write(&to, text).map_err(io(&to))?;
        for file in auto_map_files(&config) {
            let from = model.join(&file);
            if from.is_file() {
                copy(&from, &dir.join(&file))?;
            }
        }
    }
    let generation = model.join("generation_config.json");
    if generation.is_file() {
        copy(&generation, &dir.join("generation_config.json"))?;
    }
    let tokenizer = match options.tokenizer_source {
        TokenizerSource::A => a_folder,
        TokenizerSource::B => b_folder,
    };
    if let Some(tokenizer) = tokenizer {
        for file in TOKENIZER_FILES {
            let from = tokenizer.join(file);
            if from.exists() {
                copy(&from, &dir.join(file))?;
            }
        }
    }
    let to = dir.join("README.md");
    std::fs::write(
        &to,
        model_card(
            &card.names,
            card.base.as_deref(),
            card.method,
            options,
            &card.recipe,
        ),
    )
    .map_err(io(&to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_fields_and_auto_map() {
        let path = Path::new("config.json");
        let text = "{\"torch_dtype\": \"bfloat16\", \"hidden_size\": 8}";
        let out = with_dtype(text, DType::F16, path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["torch_dtype"], "float16");
        assert_eq!(json["hidden_size"], 8);
        assert!(json.get("dtype").is_none(), "no field is invented");
        // Already right, or no field at all: the text is left as it is.
        assert_eq!(with_dtype(text, DType::BF16, path).unwrap(), text);
        assert_eq!(with_dtype("{}", DType::F16, path).unwrap(), "{}");
        let both = "{\"dtype\": \"float32\", \"torch_dtype\": \"float32\"}";
        let json: serde_json::Value =
            serde_json::from_str(&with_dtype(both, DType::BF16, path).unwrap()).unwrap();
        assert_eq!(
            (&json["dtype"], &json["torch_dtype"]),
            (&"bfloat16".into(), &"bfloat16".into())
        );

        let config = serde_json::json!({"auto_map": {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModel": "modeling_x.XModel",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
            "AutoTokenizer": ["tokenization_x.XTokenizer", null],
            "AutoProcessor": "other/repo--processing_x.XProcessor",
        }});
        let mut files = auto_map_files(&config);
        files.sort();
        assert_eq!(
            files,
            ["configuration_x.py", "modeling_x.py", "tokenization_x.py"]
        );
    }
}
