//! Wildcard files: a folder of `.txt` files, one entry per line, found by
//! `__name__` (the path without `.txt`, `/`-separated: `__hair/colour__`)
//! or a glob (`__hair/*__`).
//!
//! Follows dynamicprompts 0.31 (`wildcards/wildcard_manager.py`,
//! `collection/text_file.py`, `tree/build.py`): the folder is walked
//! recursively (hidden folders skipped); each line is stripped, empty lines
//! and lines starting with `#` are skipped; a pattern is matched with
//! Python's `fnmatch` rules against every file name (`*` also crosses `/`),
//! and when nothing matches, `**/pattern` is tried (so `__colour__` finds
//! `hair/colour.txt`); the entries of every match are de-duplicated and
//! sorted by their text. Each entry is itself a template (nesting).
//! Only `.txt` files are read (dynamicprompts' JSON/YAML pantries are not
//! supported).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::IoContext;
use crate::{Error, Result};

/// One entry of a wildcard file, with its position for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stripped line.
    pub text: String,
    /// 1-based line in its file.
    pub line: usize,
    /// 1-based column of the first character after the stripped whitespace.
    pub col: usize,
}

/// One wildcard file.
#[derive(Debug, Clone)]
pub struct WildcardFile {
    /// Name used in templates (`hair/colour`).
    pub name: String,
    /// Where it was read from, for messages.
    pub path: Arc<str>,
    /// Its raw text (for the plan fingerprint).
    pub contents: String,
    /// Its entries, in file order.
    pub entries: Vec<Entry>,
}

/// A set of wildcard files by name.
#[derive(Debug, Clone, Default)]
pub struct WildcardSet {
    /// Folder (or `builtin:…` label) the files came from; `None` when empty.
    pub origin: Option<String>,
    files: BTreeMap<String, WildcardFile>,
}

/// Split `contents` into entries as dynamicprompts' text files do
/// (universal newlines, stripped, no empty or `#` lines).
pub fn parse_entries(contents: &str) -> Vec<Entry> {
    let normalised = contents.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = Vec::new();
    for (i, line) in normalised.split('\n').enumerate() {
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let lead = line.len() - line.trim_start().len();
        out.push(Entry {
            text: text.to_string(),
            line: i + 1,
            col: line[..lead].chars().count() + 1,
        });
    }
    out
}

