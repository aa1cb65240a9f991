//! Text cleaning before BPE (open_clip `_clean_lower`): the subset of
//! ftfy's `fix_text` and Python's `html.unescape` described in the
//! [`super`] module docs, with the HTML entity table.

use tokenizers::NormalizedString;

/// open_clip `_clean_lower` (see the module docs for the ftfy subset):
/// fix_text subset, `html.unescape` twice, strip, collapse whitespace,
/// lowercase.
pub fn clean(text: &str) -> String {
    // ftfy.fix_text: line by line; HTML unescaping is switched off from the
    // first line containing '<' on; each line is fixed until it stops
    // changing.
    let mut fixed = String::with_capacity(text.len());
    let mut unescape = true;
    for seg in text.split_inclusive('\n') {
        if seg.contains('<') {
            unescape = false;
        }
        let mut t = seg.to_string();
        for _ in 0..16 {
            let next = fix_text_pass(&t, unescape);
            if next == t {
                break;
            }
            t = next;
        }
        fixed.push_str(&t);
    }
    let t = html_unescape(&html_unescape(&fixed));
    let words: Vec<&str> = t.split(is_py_space).filter(|w| !w.is_empty()).collect();
    words.join(" ").to_lowercase()
}

/// Python `str.isspace` (Rust's `char::is_whitespace` plus U+001C..U+001F).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// One pass of the ftfy fixers we implement, in ftfy's order.
fn fix_text_pass(text: &str, unescape: bool) -> String {
    let out = if unescape {
        ftfy_unescape(text)
    } else {
        text.to_string()
    };
    let mut t = String::with_capacity(out.len());
    for c in out.chars() {
        match c {
            // fix_latin_ligatures
            'Ĳ' => t.push_str("IJ"),
            'ĳ' => t.push_str("ij"),
            'ŉ' => t.push_str("ʼn"),
            'Ǳ' => t.push_str("DZ"),
            'ǲ' => t.push_str("Dz"),
            'ǳ' => t.push_str("dz"),
            'Ǆ' => t.push_str("DŽ"),
            'ǅ' => t.push_str("Dž"),
            'ǆ' => t.push_str("dž"),
            'Ǉ' => t.push_str("LJ"),
            'ǈ' => t.push_str("Lj"),
            'ǉ' => t.push_str("lj"),
            'Ǌ' => t.push_str("NJ"),
            'ǋ' => t.push_str("Nj"),
            'ǌ' => t.push_str("nj"),
            'ﬀ' => t.push_str("ff"),
            'ﬁ' => t.push_str("fi"),
            'ﬂ' => t.push_str("fl"),
            'ﬃ' => t.push_str("ffi"),
            'ﬄ' => t.push_str("ffl"),
            'ﬅ' => t.push_str("ſt"),
            'ﬆ' => t.push_str("st"),
            // fix_character_width
            '\u{3000}' => t.push(' '),
            '\u{ff01}'..='\u{ffef}' => {
                let mut n = NormalizedString::from(c.to_string());
                n.nfkc();
                t.push_str(n.get());
            }
            // uncurl_quotes
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => t.push('\''),
            '\u{201c}'..='\u{201f}' => t.push('"'),
            // fix_line_breaks
            '\u{2028}' | '\u{2029}' | '\u{85}' => t.push('\n'),
            _ => t.push(c),
        }
    }
    let t = t.replace("\r\n", "\n").replace('\r', "\n");
    let t = remove_terminal_escapes(&t);
    // remove_control_chars
    let t: String = t
        .chars()
        .filter(|&c| {
            !matches!(c,
                '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
                | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
        })
        .collect();
    let mut n = NormalizedString::from(t);
    n.nfc();
    n.get().to_string()
}

/// ftfy `remove_terminal_escapes`: drop `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// ftfy `unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced when it is a known
/// named entity, or a numeric one that Python decodes fully.
fn ftfy_unescape(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'&' {
            let start = i + 1;
            let mut j = start;
            if j < b.len() && b[j] == b'#' {
                j += 1;
            }
            let body_start = j;
            while j < b.len() && b[j].is_ascii_alphanumeric() && j - body_start < 24 {
                j += 1;
            }
            if j > body_start && j < b.len() && b[j] == b';' {
                let whole = &text[i..=j];
                let rep = if b[start] == b'#' {
                    let u = html_unescape(whole);
                    (!u.contains(';')).then_some(u)
                } else {
                    named_entity(&text[body_start..j], true).map(str::to_string)
                };
                if let Some(rep) = rep {
                    out.push_str(&text[last..i]);
                    out.push_str(&rep);
                    i = j + 1;
                    last = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[last..]);
    out
}

/// Named entity lookup: with `semicolon`, any name of the table; without,
/// only the legacy names that HTML allows without `;`.
fn named_entity(name: &str, semicolon: bool) -> Option<&'static str> {
    ENTITIES
        .iter()
        .find(|(n, semi_only, _)| *n == name && (semicolon || !*semi_only))
        .map(|(_, _, v)| *v)
}

/// Python `html.unescape` (numeric references exactly, named ones from
/// [`ENTITIES`]).
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'&' {
            i += 1;
            continue;
        }
        let s = i + 1;
        // numeric: #[0-9]+;? | #[xX][0-9a-fA-F]+;?
        if s < b.len() && b[s] == b'#' {
            let (hex, ds) = if s + 1 < b.len() && (b[s + 1] == b'x' || b[s + 1] == b'X') {
                (true, s + 2)
            } else {
                (false, s + 1)
            };
            let mut j = ds;
            while j < b.len()
                && (if hex {
                    b[j].is_ascii_hexdigit()
                } else {
                    b[j].is_ascii_digit()
                })
            {
                j += 1;
            }
            if j > ds {
                let digits = &text[ds..j];
                let end = if j < b.len() && b[j] == b';' {
                    j + 1
                } else {
                    j
                };
                out.push_str(&text[last..i]);
                out.push_str(&numeric_charref(digits, hex));
                i = end;
                last = i;
                continue;
            }
            i += 1;
            continue;
        }
        // named: [^\t\n\f <&#;]{1,32};?
        let mut j = s;
        let mut n = 0;
        while j < text.len() && n < 32 {
            let Some(c) = text[j..].chars().next() else {
                break;
            };
            if matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
                break;
            }
            j += c.len_utf8();
            n += 1;
        }
        if j == s {
            i += 1;
            continue;
        }
        let semi = j < b.len() && b[j] == b';';
        let name = &text[s..j];
        let end = if semi { j + 1 } else { j };
        let rep = if let Some(v) = named_entity(name, semi) {
            Some(v.to_string())
        } else {
            // longest legacy prefix (names of at least 2 characters)
            // Python tries the prefixes s[:x], x = len(s)-1 down to 2, of s
            // = name + optional ';' (byte offsets of char boundaries here).
            let mut cands: Vec<usize> = name.char_indices().map(|(k, _)| k).skip(2).collect();
            cands.push(name.len());
            let mut found = None;
            let full_len = if semi { name.len() + 1 } else { name.len() };
            for &k in cands.iter().rev() {
                if k >= full_len || k < 2 {
                    continue;
                }
                if let Some(v) = named_entity(&name[..k], false) {
                    found = Some(format!("{v}{}", &text[s + k..end]));
                    break;
                }
            }
            found
        };
        match rep {
            Some(r) => {
                out.push_str(&text[last..i]);
                out.push_str(&r);
                i = end;
                last = i;
            }
            None => i = end,
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Python `html._replace_charref` for a numeric reference.
fn numeric_charref(digits: &str, hex: bool) -> String {
    let num = u32::from_str_radix(digits, if hex { 16 } else { 10 }).unwrap_or(u32::MAX);
    let cp1252 = |n: u32| -> Option<char> {
        Some(match n {
            0x00 => '\u{fffd}',
            0x0d => '\r',
            0x80 => '€',
            0x82 => '‚',
            0x83 => 'ƒ',
            0x84 => '„',
            0x85 => '…',
            0x86 => '†',
            0x87 => '‡',
            0x88 => 'ˆ',
            0x89 => '‰',
            0x8a => 'Š',
            0x8b => '‹',
            0x8c => 'Œ',
            0x8e => 'Ž',
            0x91 => '\u{2018}',
            0x92 => '\u{2019}',
            0x93 => '\u{201c}',
            0x94 => '\u{201d}',
            0x95 => '•',
            0x96 => '–',
            0x97 => '—',
            0x98 => '˜',
            0x99 => '™',
            0x9a => 'š',
            0x9b => '›',
            0x9c => 'œ',
            0x9e => 'ž',
            0x9f => 'Ÿ',
            0x81 | 0x8d | 0x8f | 0x90 | 0x9d => char::from_u32(n)?,
            _ => return None,
        })
    };
    if let Some(c) = cp1252(num) {
        return c.to_string();
    }
    if (0xd800..=0xdfff).contains(&num) || num > 0x10ffff {
        return "\u{fffd}".into();
    }
    let invalid = matches!(num, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (num & 0xfffe) == 0xfffe;
    if invalid {
        return String::new();
    }
    char::from_u32(num)
        .map(|c| c.to_string())
        .unwrap_or_default()
}

/// Named HTML entities: (name, needs `;`, value). The `false` rows are the
/// 106 legacy names Python's `html.entities.html5` also lists without `;`.
static ENTITIES: &[(&str, bool, &str)] = &[
    ("Aacute", false, "\u{c1}"),
    ("aacute", false, "\u{e1}"),
    ("Acirc", false, "\u{c2}"),
    ("acirc", false, "\u{e2}"),
    ("acute", false, "\u{b4}"),
    ("AElig", false, "\u{c6}"),
    ("aelig", false, "\u{e6}"),
    ("Agrave", false, "\u{c0}"),
    ("agrave", false, "\u{e0}"),
    ("AMP", false, "\u{26}"),
    ("amp", false, "\u{26}"),
    ("Aring", false, "\u{c5}"),
    ("aring", false, "\u{e5}"),
    ("Atilde", false, "\u{c3}"),
    ("atilde", false, "\u{e3}"),
    ("Auml", false, "\u{c4}"),
    ("auml", false, "\u{e4}"),
    ("brvbar", false, "\u{a6}"),
    ("Ccedil", false, "\u{c7}"),
    ("ccedil", false, "\u{e7}"),
    ("cedil", false, "\u{b8}"),
    ("cent", false, "\u{a2}"),
    ("COPY", false, "\u{a9}"),
    ("copy", false, "\u{a9}"),
    ("curren", false, "\u{a4}"),
    ("deg", false, "\u{b0}"),
    ("divide", false, "\u{f7}"),
    ("Eacute", false, "\u{c9}"),
    ("eacute", false, "\u{e9}"),
    ("Ecirc", false, "\u{ca}"),
    ("ecirc", false, "\u{ea}"),
    ("Egrave", false, "\u{c8}"),
    ("egrave", false, "\u{e8}"),
    ("ETH", false, "\u{d0}"),
    ("eth", false, "\u{f0}"),
    ("Euml", false, "\u{cb}"),
    ("euml", false, "\u{eb}"),
    ("frac12", false, "\u{bd}"),
    ("frac14", false, "\u{bc}"),
    ("frac34", false, "\u{be}"),
    ("GT", false, "\u{3e}"),
    ("gt", false, "\u{3e}"),
    ("Iacute", false, "\u{cd}"),
    ("iacute", false, "\u{ed}"),
    ("Icirc", false, "\u{ce}"),
    ("icirc", false, "\u{ee}"),
    ("iexcl", false, "\u{a1}"),
    ("Igrave", false, "\u{cc}"),
    ("igrave", false, "\u{ec}"),
    ("iquest", false, "\u{bf}"),
    ("Iuml", false, "\u{cf}"),
    ("iuml", false, "\u{ef}"),
    ("laquo", false, "\u{ab}"),
    ("LT", false, "\u{3c}"),
    ("lt", false, "\u{3c}"),
    ("macr", false, "\u{af}"),
    ("micro", false, "\u{b5}"),
    ("middot", false, "\u{b7}"),
    ("nbsp", false, "\u{a0}"),
    ("not", false, "\u{ac}"),
    ("Ntilde", false, "\u{d1}"),
    ("ntilde", false, "\u{f1}"),
    ("Oacute", false, "\u{d3}"),
    ("oacute", false, "\u{f3}"),
    ("Ocirc", false, "\u{d4}"),
    ("ocirc", false, "\u{f4}"),
    ("Ograve", false, "\u{d2}"),
    ("ograve", false, "\u{f2}"),
    ("ordf", false, "\u{aa}"),
    ("ordm", false, "\u{ba}"),
    ("Oslash", false, "\u{d8}"),
    ("oslash", false, "\u{f8}"),
    ("Otilde", false, "\u{d5}"),
    ("otilde", false, "\u{f5}"),
    ("Ouml", false, "\u{d6}"),
    ("ouml", false, "\u{f6}"),
    ("para", false, "\u{b6}"),
    ("plusmn", false, "\u{b1}"),
    ("pound", false, "\u{a3}"),
    ("QUOT", false, "\u{22}"),
    ("quot", false, "\u{22}"),
    ("raquo", false, "\u{bb}"),
    ("REG", false, "\u{ae}"),
    ("reg", false, "\u{ae}"),
    ("sect", false, "\u{a7}"),
    ("shy", false, "\u{ad}"),
    ("sup1", false, "\u{b9}"),
    ("sup2", false, "\u{b2}"),
    ("sup3", false, "\u{b3}"),
    ("szlig", false, "\u{df}"),
    ("THORN", false, "\u{de}"),
    ("thorn", false, "\u{fe}"),
    ("times", false, "\u{d7}"),
    ("Uacute", false, "\u{da}"),
    ("uacute", false, "\u{fa}"),
    ("Ucirc", false, "\u{db}"),
    ("ucirc", false, "\u{fb}"),
    ("Ugrave", false, "\u{d9}"),
    ("ugrave", false, "\u{f9}"),
    ("uml", false, "\u{a8}"),
    ("Uuml", false, "\u{dc}"),
    ("uuml", false, "\u{fc}"),
    ("Yacute", false, "\u{dd}"),
    ("yacute", false, "\u{fd}"),
    ("yen", false, "\u{a5}"),
    ("yuml", false, "\u{ff}"),
    ("apos", true, "\u{27}"),
    ("hellip", true, "\u{2026}"),
    ("mdash", true, "\u{2014}"),
    ("ndash", true, "\u{2013}"),
    ("lsquo", true, "\u{2018}"),
    ("rsquo", true, "\u{2019}"),
    ("ldquo", true, "\u{201c}"),
    ("rdquo", true, "\u{201d}"),
    ("sbquo", true, "\u{201a}"),
    ("bdquo", true, "\u{201e}"),
    ("hearts", true, "\u{2665}"),
    ("bull", true, "\u{2022}"),
    ("trade", true, "\u{2122}"),
    ("euro", true, "\u{20ac}"),
    ("larr", true, "\u{2190}"),
    ("rarr", true, "\u{2192}"),
    ("uarr", true, "\u{2191}"),
    ("darr", true, "\u{2193}"),
    ("harr", true, "\u{2194}"),
    ("star", true, "\u{2606}"),
    ("starf", true, "\u{2605}"),
    ("spades", true, "\u{2660}"),
    ("clubs", true, "\u{2663}"),
    ("diams", true, "\u{2666}"),
    ("infin", true, "\u{221e}"),
    ("ne", true, "\u{2260}"),
    ("le", true, "\u{2264}"),
    ("ge", true, "\u{2265}"),
    ("minus", true, "\u{2212}"),
    ("prime", true, "\u{2032}"),
    ("Prime", true, "\u{2033}"),
    ("dagger", true, "\u{2020}"),
    ("Dagger", true, "\u{2021}"),
    ("permil", true, "\u{2030}"),
    ("lsaquo", true, "\u{2039}"),
    ("rsaquo", true, "\u{203a}"),
    ("oelig", true, "\u{153}"),
    ("OElig", true, "\u{152}"),
    ("scaron", true, "\u{161}"),
    ("Scaron", true, "\u{160}"),
    ("Yuml", true, "\u{178}"),
    ("fnof", true, "\u{192}"),
    ("circ", true, "\u{2c6}"),
    ("tilde", true, "\u{2dc}"),
    ("ensp", true, "\u{2002}"),
    ("emsp", true, "\u{2003}"),
    ("thinsp", true, "\u{2009}"),
    ("zwnj", true, "\u{200c}"),
    ("zwj", true, "\u{200d}"),
    ("lrm", true, "\u{200e}"),
    ("rlm", true, "\u{200f}"),
    ("alpha", true, "\u{3b1}"),
    ("beta", true, "\u{3b2}"),
    ("gamma", true, "\u{3b3}"),
    ("delta", true, "\u{3b4}"),
    ("pi", true, "\u{3c0}"),
    ("sigma", true, "\u{3c3}"),
    ("omega", true, "\u{3c9}"),
    ("Omega", true, "\u{3a9}"),
    ("mu", true, "\u{3bc}"),
    ("check", true, "\u{2713}"),
    ("checkmark", true, "\u{2713}"),
    ("cross", true, "\u{2717}"),
    ("sharp", true, "\u{266f}"),
    ("flat", true, "\u{266d}"),
    ("natural", true, "\u{266e}"),
    ("phone", true, "\u{260e}"),
    ("female", true, "\u{2640}"),
    ("male", true, "\u{2642}"),
    ("sum", true, "\u{2211}"),
    ("prod", true, "\u{220f}"),
    ("radic", true, "\u{221a}"),
    ("asymp", true, "\u{2248}"),
    ("equiv", true, "\u{2261}"),
    ("hyphen", true, "\u{2010}"),
    ("dash", true, "\u{2010}"),
    ("colon", true, "\u{3a}"),
    ("comma", true, "\u{2c}"),
    ("period", true, "\u{2e}"),
    ("excl", true, "\u{21}"),
    ("quest", true, "\u{3f}"),
    ("num", true, "\u{23}"),
    ("dollar", true, "\u{24}"),
    ("percnt", true, "\u{25}"),
    ("ast", true, "\u{2a}"),
    ("plus", true, "\u{2b}"),
    ("equals", true, "\u{3d}"),
    ("lpar", true, "\u{28}"),
    ("rpar", true, "\u{29}"),
    ("lsqb", true, "\u{5b}"),
    ("rsqb", true, "\u{5d}"),
    ("lcub", true, "\u{7b}"),
    ("rcub", true, "\u{7d}"),
    ("sol", true, "\u{2f}"),
    ("bsol", true, "\u{5c}"),
    ("verbar", true, "\u{7c}"),
    ("vert", true, "\u{7c}"),
    ("lowbar", true, "\u{5f}"),
    ("Hat", true, "\u{5e}"),
    ("grave", true, "\u{60}"),
    ("semi", true, "\u{3b}"),
    ("commat", true, "\u{40}"),
    ("midast", true, "\u{2a}"),
    ("NewLine", true, "\u{a}"),
];
