//! Parser of the template language into a [`Node`] tree, with the
//! whitespace and comment rules of dynamicprompts 0.31's pyparsing grammar
//! (`dynamicprompts/parser/parse.py`), so that a template both tools accept
//! gives the same text:
//!
//! - literal text runs to the next `{`, `#`, `__` (and, inside a variant, to
//!   `|` or `}`); it keeps its whitespace (`"  a  "` stays as is);
//! - `#` starts a comment to the end of the line (the newline stays). At a
//!   token boundary a comment also swallows the whitespace before it, and
//!   literal pieces that only a comment separates are joined with one space
//!   (pyparsing's `" ".join` of a literal sequence): `"x # c\ny"` → `"x  \ny"`;
//! - `{[N$$ | N-M$$ | -M$$ | N-$$][SEP$$] [W::]opt | … }`: whitespace (and
//!   comments) before an option, its weight and the closing brace are
//!   dropped, whitespace at the end of an option is kept (`{ a | b }` gives
//!   `"a "` and `"b "`); a weight must touch its `::` (`[+-]?(\d+\.\d*|\.\d+)`
//!   or `\d+`);
//! - `__name__` refers to a wildcard file (`hair/colour`, globs `hair/*`).
//!
//! Deliberately stricter than dynamicprompts, which turns these mistakes
//! into text: an unbalanced `{` or `}`, an unclosed `__`, an empty variant
//! list (`{}`), a negative or all-zero weight list, and the constructs of
//! dynamicprompts this crate does not implement (`${variables}`,
//! `%{wrap}`, sampler prefixes `~ ! @`, variants inside wildcard names) are
//! errors naming the source, line and column. Deliberately more lenient: a
//! lone `$` or `%` is literal text (dynamicprompts refuses `100% cotton`).

use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// Where a piece of template text comes from, for error messages:
/// `name:line:col` of its first character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// File path or a description (`template (command line)`).
    pub name: Arc<str>,
    /// 1-based line of the text's first character.
    pub line: usize,
    /// 1-based column of the text's first character.
    pub col: usize,
}

impl Source {
    /// Text that starts at line 1, column 1 of `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            line: 1,
            col: 1,
        }
    }

    /// `name:line:col` of byte offset `at` of `text` (which starts at this source).
    pub fn locate(&self, text: &str, at: usize) -> Location {
        let before = &text[..at.min(text.len())];
        let nl = before.matches('\n').count();
        let col_chars = match before.rfind('\n') {
            Some(i) => before[i + 1..].chars().count() + 1,
            None => before.chars().count() + self.col,
        };
        Location {
            name: self.name.clone(),
            line: self.line + nl,
            col: col_chars,
        }
    }
}

/// A resolved position: file (or description), line, column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File path or description.
    pub name: Arc<str>,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.name, self.line, self.col)
    }
}

/// A config error `location: message`.
pub(crate) fn err_at(loc: &Location, msg: impl fmt::Display) -> Error {
    Error::config(format!("{loc}: {msg}"))
}

/// A parsed template.
#[derive(Debug, Clone)]
pub enum Node {
    /// Literal text.
    Text(String),
    /// Parts concatenated (dynamicprompts `SequenceCommand`; never of length 1).
    Seq(Vec<Node>),
    /// `{…|…}`.
    Variant(Box<Variant>),
    /// `__name__`.
    Wildcard(Box<Wildcard>),
}

/// `{[bounds$$][sep$$] w::a | b | …}`.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Options with their weights (1 when not given).
    pub options: Vec<(f64, Node)>,
    /// Fewest options picked (after sorting the bounds, ≥ 0).
    pub min: usize,
    /// Most options picked.
    pub max: usize,
    /// Joiner of several picked options (`,` by default).
    pub sep: String,
    /// Where the `{` is.
    pub at: Location,
}