impl WildcardSet {
    /// No wildcard files (templates without `__…__`).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every `.txt` file under `dir` (recursive; folders starting with `.`
    /// are skipped, symlinks followed). Undecodable bytes are dropped, as
    /// dynamicprompts reads with `errors="ignore"`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::config(format!(
                "{}: wildcard folder not found; pass an existing folder of .txt files with --wildcards",
                dir.display()
            )));
        }
        let mut set = Self {
            origin: Some(dir.display().to_string()),
            files: BTreeMap::new(),
        };
        // Folders reached without a link are walked first, then the ones
        // behind a link, each in name order: a folder reachable both ways
        // keeps its real name, whatever order the file system lists it in.
        let mut real: Vec<PathBuf> = vec![dir.to_path_buf()];
        let mut linked: Vec<PathBuf> = Vec::new();
        // Linked folders are followed once each: a link back up the tree
        // (`all -> .`) walked it again until the kernel's link limit, two
        // of them 2^40 times.
        let mut visited = std::collections::HashSet::new();
        while let Some((d, via_link)) = real
            .pop()
            .map(|d| (d, false))
            .or_else(|| linked.pop().map(|d| (d, true)))
        {
            if !visited.insert(std::fs::canonicalize(&d).at(&d)?) {
                continue;
            }
            let mut entries = std::fs::read_dir(&d)
                .at(&d)?
                .collect::<std::io::Result<Vec<_>>>()
                .at(&d)?;
            entries.sort_by_key(|e| e.file_name());
            let mut subdirs = Vec::new();
            for entry in entries {
                let path = entry.path();
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if path.is_dir() {
                    if !hidden {
                        let link = via_link || entry.file_type().is_ok_and(|t| t.is_symlink());
                        subdirs.push((path, link));
                    }
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("txt") {
                    continue;
                }
                let rel = path.strip_prefix(dir).unwrap_or(&path).with_extension("");
                let name = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let bytes = std::fs::read(&path).at(&path)?;
                let contents =
                    String::from_utf8_lossy(&bytes).replace(['\u{FFFD}', '\u{FEFF}'], "");
                set.add(&name, &path.display().to_string(), contents);
            }
            // Popped in name order.
            for (path, link) in subdirs.into_iter().rev() {
                if link {
                    linked.push(path);
                } else {
                    real.push(path);
                }
            }
        }
        Ok(set)
    }

    /// A set from in-memory files `(name, contents)`; `origin` labels them
    /// in messages (`builtin:1girl/wildcards`).
    pub fn from_files(origin: &str, files: &[(&str, &str)]) -> Self {
        let mut set = Self {
            origin: Some(origin.to_string()),
            files: BTreeMap::new(),
        };
        for (name, contents) in files {
            set.add(name, &format!("{origin}/{name}.txt"), contents.to_string());
        }
        set
    }

    fn add(&mut self, name: &str, path: &str, contents: String) {
        let entries = parse_entries(&contents);
        self.files.insert(
            name.to_string(),
            WildcardFile {
                name: name.to_string(),
                path: path.into(),
                contents,
                entries,
            },
        );
    }

    /// Names of all files, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// A file by exact name.
    pub fn file(&self, name: &str) -> Option<&WildcardFile> {
        self.files.get(name)
    }

    /// The files a (cleaned) pattern matches, with the `**/` fallback.
    pub fn matching(&self, pattern: &str) -> Vec<&WildcardFile> {
        let direct: Vec<&WildcardFile> = self
            .files
            .values()
            .filter(|f| fnmatch(&f.name, pattern))
            .collect();
        if direct.iter().any(|f| !f.entries.is_empty()) || pattern.starts_with("**") {
            return direct;
        }
        let fallback = format!("**/{pattern}");
        self.files
            .values()
            .filter(|f| fnmatch(&f.name, &fallback))
            .collect()
    }

    /// The entries `pattern` resolves to: those of every matching file,
    /// de-duplicated (first occurrence kept, for its position) and sorted
    /// by text; each with the file it came from. Empty when nothing matches.
    pub fn resolve(&self, pattern: &str) -> Vec<(&Entry, &WildcardFile)> {
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<(&Entry, &WildcardFile)> = Vec::new();
        for f in self.matching(pattern) {
            for e in &f.entries {
                if seen.insert(e.text.as_str()) {
                    out.push((e, f));
                }
            }
        }
        out.sort_by(|a, b| a.0.text.cmp(&b.0.text));
        out
    }
}

/// Python `fnmatch.fnmatchcase`: `*` any run (including `/`), `?` one
/// character, `[abc]` / `[a-z]` / `[!abc]` a class (a `[` without its `]`
/// is literal), everything else literal, matched against the whole name.
pub fn fnmatch(name: &str, pattern: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Classic iterative glob match with one backtrack point for `*`.
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < n.len() {
        if j < p.len() {
            match p[j] {
                '*' => {
                    star = Some((j, i));
                    j += 1;
                    continue;
                }
                '?' => {
                    i += 1;
                    j += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p, j, n[i]) {
                        if matched {
                            i += 1;
                            j = next;
                            continue;
                        }
                    } else if n[i] == '[' {
                        i += 1;
                        j += 1;
                        continue;
                    }
                }
                c if c == n[i] => {
                    i += 1;
                    j += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sj, si)) => {
                j = sj + 1;
                i = si + 1;
                star = Some((sj, si + 1));
            }
            None => return false,
        }
    }
    p[j..].iter().all(|&c| c == '*')
}

