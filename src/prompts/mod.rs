//! Prompt templates: the template language users already write for
//! dynamicprompts (the A1111 / ComfyUI "Dynamic Prompts" extension) and
//! the built-in "1girl" pack.
//!
//! Syntax (see [`parse`] for the exact whitespace and comment rules):
//! variants `{a|b|c}`, weights `{0.5::a|2::b}`, counts `{2$$a|b|c}` and
//! ranges `{1-3$$a|b|c}` with an optional joiner `{2$$ and $$a|b|c}`,
//! wildcards `__name__` read from a folder of `.txt` files (nested paths
//! `__hair/colour__`, globs `__hair/*__`, one entry per line, `#` comments,
//! [`wildcards`]), `#` comments in templates, and nesting of all of these
//! (a wildcard entry is itself a template).
//!
//! Two ways to expand ([`expand`]): random mode, where prompt `index` of a
//! run with `seed` depends only on (template, seed, index); and
//! combinatorial mode, which enumerates every prompt in the order of
//! dynamicprompts' `CombinatorialPromptGenerator` (checked against a golden
//! file made with the `dynamicprompts` package,
//! `fixtures/scripts/gen_prompt_goldens.py`).
//!
//! Mistakes are errors naming file, line and column: a missing wildcard,
//! an unbalanced brace, an empty variant list, a wildcard that refers back
//! to itself — never a silent empty string or a literal `__name__` (which
//! is what dynamicprompts prints).
//!
//! [`tidy`] is applied by `eps2v prompts` and `eps2v generate` on top of
//! the exact expansion: whitespace runs (newlines of multi-line templates
//! included) become one space and empty comma-separated pieces (left by
//! optional parts such as `{|smile}`) are dropped.

pub mod expand;
pub mod pack;
pub mod parse;
pub mod wildcards;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use parse::{parse, Location, Node, Source};
pub use wildcards::WildcardSet;

use crate::error::IoContext;
use crate::{Error, Result};

/// A parsed template with every wildcard resolved.
#[derive(Debug, Clone)]
pub struct Template {
    root: Node,
    /// SHA-256 (hex) of the template text and the wildcard files it uses.
    digest: String,
    /// Wildcard files used, by name.
    used: Vec<String>,
}

impl Template {
    /// Parse `text` (from `src`) and resolve its wildcards in `wildcards`,
    /// recursively (entries are templates too).
    pub fn compile(text: &str, src: &Source, wildcards: &WildcardSet) -> Result<Self> {
        let mut root = parse(text, src)?;
        let mut c = Compiler {
            set: wildcards,
            cache: HashMap::new(),
            stack: Vec::new(),
            used: BTreeMap::new(),
        };
        c.resolve(&mut root)?;
        let mut h = Sha256::new();
        h.update(b"template\0");
        h.update(text.as_bytes());
        for (name, contents) in &c.used {
            h.update(b"\0wildcard\0");
            h.update(name.as_bytes());
            h.update(b"\0");
            h.update(contents.as_bytes());
        }
        Ok(Self {
            root,
            digest: hex::encode(h.finalize()),
            used: c.used.keys().cloned().collect(),
        })
    }

    /// Prompt `index` of a random run with `seed` (exact expansion, no
    /// [`tidy`]).
    pub fn random(&self, seed: u64, index: u64) -> String {
        expand::sample(&self.root, &mut expand::prompt_rng(seed, index))
    }

    /// Every prompt, lazily, in dynamicprompts' combinatorial order.
    pub fn combinations(&self) -> expand::Prompts<'_> {
        expand::combinations(&self.root)
    }

    /// The combinatorial expansions that are distinct after [`tidy`], tidied
    /// (raw expansions that differ only in the empty picks tidy away, `", a"`
    /// and `"a, "`, are one prompt): what `generate --combinatorial` plans.
    pub fn distinct_combinations(&self) -> impl Iterator<Item = String> + '_ {
        let mut seen = std::collections::HashSet::new();
        self.combinations()
            .map(|raw| tidy(&raw))
            .filter(move |p| seen.insert(p.clone()))
    }

    /// SHA-256 (hex) of the template text plus the name and text of every
    /// wildcard file it uses: equal digests give equal prompts.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Names of the wildcard files the template uses, sorted.
    pub fn wildcards_used(&self) -> &[String] {
        &self.used
    }

    /// The parsed tree.
    pub fn root(&self) -> &Node {
        &self.root
    }
}

struct Compiler<'w> {
    set: &'w WildcardSet,
    cache: HashMap<String, Arc<Vec<Node>>>,
    stack: Vec<String>,
    used: BTreeMap<String, String>,
}

