//! A1111 prompt handling: emphasis syntax, `BREAK`, and 75-token chunks for
//! long prompts.
//!
//! Behaviour follows AUTOMATIC1111 stable-diffusion-webui (facts read from
//! `modules/prompt_parser.py::parse_prompt_attention` and
//! `modules/sd_hijack_clip.py::tokenize_line`, emphasis mode "Original",
//! `comma_padding_backtrack` 20, no textual-inversion embeddings):
//! - `(text)` ×1.1, `[text]` ÷1.1, `(text:w)` ×w, nesting multiplies,
//!   unclosed brackets apply to the rest of the prompt, `\(` `\)` `\[` `\]`
//!   `\\` are literals (a lone `\` disappears), `BREAK` (whole word,
//!   upper-case) forces a new chunk; runs of equal weight merge.
//! - Each fragment is tokenized on its own (no BOS/EOS); tokens fill chunks
//!   of 75. When a chunk is full and a comma sits within its last 20 tokens,
//!   the tokens after that comma move to the next chunk. Each chunk is padded
//!   to 75 with EOS and wrapped as BOS + 75 + EOS (weights 1.0 there).
//! - Prompts encoded as one batch are padded to the same number of chunks
//!   with empty chunks (BOS + 76 EOS), as A1111 pads a batch. A prompt and
//!   its negative are not: A1111 (unless its off-by-default "Pad conds"
//!   option is on) runs cond and uncond of different lengths apart, and
//!   [`crate::pipeline::Bound`] joins them without changing either. bigG
//!   rows get 0 after the first EOS ([`PromptChunk::ids`]).
//!
//! Reference: `shared/reference/sdxl.md` §3.3. Golden tests compare with
//! A1111's own functions (fixtures/golden/text/a1111_prompts.json).

use std::sync::OnceLock;

use regex::Regex;

use super::tokenizer::{ClipTokenizer, Padding, BOS, CHUNK_LEN, CONTEXT_LEN, EOS};
use crate::{Error, Result};

/// Weight A1111 gives the `BREAK` marker fragment.
pub const BREAK_WEIGHT: f64 = -1.0;
/// A1111 `comma_padding_backtrack` default.
pub const COMMA_PADDING_BACKTRACK: usize = 20;

/// A1111 `re_attention` (same leftmost-first alternation) and `re_break`.
fn patterns() -> Result<&'static (Regex, Regex)> {
    static RE: OnceLock<std::result::Result<(Regex, Regex), regex::Error>> = OnceLock::new();
    RE.get_or_init(|| {
        Ok((
            Regex::new(
                r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:",
            )?,
            Regex::new(r"(?s)\s*\bBREAK\b\s*")?,
        ))
    })
    .as_ref()
    .map_err(|e| Error::Other(format!("prompt parser: bad built-in pattern: {e}")))
}

/// Largest emphasis weight accepted: far past any useful one, and small
/// enough that weighted hidden states stay finite (a weight that is
/// infinite in f32 turned the whole conditioning into NaN).
pub const MAX_WEIGHT: f64 = 1e4;

/// An emphasis weight as Python's `float()` reads it (full-width digits
/// too, as typed through an IME; the pattern's `\d` takes any Unicode
/// digit), within ±[`MAX_WEIGHT`].
fn emphasis_weight(w: &str) -> Option<f64> {
    let ascii: String = w
        .chars()
        .map(|c| match c {
            '\u{ff10}'..='\u{ff19}' => char::from(b'0' + (c as u32 - 0xff10) as u8),
            c => c,
        })
        .collect();
    ascii.parse::<f64>().ok().filter(|w| w.abs() <= MAX_WEIGHT)
}