/// Match `c` against the class starting at `p[j] == '['`: `Some((matched,
/// index after ']'))`, or `None` when the class is not closed (then `[` is
/// a literal, as in `fnmatch.translate`).
fn class_match(p: &[char], j: usize, c: char) -> Option<(bool, usize)> {
    let mut k = j + 1;
    let negate = p.get(k) == Some(&'!');
    if negate {
        k += 1;
    }
    let start = k;
    // A `]` right after `[` or `[!` is a member.
    if p.get(k) == Some(&']') {
        k += 1;
    }
    while k < p.len() && p[k] != ']' {
        k += 1;
    }
    if k >= p.len() {
        return None;
    }
    let members = &p[start..k];
    let mut hit = false;
    let mut m = 0;
    while m < members.len() {
        if m + 2 < members.len() && members[m + 1] == '-' {
            if members[m] <= c && c <= members[m + 2] {
                hit = true;
            }
            m += 3;
        } else {
            if members[m] == c {
                hit = true;
            }
            m += 1;
        }
    }
    Some((hit != negate, k + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_skip_blank_and_comment_lines() {
        let e = parse_entries("# head\r\n  red hair  \n\n#x\n\tblue # not a comment here\rlast");
        let t: Vec<(&str, usize, usize)> =
            e.iter().map(|e| (e.text.as_str(), e.line, e.col)).collect();
        assert_eq!(
            t,
            [
                ("red hair", 2, 3),
                ("blue # not a comment here", 5, 2),
                ("last", 6, 1)
            ]
        );
    }

    #[test]
    fn fnmatch_follows_python() {
        assert!(fnmatch("hair/colour", "hair/*"));
        assert!(fnmatch("hair/colour/dark", "hair/*"), "* crosses /");
        assert!(fnmatch("hair/colour", "**/colour"));
        assert!(!fnmatch("colour", "**/colour"));
        assert!(fnmatch("eyes", "e?es"));
        assert!(fnmatch("a1", "a[0-9]"));
        assert!(!fnmatch("a1", "a[!0-9]"));
        assert!(fnmatch("a]", "a[]]"));
        assert!(fnmatch("a[b", "a[b"), "unclosed class is literal");
        assert!(!fnmatch("Hair", "hair"), "case-sensitive");
        assert!(fnmatch("abcabd", "a*bd"));
    }

    #[test]
    fn resolve_dedups_sorts_and_falls_back() {
        let set = WildcardSet::from_files(
            "mem",
            &[
                ("hair/colour", "red hair\nblue hair\nred hair\n{a|b} hair\n"),
                ("hair/length", "long hair\nshort hair"),
                ("colour", "green"),
                ("empty", "# nothing\n"),
            ],
        );
        let texts = |p: &str| -> Vec<String> {
            set.resolve(p)
                .into_iter()
                .map(|(e, _)| e.text.clone())
                .collect()
        };
        assert_eq!(
            texts("hair/colour"),
            ["blue hair", "red hair", "{a|b} hair"]
        );
        assert_eq!(
            texts("hair/*"),
            [
                "blue hair",
                "long hair",
                "red hair",
                "short hair",
                "{a|b} hair"
            ]
        );
        assert_eq!(texts("colour"), ["green"], "exact top-level file wins");
        assert_eq!(texts("length"), ["long hair", "short hair"], "**/ fallback");
        assert!(texts("missing").is_empty());
        assert!(texts("empty").is_empty());
        let (e, f) = set.resolve("hair/colour")[1];
        assert_eq!((e.line, f.path.as_ref()), (1, "mem/hair/colour.txt"));
    }

    #[test]
    fn load_dir_walks_folders_and_skips_hidden_ones() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("hair")).unwrap();
        std::fs::create_dir_all(d.path().join(".git")).unwrap();
        std::fs::write(d.path().join("hair/colour.txt"), "red hair\n").unwrap();
        std::fs::write(d.path().join(".git/x.txt"), "no").unwrap();
        std::fs::write(d.path().join("notes.md"), "no").unwrap();
        std::fs::write(d.path().join("bad.txt"), b"ok\xff\n").unwrap();
        let set = WildcardSet::load_dir(d.path()).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["bad", "hair/colour"]);
        assert_eq!(set.file("bad").unwrap().entries[0].text, "ok");
        let e = WildcardSet::load_dir(&d.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("wildcard folder not found"), "{e}");
        // Links back up the tree are walked once, not until ELOOP.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.path(), d.path().join("hair/all")).unwrap();
            std::os::unix::fs::symlink(d.path(), d.path().join("again")).unwrap();
            let set = WildcardSet::load_dir(d.path()).unwrap();
            assert_eq!(
                set.names().count(),
                2,
                "{:?}",
                set.names().collect::<Vec<_>>()
            );
            // A folder also reachable through links, named before and
            // after it, keeps its own name (the walk once depended on the
            // order the file system listed them in).
            for link in ["a_alias", "zz_alias"] {
                std::os::unix::fs::symlink(d.path().join("hair"), d.path().join(link)).unwrap();
            }
            let set = WildcardSet::load_dir(d.path()).unwrap();
            assert_eq!(set.names().collect::<Vec<_>>(), ["bad", "hair/colour"]);
        }
    }
}