impl Compiler<'_> {
    fn resolve(&mut self, node: &mut Node) -> Result<()> {
        match node {
            Node::Text(_) => Ok(()),
            Node::Seq(parts) => parts.iter_mut().try_for_each(|p| self.resolve(p)),
            Node::Variant(v) => v
                .options
                .iter_mut()
                .try_for_each(|o| self.resolve(&mut o.1)),
            Node::Wildcard(w) => {
                w.entries = Some(self.entries(&w.pattern, &w.at)?);
                Ok(())
            }
        }
    }

    fn entries(&mut self, pattern: &str, at: &Location) -> Result<Arc<Vec<Node>>> {
        if let Some(e) = self.cache.get(pattern) {
            return Ok(e.clone());
        }
        if self.stack.iter().any(|p| p == pattern) {
            let mut chain = self.stack.clone();
            chain.push(pattern.to_string());
            return Err(parse::err_at(
                at,
                format!(
                    "wildcard __{pattern}__ refers back to itself ({}); this would never end",
                    chain.join(" → ")
                ),
            ));
        }
        let found = self.set.resolve(pattern);
        if found.is_empty() {
            return Err(parse::err_at(at, missing_message(self.set, pattern)));
        }
        for f in self.set.matching(pattern) {
            self.used.insert(f.name.clone(), f.contents.clone());
        }
        // The `**/` fallback may have matched instead; record those too.
        for (_, f) in &found {
            self.used.insert(f.name.clone(), f.contents.clone());
        }
        self.stack.push(pattern.to_string());
        let mut nodes = Vec::with_capacity(found.len());
        for (e, f) in found {
            let src = Source {
                name: f.path.clone(),
                line: e.line,
                col: e.col,
            };
            let mut n = parse(&e.text, &src)?;
            self.resolve(&mut n)?;
            nodes.push(n);
        }
        self.stack.pop();
        let nodes = Arc::new(nodes);
        self.cache.insert(pattern.to_string(), nodes.clone());
        Ok(nodes)
    }
}

fn missing_message(set: &WildcardSet, pattern: &str) -> String {
    let Some(origin) = &set.origin else {
        return format!(
            "wildcard __{pattern}__ not found: no wildcard folder was given (--wildcards DIR)"
        );
    };
    let names: Vec<&str> = set.names().collect();
    let known = if names.is_empty() {
        "it has no .txt files".to_string()
    } else {
        let shown: Vec<&str> = names.iter().take(12).copied().collect();
        format!(
            "it has {}{}",
            shown.join(", "),
            if names.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )
    };
    format!(
        "wildcard __{pattern}__ not found in {origin} (no non-empty .txt file matches; {known})"
    )
}

