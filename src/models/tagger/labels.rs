//! The tag list of a WD tagger (`selected_tags.csv`) and tag-name handling.
//!
//! Format (SmilingWolf's WD v2/v3 repos): a header `tag_id,name,category,count`
//! and one row per model output, in output order. Categories are
//! Danbooru's: 0 general, 1 artist, 3 copyright, 4 character, 5 meta,
//! 9 rating (the v3 lists use 0, 4 and 9; the four rating rows come first).
//! The reference script (neggles/wdv3-timm) reads only the `name` and
//! `category` columns by name, so those two columns are required and the
//! others are optional; fields may be quoted (RFC 4180).
//!
//! Tag names keep Danbooru's underscores in the file; [`display_name`]
//! writes them with spaces, except for kaomoji such as `^_^` and `>_<`
//! (the list SmilingWolf's tagger demo uses), whose underscore is part of
//! the face. [`tag_key`] is the normal form used to compare a prompt's tag
//! with the tagger's vocabulary.

use std::collections::HashMap;
use std::path::Path;

use crate::error::IoContext;
use crate::{Error, Result};

/// Danbooru category of rating tags (`general`, `sensitive`, `questionable`, `explicit`).
pub const CATEGORY_RATING: u32 = 9;
/// Danbooru category of general tags.
pub const CATEGORY_GENERAL: u32 = 0;
/// Danbooru category of character tags.
pub const CATEGORY_CHARACTER: u32 = 4;

/// Kaomoji tags whose underscores are kept (SmilingWolf's tagger demo list).
pub const KAOMOJI: &[&str] = &[
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
];

/// Is `tag` (as written in the file or with spaces) a kaomoji?
pub fn is_kaomoji(tag: &str) -> bool {
    KAOMOJI.contains(&tag.trim())
}

/// A tag as written in a caption: underscores become spaces, except in
/// kaomoji (`long_hair` → `long hair`, `^_^` stays).
pub fn display_name(tag: &str) -> String {
    let t = tag.trim();
    if is_kaomoji(t) {
        t.to_string()
    } else {
        t.replace('_', " ")
    }
}

/// Normal form for matching a prompt's tag against the vocabulary:
/// display form, lowercase, runs of whitespace collapsed.
pub fn tag_key(tag: &str) -> String {
    display_name(tag)
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The model's outputs, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// Tag names as in the file (underscores kept).
    pub names: Vec<String>,
    /// Danbooru category of each output.
    pub categories: Vec<u32>,
    by_key: HashMap<String, usize>,
}

/// Split one CSV line into fields (RFC 4180 quoting: `"a,b"`, `""` inside quotes).
fn split_csv_line(line: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
            at_start = true;
        } else {
            cur.push(c);
            at_start = false;
        }
    }
    if quoted {
        return Err("unterminated quoted field");
    }
    out.push(cur);
    Ok(out)
}

impl Labels {
    /// Build from `(name, category)` pairs in output order.
    pub fn new(rows: Vec<(String, u32)>) -> Self {
        let mut by_key = HashMap::with_capacity(rows.len());
        for (k, (name, _)) in rows.iter().enumerate() {
            // The first output wins if two names share a key.
            by_key.entry(tag_key(name)).or_insert(k);
        }
        let (names, categories) = rows.into_iter().unzip();
        Self {
            names,
            categories,
            by_key,
        }
    }

