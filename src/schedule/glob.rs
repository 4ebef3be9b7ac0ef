//! The filters of schedule rules: globs over dotted parameter paths, matched in time linear in
//! the pattern times the path, whatever the pattern.

/// A compiled filter: dotted segments, `**` for any run of whole segments, `*` within a segment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Glob {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    /// `**`: zero or more whole segments.
    Any,
    /// A segment pattern, `*` matching any run of characters within it.
    Pattern(String),
}

impl Glob {
    /// Compiles a filter.
    ///
    /// # Errors
    ///
    /// What is wrong with it: empty, an empty segment, or `**` inside a segment.
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("the filter is empty".into());
        }
        let segments = pattern
            .split('.')
            .map(|s| match s {
                "" => Err(format!(
                    "`{pattern}` has an empty segment (a leading, trailing or doubled `.`)"
                )),
                "**" => Ok(Segment::Any),
                s if s.contains("**") => Err(format!(
                    "`**` must be a whole segment in `{pattern}` (write `*` within a segment)"
                )),
                s => Ok(Segment::Pattern(s.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { segments })
    }

    /// Whether the glob matches the whole dotted `path`.
    ///
    /// One pass over the pattern, keeping the set of path prefixes the pattern read so far can
    /// match: each segment is tested against each path segment at most once, so a pattern of
    /// many `**` takes no longer than any other of its length (a backtracking matcher is
    /// exponential in them).
    pub(crate) fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('.').collect();
        // reach[j]: the pattern so far matches exactly `parts[..j]`.
        let mut reach = vec![false; parts.len() + 1];
        reach[0] = true;
        for segment in &self.segments {
            match segment {
                Segment::Any => {
                    // Any prefix reached so far, extended by zero or more whole segments.
                    let mut seen = false;
                    for r in reach.iter_mut() {
                        seen |= *r;
                        *r = seen;
                    }
                }
                Segment::Pattern(p) => {
                    for j in (0..parts.len()).rev() {
                        reach[j + 1] = reach[j] && segment_matches(p, parts[j]);
                    }
                    reach[0] = false;
                }
            }
            if !reach.contains(&true) {
                return false;
            }
        }
        reach[parts.len()]
    }
}

/// `*` matches any run of characters (none included); everything else literally.
fn segment_matches(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    if pieces.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    // Middle pieces in order, each at its leftmost place: greedy is exact for `*` alone, and
    // reads the text once per piece.
    let mut rest = &text[first.len()..text.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn globs_anchor_to_the_whole_path() {
        let g = glob("**.attn.*");
        assert!(g.matches("layers.0.attn.query"));
        assert!(g.matches("attn.query"));
        assert!(!g.matches("layers.0.attn.query.weight"));
        assert!(!g.matches("layers.0.attention.query"));
        let g = glob("layers.*.mlp.**");
        assert!(g.matches("layers.3.mlp.fc1.weight"));
        assert!(g.matches("layers.3.mlp"));
        assert!(!g.matches("layers.3.4.mlp.fc1"));
        assert!(!g.matches("head.layers.3.mlp.fc1"));
        let g = glob("*_proj.weight");
        assert!(g.matches("q_proj.weight") && g.matches("_proj.weight"));
        assert!(!g.matches("q_proj.bias") && !g.matches("a.q_proj.weight"));
        let g = glob("a*b*c");
        assert!(g.matches("abc") && g.matches("aXbYc") && g.matches("abbc"));
        assert!(!g.matches("acb") && !g.matches("ab"));
        assert!(glob("**").matches("anything.at.all"));
        assert!(glob("**.bias").matches("bias"));
        assert!(glob("**.**").matches("x") && glob("a.**.**.b").matches("a.b"));
        assert!(glob("a.**.b.**.c").matches("a.x.b.y.z.c"));
        assert!(!glob("a.**.b.**.c").matches("a.x.c.y.b"));
    }

    /// Every pattern of `**` and `x` over paths of `x` and `y`, against a backtracking
    /// matcher written here as the plain definition.
    #[test]
    fn matches_like_the_definition() {
        fn by_definition(pattern: &[&str], parts: &[&str]) -> bool {
            match pattern.split_first() {
                None => parts.is_empty(),
                Some((&"**", rest)) => (0..=parts.len()).any(|k| by_definition(rest, &parts[k..])),
                Some((p, rest)) => {
                    !parts.is_empty()
                        && segment_matches(p, parts[0])
                        && by_definition(rest, &parts[1..])
                }
            }
        }
        let words = ["**", "x", "*", "y*"];
        let mut checked = 0;
        for len in 1..=4u32 {
            for code in 0..4usize.pow(len) {
                let pattern: Vec<&str> =
                    (0..len).map(|i| words[code / 4usize.pow(i) % 4]).collect();
                let g = glob(&pattern.join("."));
                for path_len in 1..=4u32 {
                    for bits in 0..(1usize << path_len) {
                        let parts: Vec<&str> = (0..path_len)
                            .map(|i| if bits >> i & 1 == 1 { "x" } else { "yy" })
                            .collect();
                        assert_eq!(
                            g.matches(&parts.join(".")),
                            by_definition(&pattern, &parts),
                            "{pattern:?} on {parts:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, (4 + 16 + 64 + 256) * (2 + 4 + 8 + 16));
    }

    /// 40 `**` segments and a literal that is not there, against a 200-segment path: a
    /// backtracking matcher tries about C(240, 40) splits and never finishes.
    #[test]
    fn hostile_patterns_match_in_linear_time() {
        let pattern = vec!["**"; 40].join(".") + ".absent";
        let path = vec!["layer"; 200].join(".");
        let g = glob(&pattern);
        assert!(!g.matches(&path));
        assert!(g.matches(&(path.clone() + ".absent")));
        let many = vec!["**.a"; 40].join(".");
        assert!(!glob(&many).matches(&vec!["a"; 39].join(".")));
        assert!(glob(&many).matches(&vec!["a"; 41].join(".")));
    }

    #[test]
    fn bad_globs_are_errors() {
        for p in ["", ".a", "a.", "a..b", "a**", "x.**b.y"] {
            assert!(Glob::new(p).is_err(), "{p:?}");
        }
    }
}