/// Whitespace runs become one space; comma-separated pieces are trimmed
/// and empty ones dropped (`"a, , b,\n c"` → `"a, b, c"`).
pub fn tidy(prompt: &str) -> String {
    let squashed = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    squashed
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a template comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TemplateSpec {
    /// A built-in pack by name (`1girl`).
    Builtin(String),
    /// A template file.
    File(PathBuf),
    /// Template text given inline.
    Inline(String),
}

impl TemplateSpec {
    /// Read a command-line `TEMPLATE`: an existing file, a built-in pack
    /// name, or else template text; a missing `*.txt` path is an error
    /// rather than text.
    pub fn from_arg(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        if path.is_file() {
            return Ok(Self::File(path.to_path_buf()));
        }
        if pack::builtin(arg).is_some() {
            return Ok(Self::Builtin(arg.to_string()));
        }
        if path.is_dir() {
            let t = path.join("template.txt");
            if t.is_file() {
                return Ok(Self::File(t));
            }
            return Err(Error::config(format!(
                "{arg}: a folder without a template.txt; pass the template file itself, a built-in pack name such as `1girl`, or the template text"
            )));
        }
        if looks_like_a_path(arg) {
            return Err(Error::config(format!(
                "{arg}: template file not found (pass an existing file, a built-in pack name such as `1girl`, or the template text itself)"
            )));
        }
        Ok(Self::Inline(arg.to_string()))
    }

    /// Human-readable label (`builtin:1girl`, the path, or `inline`).
    pub fn label(&self) -> String {
        match self {
            Self::Builtin(n) => format!("builtin:{n}"),
            Self::File(p) => p.display().to_string(),
            Self::Inline(_) => "inline".to_string(),
        }
    }
}

/// A missing `TEMPLATE` that reads as a file name rather than prompt text:
/// no template syntax or spaces, and a folder separator or a file
/// extension (`x.txt`, `prompts/a`, `my_templte.TXT`).
fn looks_like_a_path(arg: &str) -> bool {
    let arg = arg.trim();
    if arg.is_empty() || arg.contains(['{', '}', ',', ' ', '\t']) || arg.contains("__") {
        return false;
    }
    let ext = Path::new(arg).extension().and_then(|e| e.to_str());
    arg.contains(['/', '\\'])
        || ext.is_some_and(|e| {
            (1..=5).contains(&e.len())
                && e.chars().all(|c| c.is_ascii_alphanumeric())
                && e.chars().any(|c| c.is_ascii_alphabetic())
        })
}

/// Load and compile a template. Wildcards: `wildcards` when given (it must
/// exist); else, for a file, its sibling `wildcards/` folder when there is
/// one, or the file's own folder; the embedded files for a built-in pack;
/// none for inline text.
pub fn load(spec: &TemplateSpec, wildcards: Option<&Path>) -> Result<Template> {
    let set = |default: Option<PathBuf>| -> Result<WildcardSet> {
        match (wildcards, default) {
            (Some(d), _) => WildcardSet::load_dir(d),
            (None, Some(d)) if d.is_dir() => WildcardSet::load_dir(&d),
            _ => Ok(WildcardSet::empty()),
        }
    };
    match spec {
        TemplateSpec::Builtin(name) => {
            let p = pack::builtin(name).ok_or_else(|| {
                Error::config(format!(
                    "no built-in template pack {name:?}; built-in: {}",
                    pack::NAMES.join(", ")
                ))
            })?;
            let w = match wildcards {
                Some(d) => WildcardSet::load_dir(d)?,
                None => p.wildcards(),
            };
            Template::compile(p.template, &Source::new(p.template_label()), &w)
        }
        TemplateSpec::File(path) => {
            let bytes = std::fs::read(path).at(path)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Error::config(format!(
                    "{}: template file is not UTF-8 text",
                    path.display()
                ))
            })?;
            // Editors on Windows may start the file with a byte-order mark.
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            let default = if dir.join("wildcards").is_dir() {
                dir.join("wildcards")
            } else {
                dir
            };
            // A template without `__name__` reads no wildcard files (the
            // file's own folder may hold anything).
            let w = if text.contains("__") {
                set(Some(default))?
            } else {
                WildcardSet::empty()
            };
            Template::compile(text, &Source::new(path.display().to_string()), &w)
        }
        TemplateSpec::Inline(text) => {
            let w = set(None)?;
            Template::compile(text, &Source::new("template (command line)"), &w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equivalent reference: dynamicprompts 0.31 `CombinatorialPromptGenerator`
    /// (fixtures/scripts/gen_prompt_goldens.py): the same prompts in the same order.
    #[test]
    fn combinatorial_matches_dynamicprompts_golden() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("golden/prompts/combinatorial.json")).unwrap(),
        )
        .unwrap();
        let limit = golden["limit"].as_u64().unwrap() as usize;
        let sets = [
            (
                "golden",
                WildcardSet::load_dir(&root.join("golden/prompts/wildcards")).unwrap(),
            ),
            (
                "1girl",
                WildcardSet::load_dir(&root.join("prompts/1girl/wildcards")).unwrap(),
            ),
        ];
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() > 50);
        for case in cases {
            let text = case["template"].as_str().unwrap();
            let set = &sets
                .iter()
                .find(|s| s.0 == case["wildcards"].as_str().unwrap())
                .unwrap()
                .1;
            let want: Vec<&str> = case["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let t = Template::compile(text, &Source::new("golden"), set)
                .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let got: Vec<String> = t.combinations().take(limit).collect();
            assert_eq!(got, want, "template {text:?}");
        }
    }

    #[test]
    fn tidy_squashes_whitespace_and_empty_pieces() {
        assert_eq!(tidy(" a, , b,\n  c ,"), "a, b, c");
        assert_eq!(tidy("1girl,\n\n__x__,  smile"), "1girl, __x__, smile");
        assert_eq!(tidy("(red hair:1.2), BREAK, x"), "(red hair:1.2), BREAK, x");
        assert_eq!(tidy(""), "");
    }

    #[test]
    fn compile_errors_name_where_the_wildcard_is() {
        let w = WildcardSet::from_files(
            "mem",
            &[
                ("a", "x __b__"),
                ("b", "y __a__"),
                ("bad", "fine\n  {oops"),
                ("uses_bad", "__bad__"),
            ],
        );
        let e = |t: &str| {
            Template::compile(t, &Source::new("t.txt"), &w)
                .unwrap_err()
                .to_string()
        };
        let m = e("one,\n __nope__");
        assert!(
            m.starts_with("t.txt:2:2: wildcard __nope__ not found in mem"),
            "{m}"
        );
        assert!(m.contains("a, b, bad, uses_bad"), "{m}");
        let m = e("__a__");
        assert!(m.contains("refers back to itself (a → b → a)"), "{m}");
        let m = e("__uses_bad__");
        assert!(m.starts_with("mem/bad.txt:2:3: unbalanced `{`"), "{m}");
        let none = Template::compile("__x__", &Source::new("t"), &WildcardSet::empty())
            .unwrap_err()
            .to_string();
        assert!(none.contains("no wildcard folder was given"), "{none}");
    }

    #[test]
    fn digest_covers_template_and_used_wildcards_only() {
        let w1 = WildcardSet::from_files("m", &[("a", "x"), ("b", "y")]);
        let w2 = WildcardSet::from_files("m", &[("a", "x"), ("b", "z")]);
        let w3 = WildcardSet::from_files("m", &[("a", "x2"), ("b", "y")]);
        let d = |t: &str, w: &WildcardSet| {
            Template::compile(t, &Source::new("t"), w)
                .unwrap()
                .digest()
                .to_string()
        };
        assert_eq!(d("__a__", &w1), d("__a__", &w2), "unused file changed");
        assert_ne!(d("__a__", &w1), d("__a__", &w3), "used file changed");
        assert_ne!(d("__a__", &w1), d("__a__ ", &w1), "template changed");
        let t = Template::compile("__*__", &Source::new("t"), &w1).unwrap();
        assert_eq!(t.wildcards_used(), ["a", "b"]);
    }

    #[test]
    fn template_args_resolve_files_packs_and_text() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t.txt");
        std::fs::write(&f, "{a|b}, __c__").unwrap();
        std::fs::create_dir(d.path().join("wildcards")).unwrap();
        std::fs::write(d.path().join("wildcards/c.txt"), "cc").unwrap();
        let spec = TemplateSpec::from_arg(f.to_str().unwrap()).unwrap();
        assert_eq!(spec, TemplateSpec::File(f.clone()));
        let t = load(&spec, None).unwrap();
        assert_eq!(t.combinations().collect::<Vec<_>>(), ["a, cc", "b, cc"]);
        assert_eq!(
            TemplateSpec::from_arg("1girl").unwrap(),
            TemplateSpec::Builtin("1girl".into())
        );
        assert_eq!(
            TemplateSpec::from_arg("{red|blue} circle").unwrap(),
            TemplateSpec::Inline("{red|blue} circle".into())
        );
        for missing in [
            "nope/missing.txt",
            "x/y.tmpl",
            "my_templte.TXT",
            "prompts/a",
        ] {
            let e = TemplateSpec::from_arg(missing).unwrap_err();
            assert!(
                e.to_string().contains("template file not found"),
                "{missing}: {e}"
            );
        }
        for text in ["cat", "1.5 girls", "a cat, v1.2", "__x/y__", "{a|b}.png"] {
            assert!(
                matches!(TemplateSpec::from_arg(text), Ok(TemplateSpec::Inline(_))),
                "{text}"
            );
        }
        // A folder: its template.txt, else an error.
        let dir = d.path().to_str().unwrap();
        let e = TemplateSpec::from_arg(dir).unwrap_err();
        assert!(
            e.to_string().contains("a folder without a template.txt"),
            "{e}"
        );
        std::fs::write(d.path().join("template.txt"), "x").unwrap();
        assert_eq!(
            TemplateSpec::from_arg(dir).unwrap(),
            TemplateSpec::File(d.path().join("template.txt"))
        );
        let e = load(&spec, Some(&d.path().join("absent"))).unwrap_err();
        assert!(e.to_string().contains("wildcard folder not found"), "{e}");
        // A byte-order mark is not text of the first prompt.
        std::fs::write(&f, "\u{feff}{a|b}, __c__").unwrap();
        let t = load(&spec, None).unwrap();
        assert_eq!(t.combinations().collect::<Vec<_>>(), ["a, cc", "b, cc"]);
        // A template without wildcards reads no wildcard files: its folder
        // may hold anything, here a dangling link.
        let loose = d.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::write(loose.join("t.txt"), "{red|blue} circle").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(loose.join("gone"), loose.join("broken.txt")).unwrap();
        let t = load(&TemplateSpec::File(loose.join("t.txt")), None).unwrap();
        assert_eq!(t.combinations().count(), 2);
        // A non-UTF-8 template is named.
        std::fs::write(&f, b"\xff\xfe").unwrap();
        let e = load(&spec, None).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
