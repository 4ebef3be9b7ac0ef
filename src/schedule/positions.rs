//! Where each tensor sits in the layer stack, from its dotted path alone: the one rule for
//! module paths and checkpoint names alike.

use std::collections::HashMap;

/// The layer index of a path: the prefix before its first numeric segment, and that segment.
fn layer_of(path: &str) -> Option<(&str, usize)> {
    let mut start = 0;
    for segment in path.split('.') {
        if let Ok(index) = segment.parse::<usize>() {
            let prefix = path[..start].strip_suffix('.').unwrap_or("");
            return Some((prefix, index));
        }
        start += segment.len() + 1;
    }
    None
}

/// The layer position in [0, 1] of each path, in order.
///
/// The first numeric segment of a path is its layer index `i` in the stack named by the prefix
/// before it, whose length `L` is one more than the largest index found under that prefix
/// among `paths`; the position is `i / (L − 1)`, and 0 for a stack of one. A path without a
/// numeric segment is outside the layers and at position 0 (mergekit's rule since 0.1.2).
pub(crate) fn layer_positions(paths: &[&str]) -> Vec<f64> {
    let mut lengths: HashMap<&str, usize> = HashMap::new();
    for path in paths {
        if let Some((prefix, index)) = layer_of(path) {
            let len = lengths.entry(prefix).or_insert(0);
            *len = (*len).max(index + 1);
        }
    }
    paths
        .iter()
        .map(|path| match layer_of(path) {
            Some((prefix, index)) => match lengths[prefix] {
                len if len > 1 => index as f64 / (len - 1) as f64,
                _ => 0.0,
            },
            None => 0.0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_come_from_the_first_numeric_segment() {
        let paths = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.mlp.experts.7.weight",
            "model.layers.4.input_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
            "blocks.0.mlp.1.bias",
            "blocks.1.mlp.0.bias",
            "x.0",
            "x2.3.y",
        ];
        let got = layer_positions(&paths);
        // `model.layers` has 5 layers (0..=4); `blocks` 2; `x` 1; `x2` 4. Expert 7 does not
        // count: only the first numeric segment does.
        let want = [0.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        assert_eq!(got, want);
        assert_eq!(layer_of("a.b.10.c"), Some(("a.b", 10)));
        assert_eq!(layer_of("3.c"), Some(("", 3)));
        assert_eq!(layer_of("a.b"), None);
    }
}