/// Split a prompt into `(text, weight)` fragments, A1111
/// `parse_prompt_attention`. `BREAK` appears as `("BREAK", -1.0)`.
pub fn parse_prompt_attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let round_mult = 1.1f64;
    let square_mult = 1.0 / 1.1f64;
    fn multiply(res: &mut [(String, f64)], start: usize, m: f64) {
        for r in res.iter_mut().skip(start) {
            r.1 *= m;
        }
    }
    let (re_attention, re_break) = patterns()?;
    for cap in re_attention.captures_iter(text) {
        let Some(whole) = cap.get(0) else { continue };
        let t = whole.as_str();
        let weight = cap.get(1).map(|m| m.as_str());
        if let Some(lit) = t.strip_prefix('\\') {
            res.push((lit.to_string(), 1.0));
        } else if t == "(" {
            round.push(res.len());
        } else if t == "[" {
            square.push(res.len());
        } else if let (Some(w), false) = (weight, round.is_empty()) {
            let w = emphasis_weight(w).ok_or_else(|| {
                Error::config(format!(
                    "prompt {text:?}: bad emphasis weight {w:?}; write it as (text:1.2), at most {MAX_WEIGHT} in size"
                ))
            })?;
            if let Some(start) = round.pop() {
                multiply(&mut res, start, w);
            }
        } else if t == ")" && !round.is_empty() {
            if let Some(start) = round.pop() {
                multiply(&mut res, start, round_mult);
            }
        } else if t == "]" && !square.is_empty() {
            if let Some(start) = square.pop() {
                multiply(&mut res, start, square_mult);
            }
        } else {
            for (i, part) in re_break.split(t).enumerate() {
                if i > 0 {
                    res.push(("BREAK".to_string(), BREAK_WEIGHT));
                }
                res.push((part.to_string(), 1.0));
            }
        }
    }
    for &pos in &round {
        multiply(&mut res, pos, round_mult);
    }
    for &pos in &square {
        multiply(&mut res, pos, square_mult);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // merge runs of identical weights
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// A1111 extra-network tags (`<lora:name:0.8>`, `<hypernet:…>`) replaced
/// by `with`.
fn replace_extra_networks(prompt: &str, with: &str) -> String {
    static NETWORKS: OnceLock<Option<Regex>> = OnceLock::new();
    match NETWORKS.get_or_init(|| Regex::new(r"<\w+:[^>]+>").ok()) {
        Some(re) => re.replace_all(prompt, with).into_owned(),
        None => prompt.to_string(),
    }
}

/// A1111 syntax in `prompt` that changes the prompt during sampling and
/// that eps2v encodes as plain text: prompt editing `[from:to:when]`,
/// alternation `[a|b]` (a `[` … `]` holding `:` or `|`, escapes `\[`
/// skipped) and composable `AND`. `None` when there is none.
pub fn unsupported_syntax(prompt: &str) -> Option<&'static str> {
    // Per open bracket: `Some(saw : or |)` for `[`, `None` for `(` (whose
    // `:` is an emphasis weight).
    let mut open: Vec<Option<bool>> = Vec::new();
    let mut chars = prompt.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' => open.push(Some(false)),
            '(' => open.push(None),
            ')' if open.last() == Some(&None) => {
                open.pop();
            }
            ':' | '|' => {
                if let Some(Some(saw)) = open.last_mut() {
                    *saw = true;
                }
            }
            ']' => {
                while open.last() == Some(&None) {
                    open.pop();
                }
                if open.pop() == Some(Some(true)) {
                    return Some("prompt editing [from:to:when] / alternation [a|b]");
                }
            }
            _ => {}
        }
    }
    prompt
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|w| w == "AND")
        .then_some("AND (composable prompts)")
}

/// A prompt as A1111 encodes it: its extra-network tags removed (they
/// load networks there, they are not text), and whether it had any.
pub fn strip_extra_networks(prompt: &str) -> (String, bool) {
    let out = replace_extra_networks(prompt, "");
    let had = out != prompt;
    (out, had)
}