/// `__pattern__`, with its matching entries once resolved.
#[derive(Debug, Clone)]
pub struct Wildcard {
    /// The cleaned pattern (`hair/colour`, `hair/*`).
    pub pattern: String,
    /// Where the opening `__` is.
    pub at: Location,
    /// The sorted, de-duplicated entries of every matching file, each
    /// parsed; filled by [`super::Template::compile`].
    pub entries: Option<Arc<Vec<Node>>>,
}

/// Structural equality as dynamicprompts' dataclass `==` (used to drop
/// equal options from combinatorial permutations): positions and resolved
/// entries are ignored, weights, bounds and separators are not.
impl PartialEq for Node {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Node::Text(a), Node::Text(b)) => a == b,
            (Node::Seq(a), Node::Seq(b)) => a == b,
            (Node::Variant(a), Node::Variant(b)) => {
                a.min == b.min && a.max == b.max && a.sep == b.sep && a.options == b.options
            }
            (Node::Wildcard(a), Node::Wildcard(b)) => a.pattern == b.pattern,
            _ => false,
        }
    }
}

/// dynamicprompts' `_parse_sequence_or_single_command`: one part stays
/// itself, several become a sequence (none: an empty sequence).
fn seq_or_single(mut parts: Vec<Node>) -> Node {
    if parts.len() == 1 {
        parts.pop().unwrap_or(Node::Seq(Vec::new()))
    } else {
        Node::Seq(parts)
    }
}

/// Parse `text` (from `src`) into a tree. Wildcards are not resolved here.
pub fn parse(text: &str, src: &Source) -> Result<Node> {
    let mut p = Parser {
        text,
        pos: 0,
        src,
        depth: 0,
    };
    let node = p.sequence(false)?;
    if p.pos < text.len() {
        // Only a stray `}` stops the top-level sequence.
        return Err(p.err(p.pos, "unbalanced `}`: there is no `{` to close"));
    }
    Ok(node)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    src: &'a Source,
    /// Variants open around `pos`.
    depth: usize,
}