    /// Read `selected_tags.csv`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        Self::parse(&text).map_err(|e| Error::model(format!("{}: {e}", path.display())))
    }

    /// Parse the CSV text (errors name the line; the caller adds the file).
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or_else(|| {
            Error::model("empty file; expected the header tag_id,name,category,count")
        })?;
        let header = split_csv_line(header.trim_start_matches('\u{feff}'))
            .map_err(|e| Error::model(format!("line 1: {e}")))?;
        let col = |name: &str| header.iter().position(|h| h.trim() == name);
        let (Some(name_col), Some(cat_col)) = (col("name"), col("category")) else {
            return Err(Error::model(format!(
                "expected the header tag_id,name,category,count (columns `name` and `category` are required); found {:?}",
                header.join(",")
            )));
        };
        let mut rows = Vec::new();
        for (no, line) in lines {
            let fields =
                split_csv_line(line).map_err(|e| Error::model(format!("line {no}: {e}")))?;
            if fields.len() != header.len() {
                return Err(Error::model(format!(
                    "line {no}: {} fields where the header has {} ({line:?}); the file is damaged or not a WD tag list",
                    fields.len(),
                    header.len()
                )));
            }
            let name = fields[name_col].trim().to_string();
            if name.is_empty() {
                return Err(Error::model(format!("line {no}: empty tag name")));
            }
            let cat: u32 = fields[cat_col].trim().parse().map_err(|_| {
                Error::model(format!(
                    "line {no}: category {:?} is not a number (0 general, 4 character, 9 rating)",
                    fields[cat_col]
                ))
            })?;
            rows.push((name, cat));
        }
        if rows.is_empty() {
            return Err(Error::model("no tags after the header"));
        }
        Ok(Self::new(rows))
    }

    /// Number of outputs.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// No outputs at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Output index of a tag given in any spelling (`red hair`, `Red_Hair`).
    pub fn index_of(&self, tag: &str) -> Option<usize> {
        self.by_key.get(&tag_key(tag)).copied()
    }

    /// Indices of the outputs of one category, in output order.
    pub fn indices(&self, category: u32) -> Vec<usize> {
        (0..self.len())
            .filter(|&k| self.categories[k] == category)
            .collect()
    }

    /// The CSV text of this list (`tag_id,name,category,count`; ids are the
    /// output index, counts 0).
    pub fn to_csv(&self) -> String {
        let mut s = String::from("tag_id,name,category,count\n");
        for (k, (n, c)) in self.names.iter().zip(&self.categories).enumerate() {
            let field = if n.contains([',', '"']) {
                format!("\"{}\"", n.replace('"', "\"\""))
            } else {
                n.clone()
            };
            s.push_str(&format!("{k},{field},{c},0\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_wd_layout_with_quotes_and_crlf() {
        let l = Labels::parse(
            "tag_id,name,category,count\r\n9999999,general,9,807366\r\n470575,1girl,0,4803898\r\n1,\"a,b\",0,5\r\n212816,^_^,0,1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(l.names, ["general", "1girl", "a,b", "^_^"]);
        assert_eq!(l.categories, [9, 0, 0, 0]);
        assert_eq!(l.indices(CATEGORY_RATING), [0]);
        assert_eq!(Labels::parse(&l.to_csv()).unwrap(), l);
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, want) in [
            ("", "empty file"),
            ("id,tag,kind\n1,a,0\n", "columns `name` and `category`"),
            ("tag_id,name,category,count\n1,a,0\n", "line 2: 3 fields"),
            (
                "tag_id,name,category,count\n1,a,0,1\n2,b,x,1\n",
                "line 3: category",
            ),
            ("tag_id,name,category,count\n1,,0,1\n", "empty tag name"),
            ("tag_id,name,category,count\n", "no tags"),
            ("tag_id,name,category,count\n1,\"a,0,1\n", "unterminated"),
        ] {
            let e = Labels::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn display_and_key_keep_kaomoji() {
        assert_eq!(display_name("long_hair"), "long hair");
        assert_eq!(display_name("^_^"), "^_^");
        assert_eq!(display_name(">_<"), ">_<");
        assert_eq!(
            display_name("ganyu_(genshin_impact)"),
            "ganyu (genshin impact)"
        );
        assert_eq!(tag_key(" Long_Hair "), "long hair");
        assert_eq!(tag_key("long  hair"), "long hair");
        let l = Labels::new(vec![("long_hair".into(), 0), ("^_^".into(), 0)]);
        assert_eq!(l.index_of("Long Hair"), Some(0));
        assert_eq!(l.index_of("^_^"), Some(1));
        assert_eq!(l.index_of("^ ^"), None);
    }
}