/// A prompt as training text: A1111 extra-network tags (`<lora:name:0.8>`,
/// `<hypernet:…>`) removed, emphasis syntax removed (`(red hair:1.2)`,
/// `((smile))`, `[hat]` → the words; `\(` → `(`), `BREAK` and newlines
/// turned into commas, and the comma-separated tags trimmed and re-joined
/// with `", "` (empty ones dropped). A prompt whose emphasis cannot be
/// parsed loses its bracket characters instead.
pub fn clean_prompt(prompt: &str) -> String {
    let stripped = replace_extra_networks(prompt, ",");
    let text: String = match parse_prompt_attention(&stripped) {
        Ok(frags) => frags
            .into_iter()
            .map(|(t, w)| {
                if w == BREAK_WEIGHT {
                    ",".to_string()
                } else {
                    t
                }
            })
            .collect(),
        Err(_) => stripped.replace(['(', ')', '[', ']'], ""),
    };
    text.split([',', '\n'])
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `text` written so that [`parse_prompt_attention`] reads it back as
/// itself at weight 1: `\`, `(`, `)`, `[`, `]` backslash-escaped (A1111's
/// escapes). A caption used as a prompt so gets the tokens training gave
/// it (`saber (fate)` is not `saber fate` ×1.1). `BREAK` has no escape
/// and still starts a chunk.
pub fn escape_prompt(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '\\' | '(' | ')' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One 77-token encoder input: BOS + 75 + EOS, with a weight per token.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptChunk {
    /// 77 ids, padded with EOS (CLIP-L form).
    pub tokens: Vec<u32>,
    /// 77 emphasis multipliers (1.0 for BOS, EOS and padding).
    pub multipliers: Vec<f64>,
}

impl PromptChunk {
    /// A1111 `empty_chunk`: BOS + 76 × EOS, all weights 1.
    pub fn empty() -> Self {
        let mut tokens = vec![EOS; CONTEXT_LEN];
        tokens[0] = BOS;
        Self {
            tokens,
            multipliers: vec![1.0; CONTEXT_LEN],
        }
    }

    /// The ids for one encoder: as stored for CLIP-L ([`Padding::Eos`]);
    /// for bigG ([`Padding::Zero`]) every id after the first EOS becomes 0
    /// (A1111 `process_tokens` with `id_pad = 0`).
    pub fn ids(&self, padding: Padding) -> Vec<u32> {
        let mut ids = self.tokens.clone();
        if padding == Padding::Zero {
            if let Some(p) = ids.iter().position(|&t| t == EOS) {
                for t in ids.iter_mut().skip(p + 1) {
                    *t = 0;
                }
            }
        }
        ids
    }
}

/// A prompt cut into chunks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenizedPrompt {
    /// The chunks, in order.
    pub chunks: Vec<PromptChunk>,
    /// A1111's token count (75 per full chunk, real tokens in the last).
    pub token_count: usize,
}

/// A1111 `tokenize_line`: parse emphasis, tokenize each fragment, fill
/// 75-token chunks with comma backtracking and `BREAK`.
pub fn tokenize_prompt(tok: &ClipTokenizer, prompt: &str) -> Result<TokenizedPrompt> {
    tokenize_prompt_with(tok, prompt, true)
}

/// [`tokenize_prompt`], or with `parse_emphasis` false the whole prompt as
/// one literal fragment of weight 1 (A1111 emphasis mode "None": brackets
/// and `BREAK` are plain text).
pub fn tokenize_prompt_with(
    tok: &ClipTokenizer,
    prompt: &str,
    parse_emphasis: bool,
) -> Result<TokenizedPrompt> {
    let parsed = if parse_emphasis {
        parse_prompt_attention(prompt)?
    } else {
        vec![(prompt.to_string(), 1.0)]
    };
    let comma = tok.comma_id();
    let mut chunks: Vec<PromptChunk> = Vec::new();
    let mut cur_t: Vec<u32> = Vec::new();
    let mut cur_m: Vec<f64> = Vec::new();
    let mut token_count = 0usize;
    let mut last_comma: Option<usize> = None;

    // closes the current chunk (pads to 75, wraps in BOS/EOS)
    let mut next_chunk = |cur_t: &mut Vec<u32>,
                          cur_m: &mut Vec<f64>,
                          last_comma: &mut Option<usize>,
                          is_last: bool,
                          chunks: &mut Vec<PromptChunk>| {
        token_count += if is_last { cur_t.len() } else { CHUNK_LEN };
        let mut tokens = Vec::with_capacity(CONTEXT_LEN);
        let mut mults = Vec::with_capacity(CONTEXT_LEN);
        tokens.push(BOS);
        mults.push(1.0);
        tokens.append(cur_t);
        mults.append(cur_m);
        while tokens.len() < CHUNK_LEN + 1 {
            tokens.push(EOS);
            mults.push(1.0);
        }
        tokens.push(EOS);
        mults.push(1.0);
        *last_comma = None;
        chunks.push(PromptChunk {
            tokens,
            multipliers: mults,
        });
    };

    for (text, weight) in &parsed {
        if text == "BREAK" && *weight == BREAK_WEIGHT {
            next_chunk(&mut cur_t, &mut cur_m, &mut last_comma, false, &mut chunks);
            continue;
        }
        for token in tok.encode(text)? {
            if token == comma {
                last_comma = Some(cur_t.len());
            } else if let Some(lc) = last_comma {
                if COMMA_PADDING_BACKTRACK != 0
                    && cur_t.len() == CHUNK_LEN
                    && cur_t.len() - lc <= COMMA_PADDING_BACKTRACK
                {
                    let at = lc + 1;
                    let reloc_t = cur_t.split_off(at);
                    let reloc_m = cur_m.split_off(at);
                    next_chunk(&mut cur_t, &mut cur_m, &mut last_comma, false, &mut chunks);
                    cur_t = reloc_t;
                    cur_m = reloc_m;
                }
            }
            if cur_t.len() == CHUNK_LEN {
                next_chunk(&mut cur_t, &mut cur_m, &mut last_comma, false, &mut chunks);
            }
            cur_t.push(token);
            cur_m.push(*weight);
        }
    }
    if !cur_t.is_empty() || chunks.is_empty() {
        next_chunk(&mut cur_t, &mut cur_m, &mut last_comma, true, &mut chunks);
    }
    Ok(TokenizedPrompt {
        chunks,
        token_count,
    })
}

/// Append empty chunks so every prompt has the same number of chunks, at
/// least `min_chunks` (A1111 pads the prompts of a batch this way).
pub fn pad_to_same_chunks(prompts: &mut [TokenizedPrompt], min_chunks: usize) {
    let k = prompts
        .iter()
        .map(|p| p.chunks.len())
        .max()
        .unwrap_or(0)
        .max(min_chunks);
    for p in prompts.iter_mut() {
        while p.chunks.len() < k {
            p.chunks.push(PromptChunk::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sampling_time_syntax_is_found() {
        for p in [
            "[red:blue:0.5] circle",
            "[cat:10] girl",
            "[a|b] girl",
            "girl [hat::0.3]",
            "red AND blue",
            "a, AND, b",
        ] {
            assert!(unsupported_syntax(p).is_some(), "{p}");
        }
        for p in [
            "[red] circle",
            "(red:1.2) [blue]",
            "[(red:1.2)] girl",
            r"\[a:b\] girl",
            "sand and band, ANDROID",
            "",
        ] {
            assert_eq!(unsupported_syntax(p), None, "{p}");
        }
    }

    use super::*;

    /// Regressions: a weight of 1 followed by 400 zeros (infinite) or 1e40
    /// (infinite in f32) turned the conditioning into NaN; full-width
    /// digits, which A1111 reads, were an error.
    #[test]
    fn emphasis_weights_are_bounded_and_read_full_width_digits() {
        let one = |p: &str| parse_prompt_attention(p).map(|v| v[0].1);
        assert_eq!(one("(cat:\u{ff11}.\u{ff12})").unwrap(), 1.2);
        assert_eq!(one("(cat:-2)").unwrap(), -2.0);
        assert_eq!(one("(cat:10000)").unwrap(), 1e4);
        let huge = format!("(cat:1{})", "0".repeat(400));
        for p in [
            "(cat:10001)",
            "(cat:1000000000000000000000000000000000000000)",
            &huge,
        ] {
            let e = parse_prompt_attention(p).unwrap_err().to_string();
            assert!(e.contains("bad emphasis weight"), "{p}: {e}");
        }
    }

    #[test]
    fn extra_network_tags_are_not_text() {
        assert_eq!(
            strip_extra_networks("1girl, <lora:foo_v2:0.8>, smile<hypernet:h:1>"),
            ("1girl, , smile".to_string(), true)
        );
        assert_eq!(
            strip_extra_networks("a <b> c"),
            ("a <b> c".to_string(), false)
        );
    }

    #[test]
    fn an_escaped_text_parses_back_to_itself_at_weight_one() {
        for t in [
            "saber (fate), 1girl, (o)_(o)",
            "[hat], ((smile)), a:1.2)",
            "back\\slash \\( x",
            "(unclosed",
            "",
        ] {
            let parsed = parse_prompt_attention(&escape_prompt(t)).unwrap();
            let text: String = parsed.iter().map(|(s, _)| s.as_str()).collect();
            assert_eq!(text, t);
            assert!(parsed.iter().all(|(_, w)| *w == 1.0), "{t:?}: {parsed:?}");
        }
    }

    #[test]
    fn clean_prompt_removes_a1111_syntax() {
        for (raw, want) in [
            ("(red hair:1.2), 1girl", "red hair, 1girl"),
            ("((smile)), [hat],  solo ", "smile, hat, solo"),
            ("1girl BREAK solo\nlong hair", "1girl, solo, long hair"),
            ("<lora:style_x:0.8>, 1girl, <hypernet:y:1>", "1girl"),
            (
                "ganyu \\(genshin impact\\), (blue:1.1) eyes",
                "ganyu (genshin impact), blue eyes",
            ),
            ("(unclosed, 1girl", "unclosed, 1girl"),
            ("(bad:1.2.3), x", "bad:1.2.3, x"),
            ("", ""),
        ] {
            assert_eq!(clean_prompt(raw), want, "{raw:?}");
        }
    }

    fn p(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text).expect("parse")
    }

    #[test]
    fn a1111_docstring_examples() {
        // The doctest of A1111 parse_prompt_attention.
        assert_eq!(p("normal text"), vec![("normal text".into(), 1.0)]);
        let r = p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let want = [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ];
        assert_eq!(r.len(), want.len());
        for ((t, w), (wt, ww)) in r.iter().zip(want) {
            assert_eq!(t, wt);
            assert!((w - ww).abs() < 1e-12, "{t}: {w} vs {ww}");
        }
        assert_eq!(p(r"\(literal\]"), vec![("(literal]".into(), 1.0)]);
    }

    #[test]
    fn bad_weight_is_a_clear_error() {
        let e = parse_prompt_attention("(a:1.2.3)").expect_err("must fail");
        assert!(e.to_string().contains("1.2.3"), "{e}");
    }

    #[test]
    fn bigg_ids_zero_after_first_eos() {
        let c = PromptChunk::empty();
        let g = c.ids(Padding::Zero);
        assert_eq!(&g[..3], &[BOS, EOS, 0]);
        assert_eq!(c.ids(Padding::Eos)[76], EOS);
    }

    #[test]
    fn cond_and_uncond_padded_alike() -> Result<()> {
        let tok = ClipTokenizer::new()?;
        let long = "word ".repeat(100);
        let mut v = vec![tokenize_prompt(&tok, &long)?, tokenize_prompt(&tok, "")?];
        pad_to_same_chunks(&mut v, 3);
        assert!(v.iter().all(|t| t.chunks.len() == 3));
        assert_eq!(v[1].chunks[2], PromptChunk::empty());
        Ok(())
    }

    #[test]
    fn emphasis_none_keeps_brackets_as_text() -> Result<()> {
        let tok = ClipTokenizer::new()?;
        let t = tokenize_prompt_with(&tok, "(cat:1.5) BREAK dog", false)?;
        assert_eq!(t.chunks.len(), 1);
        assert!(t.chunks[0].multipliers.iter().all(|&m| m == 1.0));
        let n = tok.encode("(cat:1.5) BREAK dog")?.len();
        assert_eq!(
            &t.chunks[0].tokens[1..=n],
            tok.encode("(cat:1.5) BREAK dog")?.as_slice()
        );
        Ok(())
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    fn load() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/golden/text/a1111_prompts.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("json")
    }

    /// Golden: A1111 `prompt_parser.parse_prompt_attention` outputs.
    #[test]
    fn attention_equals_a1111() {
        let v = load();
        let rows = v["attention"].as_array().expect("attention");
        assert!(rows.len() >= 30);
        for row in rows {
            let prompt = row["prompt"].as_str().expect("prompt");
            let want: Vec<(String, f64)> =
                serde_json::from_value(row["parsed"].clone()).expect("parsed");
            let got = p(prompt);
            assert_eq!(got.len(), want.len(), "{prompt:?}: {got:?} vs {want:?}");
            for ((t, w), (wt, ww)) in got.iter().zip(&want) {
                assert_eq!(t, wt, "{prompt:?}");
                assert!((w - ww).abs() < 1e-12, "{prompt:?}: {w} vs {ww}");
            }
        }
    }

    fn p(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text).expect("parse")
    }

    /// Golden: A1111 `sd_hijack_clip.tokenize_line` chunks (open_clip ids).
    #[test]
    fn chunks_equal_a1111() -> Result<()> {
        let v = load();
        let tok = ClipTokenizer::new()?;
        let rows = v["chunks"].as_array().expect("chunks");
        assert!(rows.len() >= 15);
        for row in rows {
            let prompt = row["prompt"].as_str().expect("prompt");
            let got = tokenize_prompt(&tok, prompt)?;
            let want = row["chunks"].as_array().expect("chunks");
            assert_eq!(
                got.token_count as u64,
                row["token_count"].as_u64().expect("count"),
                "{prompt:?}"
            );
            assert_eq!(got.chunks.len(), want.len(), "{prompt:?}");
            for (g, w) in got.chunks.iter().zip(want) {
                let wt: Vec<u32> = serde_json::from_value(w["tokens"].clone())?;
                let wm: Vec<f64> = serde_json::from_value(w["multipliers"].clone())?;
                assert_eq!(g.tokens, wt, "{prompt:?}");
                assert_eq!(g.multipliers.len(), wm.len());
                for (a, b) in g.multipliers.iter().zip(&wm) {
                    assert!((a - b).abs() < 1e-12, "{prompt:?}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }
}