/// Deepest nesting of variants accepted: far past any template, and far
/// from the stack's end (parsing and expansion recurse per level; 100,000
/// nested `{` aborted the process).
pub const MAX_DEPTH: usize = 64;

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn loc(&self, at: usize) -> Location {
        self.src.locate(self.text, at)
    }

    fn err(&self, at: usize, msg: impl fmt::Display) -> Error {
        err_at(&self.loc(at), msg)
    }

    fn skip_ws(&mut self) {
        let n = self.rest().len() - self.rest().trim_start_matches(is_ws).len();
        self.pos += n;
    }

    /// pyparsing's ignorables before a token: `[ws]* # … ` repeated (the
    /// comment expression skips whitespace before its `#`); whitespace not
    /// followed by a comment stays.
    fn skip_ignorables(&mut self) {
        loop {
            let save = self.pos;
            self.skip_ws();
            if self.rest().starts_with('#') {
                let end = self.rest().find('\n').unwrap_or(self.rest().len());
                self.pos += end;
            } else {
                self.pos = save;
                return;
            }
        }
    }

    /// A sequence of chunks up to the end of the text, or (inside a
    /// variant option) up to its `|` / `}`.
    fn sequence(&mut self, in_variant: bool) -> Result<Node> {
        let mut parts = Vec::new();
        let mut pieces: Vec<String> = Vec::new();
        let flush = |pieces: &mut Vec<String>, parts: &mut Vec<Node>| {
            if !pieces.is_empty() {
                parts.push(Node::Text(pieces.join(" ")));
                pieces.clear();
            }
        };
        loop {
            self.skip_ignorables();
            let rest = self.rest();
            let Some(c) = rest.chars().next() else { break };
            if c == '{' {
                flush(&mut pieces, &mut parts);
                parts.push(Node::Variant(Box::new(self.variant()?)));
            } else if rest.starts_with("__") {
                flush(&mut pieces, &mut parts);
                parts.push(Node::Wildcard(Box::new(self.wildcard()?)));
            } else if rest.starts_with("${") {
                return Err(self.err(
                    self.pos,
                    "`${…}` variables are not supported by eps2v's template language; write the text out or use a wildcard",
                ));
            } else if rest.starts_with("%{") {
                return Err(self.err(
                    self.pos,
                    "`%{…}` wrap commands are not supported by eps2v's template language",
                ));
            } else if c == '}' || (in_variant && c == '|') {
                break;
            } else {
                let lit = self.literal(in_variant);
                pieces.push(lit.to_string());
            }
        }
        flush(&mut pieces, &mut parts);
        Ok(seq_or_single(parts))
    }

    /// Literal text from here (at least one character).
    fn literal(&mut self, in_variant: bool) -> &str {
        let start = self.pos;
        let rest = self.rest();
        let mut end = rest.len();
        let mut it = rest.char_indices().peekable();
        while let Some((i, c)) = it.next() {
            let stop = match c {
                '{' | '#' | '}' => true,
                '|' => in_variant,
                '_' => it.peek().is_some_and(|&(_, n)| n == '_'),
                '$' | '%' => it.peek().is_some_and(|&(_, n)| n == '{'),
                _ => false,
            };
            if stop && i > 0 {
                end = i;
                break;
            }
        }
        self.pos += end;
        &self.text[start..start + end]
    }

    fn variant(&mut self) -> Result<Variant> {
        if self.depth == MAX_DEPTH {
            return Err(self.err(
                self.pos,
                format!("variants nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.depth += 1;
        let v = self.variant_body();
        self.depth -= 1;
        v
    }

    fn variant_body(&mut self) -> Result<Variant> {
        let open = self.pos;
        self.pos += 1; // `{`
        self.skip_ignorables();
        self.skip_ws();
        self.skip_ignorables();
        if let Some(c @ ('~' | '!' | '@')) = self.rest().chars().next() {
            return Err(self.err(
                self.pos,
                format!("sampler prefix `{c}` is not supported; eps2v picks the sampling mode per run (random or --combinatorial)"),
            ));
        }
        let bounds = self.bounds();
        let (min, max, sep) = match bounds {
            Some((lo, hi, sep)) => (lo, hi, sep),
            None => (Some(1), Some(1), ",".to_string()),
        };
        let mut options = Vec::new();
        loop {
            self.skip_ignorables();
            self.skip_ws();
            self.skip_ignorables();
            let weight = self.weight()?;
            let node = self.sequence(true)?;
            self.skip_ignorables();
            self.skip_ws();
            self.skip_ignorables();
            options.push((weight.unwrap_or(1.0), node));
            match self.rest().chars().next() {
                Some('|') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    break;
                }
                _ => {
                    return Err(self.err(
                        open,
                        "unbalanced `{`: this variant is never closed with `}`",
                    ))
                }
            }
        }
        let at = self.loc(open);
        if options.len() == 1 && matches!(&options[0].1, Node::Seq(s) if s.is_empty()) {
            return Err(err_at(
                &at,
                "empty variant list `{}`: give at least one option (`{a|b}`), or `{|a}` for an optional part",
            ));
        }
        if options.iter().any(|(w, _)| !w.is_finite() || *w < 0.0) {
            return Err(err_at(
                &at,
                "variant weights must be finite, zero or positive",
            ));
        }
        if options.iter().all(|(w, _)| *w == 0.0) {
            return Err(err_at(
                &at,
                "every option of this variant has weight 0; give one a positive weight",
            ));
        }
        // dynamicprompts: a missing lower bound is 1, a missing upper bound
        // the number of options; bounds are sorted and clamped at 0.
        let lo = min.unwrap_or(1);
        let hi = max.unwrap_or(options.len());
        Ok(Variant {
            options,
            min: lo.min(hi),
            max: lo.max(hi),
            sep,
            at,
        })
    }

    /// `N$$`, `N-M$$`, `-M$$`, `N-$$`, each optionally followed by
    /// `SEP$$`; `None` (position unchanged) when there is none.
    fn bounds(&mut self) -> Option<(Option<usize>, Option<usize>, String)> {
        let save = self.pos;
        self.skip_ignorables();
        let rest = self.rest();
        let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let num = |s: &str| s.parse::<usize>().ok();
        let d1 = digits(rest);
        let (lo, hi, used) = if d1 > 0 {
            let after = &rest[d1..];
            if let Some(r) = after.strip_prefix('-') {
                let d2 = digits(r);
                if d2 > 0 {
                    (num(&rest[..d1]), num(&r[..d2]), d1 + 1 + d2)
                } else {
                    (num(&rest[..d1]), None, d1 + 1)
                }
            } else {
                let n = num(&rest[..d1]);
                (n, n, d1)
            }
        } else if let Some(r) = rest.strip_prefix('-') {
            let d2 = digits(r);
            if d2 == 0 {
                self.pos = save;
                return None;
            }
            (None, num(&r[..d2]), 1 + d2)
        } else {
            self.pos = save;
            return None;
        };
        if !rest[used..].starts_with("$$") {
            self.pos = save;
            return None;
        }
        self.pos += used + 2;
        // Optional separator: printable ASCII or space except `$ { }`, then `$$`.
        let rest = self.rest();
        let n = rest
            .char_indices()
            .find(|&(_, c)| !((c == ' ' || c.is_ascii_graphic()) && !matches!(c, '$' | '{' | '}')))
            .map_or(rest.len(), |(i, _)| i);
        let sep = if n > 0 && rest[n..].starts_with("$$") {
            let s = rest[..n].to_string();
            self.pos += n + 2;
            s
        } else {
            ",".to_string()
        };
        Some((lo, hi, sep))
    }

    /// `W::` right here (no whitespace inside), returning W.
    fn weight(&mut self) -> Result<Option<f64>> {
        let rest = self.rest();
        let b = rest.as_bytes();
        let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
        let sign = usize::from(matches!(b.first(), Some(b'+' | b'-')));
        // real: [+-]?(\d+\.\d*|\.\d+)
        let d = digits(sign);
        let mut len = 0;
        if d > 0 && b.get(sign + d) == Some(&b'.') {
            len = sign + d + 1 + digits(sign + d + 1);
        } else if d == 0 && b.get(sign) == Some(&b'.') {
            let f = digits(sign + 1);
            if f > 0 {
                len = sign + 1 + f;
            }
        }
        // integer: \d+ (no sign)
        if len == 0 && sign == 0 && d > 0 {
            len = d;
        }
        if len == 0 || !rest[len..].starts_with("::") {
            return Ok(None);
        }
        let at = self.pos;
        let w: f64 = rest[..len]
            .parse()
            .map_err(|_| self.err(at, format!("bad weight {:?}", &rest[..len])))?;
        self.pos += len + 2;
        Ok(Some(w))
    }

    fn wildcard(&mut self) -> Result<Wildcard> {
        let open = self.pos;
        self.pos += 2;
        let rest = self.rest();
        let Some(end) = rest.find("__") else {
            return Err(self.err(
                open,
                "unclosed wildcard: `__` has no closing `__` (write `__name__`)",
            ));
        };
        let raw = &rest[..end];
        let bad = |msg: &str| Err(self.err(open, msg));
        if raw.starts_with(['~', '!', '@']) {
            return bad("sampler prefixes (`~ ! @`) in wildcards are not supported");
        }
        if raw.contains(['{', '}', '|']) {
            return bad("variants inside a wildcard name are not supported; write the names out: `{__a__|__b__}`");
        }
        if raw.contains(['(', ')']) {
            return bad("wildcard variables `__name(var=…)__` are not supported");
        }
        if raw.contains(['#', '$', '%', '\n']) {
            return bad(
                "unclosed wildcard: `__` has no closing `__` on this line (write `__name__`)",
            );
        }
        let pattern = clean_pattern(raw).map_err(|m| self.err(open, m))?;
        self.pos += end + 2;
        Ok(Wildcard {
            pattern,
            at: self.loc(open),
            entries: None,
        })
    }
}

/// dynamicprompts `clean_wildcard`: `\` and `/` runs become one `/`,
/// leading/trailing `/` go; `..` and empty names are refused.
pub fn clean_pattern(raw: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut prev_sep = false;
    for c in raw.chars() {
        if c == '/' || c == '\\' {
            if !prev_sep {
                out.push('/');
            }
            prev_sep = true;
        } else {
            out.push(c);
            prev_sep = false;
        }
    }
    let out = out.trim_matches('/').to_string();
    if out.is_empty() {
        return Err("empty wildcard name `____`".into());
    }
    if out.contains("..") {
        return Err(format!("wildcard name {out:?} may not contain `..`"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str) -> Node {
        parse(t, &Source::new("t.txt")).unwrap()
    }

    fn e(t: &str) -> String {
        parse(t, &Source::new("t.txt")).unwrap_err().to_string()
    }

    fn text(n: &Node) -> &str {
        match n {
            Node::Text(s) => s,
            other => panic!("not text: {other:?}"),
        }
    }

    fn variant(n: &Node) -> &Variant {
        match n {
            Node::Variant(v) => v,
            other => panic!("not a variant: {other:?}"),
        }
    }

    /// Regressions: 100,000 nested variants overflowed the stack (the
    /// process aborted); a weight of 1 followed by 310 zeros (infinite)
    /// took every draw.
    #[test]
    fn deep_nesting_and_infinite_weights_are_errors() {
        let nested = |n: usize| format!("{}a{}", "{".repeat(n), "}".repeat(n));
        p(&nested(MAX_DEPTH));
        let msg = e(&nested(100_000));
        assert!(
            msg.contains("t.txt:1:65") && msg.contains("nested deeper than 64"),
            "{msg}"
        );
        let msg = e(&format!("{{1{}::a|1::b}}", "0".repeat(310)));
        assert!(msg.contains("must be finite"), "{msg}");
    }

    #[test]
    fn literals_keep_whitespace_and_bars_at_top_level() {
        assert_eq!(text(&p("  a | b  ")), "  a | b  ");
        assert_eq!(text(&p("100% cotton, $5")), "100% cotton, $5");
        assert_eq!(text(&p("a_b")), "a_b");
    }

    #[test]
    fn comments_follow_pyparsing() {
        assert_eq!(text(&p("x # c\ny")), "x  \ny");
        assert_eq!(text(&p("x # c\n  # d\ny")), "x  \ny");
        assert_eq!(text(&p("a#c\n#d\nb")), "a \nb");
        assert_eq!(text(&p("a #c")), "a ");
        assert_eq!(text(&p("#c\nb")), "\nb");
        let n = p("{a|b} #c\nx");
        let Node::Seq(parts) = &n else { panic!() };
        assert_eq!(text(&parts[1]), "\nx");
    }

    #[test]
    fn variants_options_weights_and_whitespace() {
        let v = p("{ a | b }");
        let v = variant(&v);
        assert_eq!(text(&v.options[0].1), "a ");
        assert_eq!(text(&v.options[1].1), "b ");
        assert_eq!((v.min, v.max, v.sep.as_str()), (1, 1, ","));
        let n = p("{0.5::a|2::b|c|+2.0::d|.5::e|2.::f}");
        let w: Vec<f64> = variant(&n).options.iter().map(|o| o.0).collect();
        assert_eq!(w, [0.5, 2.0, 1.0, 2.0, 0.5, 2.0]);
        // A weight must touch its `::`; `1e3` is not a weight.
        let n = p("{ 2 :: a|1e3::b|2:: c}");
        let v = variant(&n);
        assert_eq!(text(&v.options[0].1), "2 :: a");
        assert_eq!(text(&v.options[1].1), "1e3::b");
        assert_eq!((v.options[2].0, text(&v.options[2].1)), (2.0, " c"));
        // Optional parts: empty options are fine.
        let n = p("{|a}");
        assert!(matches!(&variant(&n).options[0].1, Node::Seq(s) if s.is_empty()));
    }

    #[test]
    fn counts_ranges_and_joiners() {
        let b = |t: &str| {
            let n = p(t);
            let v = variant(&n);
            (v.min, v.max, v.sep.clone())
        };
        assert_eq!(b("{2$$a|b|c}"), (2, 2, ",".into()));
        assert_eq!(b("{1-3$$a|b|c}"), (1, 3, ",".into()));
        assert_eq!(b("{3-1$$a|b|c}"), (1, 3, ",".into()));
        assert_eq!(b("{-2$$a|b|c}"), (1, 2, ",".into()));
        assert_eq!(b("{2-$$a|b|c}"), (2, 3, ",".into()));
        assert_eq!(b("{2$$ and $$a|b|c}"), (2, 2, " and ".into()));
        assert_eq!(b("{ 2$$ , $$a|b}"), (2, 2, " , ".into()));
        assert_eq!(b("{0$$a|b}"), (0, 0, ",".into()));
        // `SEP` stops at `}`: `a|b` is not a separator here.
        assert_eq!(b("{2$$a|b}"), (2, 2, ",".into()));
        // Not a bound: `2` without `$$` is an option.
        assert_eq!(variant(&p("{2|3}")).options.len(), 2);
    }

    #[test]
    fn nesting_and_wildcards() {
        let n = p("a {b|{c|__hair/colour__}} __x\\\\y/__");
        let Node::Seq(parts) = &n else { panic!() };
        assert_eq!(parts.len(), 4);
        let inner = variant(&variant(&parts[1]).options[1].1);
        let Node::Wildcard(w) = &inner.options[1].1 else {
            panic!()
        };
        assert_eq!(w.pattern, "hair/colour");
        assert_eq!(w.at.to_string(), "t.txt:1:9");
        let Node::Wildcard(w) = &parts[3] else {
            panic!()
        };
        assert_eq!(w.pattern, "x/y");
        // Structural equality ignores positions.
        assert_eq!(p("{a|b}"), p("{a|b}"));
        assert_ne!(p("{a|b}"), p("{2::a|b}"));
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(
            e("a,\n  {b|c"),
            "t.txt:2:3: unbalanced `{`: this variant is never closed with `}`"
        );
        assert!(
            e("a}").starts_with("t.txt:1:2: unbalanced `}`"),
            "{}",
            e("a}")
        );
        assert!(e("x {}").starts_with("t.txt:1:3: empty variant list"));
        assert!(e("{ }").contains("empty variant list"));
        assert!(e("{2$$}").contains("empty variant list"));
        assert!(e("a __hair").starts_with("t.txt:1:3: unclosed wildcard"));
        assert!(e("a__b").contains("unclosed wildcard"));
        assert!(e("____").contains("empty wildcard name"));
        assert!(e("__a/../b__").contains("`..`"));
        assert!(e("{-1.5::a|b}").contains("zero or positive"));
        // `-1` is no weight at all (dynamicprompts: a signed weight needs a dot).
        assert_eq!(text(&variant(&p("{-1::a|b}")).options[0].1), "-1::a");
        assert!(e("{0::a|0::b}").contains("weight 0"));
        assert!(e("${x=a}").contains("variables are not supported"));
        assert!(e("%{a$$b}").contains("wrap"));
        assert!(e("{~a|b}").contains("sampler prefix"));
        assert!(e("__{a|b}__").contains("variants inside a wildcard name"));
        assert!(e("__a(x=1)__").contains("wildcard variables"));
        // Columns count characters, not bytes.
        assert!(e("é {").starts_with("t.txt:1:3:"), "{}", e("é {"));
        // Sources that start mid-file (wildcard entries) offset the first line.
        let src = Source {
            name: "w.txt".into(),
            line: 4,
            col: 3,
        };
        let msg = parse("ab{", &src).unwrap_err().to_string();
        assert!(msg.starts_with("w.txt:4:5:"), "{msg}");
    }
}
