//! A1111 "infotext" (the `parameters` text of generated images): parse,
//! format, read from PNG text chunks / EXIF UserComment, write into a PNG.
//!
//! Why: imported A1111/Forge images carry their prompt, negative prompt, seed,
//! sampler… and our own `generate` stage writes the same layout so other
//! tools read our images. Rules follow stable-diffusion-webui
//! (`modules/processing.py` `create_infotext`, `modules/infotext_utils.py`
//! `parse_generation_parameters`, `quote`, `unquote`), as summarised in
//! `shared/reference/curation-landscape.md` §5:
//!
//! - layout: `{prompt}` + (`\nNegative prompt: {neg}` if non-empty) +
//!   `\n{k: v, k: v, …}`, the whole `.strip()`ped;
//! - a value is written raw unless it contains `,`, `\n` or `:`, in which case
//!   it is `json.dumps(v, ensure_ascii=False)` (A1111 `quote`; a `"` alone
//!   does not trigger quoting — we follow A1111, not intuition);
//! - parsing: the last line is the parameter line only if the regex
//!   `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` matches it at
//!   least 3 times; other lines are stripped, and lines from the first one
//!   starting `Negative prompt:` on are the negative prompt; quoted values are
//!   `json.loads`-ed (kept raw if that fails); an empty value drops the key
//!   (A1111's `v[0]` raises and the key is skipped).
//!
//! Unlike A1111 we keep `Size` as one key (`"832x1216"`, see
//! [`Infotext::size`]) so formatting round-trips; all keys stay in order.
//!
//! Storage: PNG `parameters` tEXt (Latin-1), zTXt or iTXt (UTF-8; Pillow
//! switches to iTXt when the text is not Latin-1, so do we), read with the
//! `png` crate; JPEG/WebP EXIF `UserComment` (kamadak-exif) with the
//! 8-byte character-code prefix `UNICODE\0` (UTF-16, piexif writes big
//! endian; byte order detected), `ASCII\0\0\0` or undefined (zeros).

use std::io::Cursor;
use std::sync::OnceLock;

use image::RgbImage;
use regex::Regex;

use crate::imaging::decode::{sniff_format, SourceFormat};
use crate::{Error, Result};

/// A1111's `re_param_code`.
const RE_PARAM: &str = r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#;

/// The compiled [`RE_PARAM`]; `None` only if the constant failed to compile,
/// which the `regex_compiles` test rules out.
fn re_param() -> Option<&'static Regex> {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    RE.get_or_init(|| Regex::new(RE_PARAM).ok()).as_ref()
}

fn param_matches(line: &str) -> Vec<(String, String)> {
    let Some(re) = re_param() else {
        return Vec::new();
    };
    re.captures_iter(line)
        .map(|c| {
            let k = c.get(1).map_or("", |m| m.as_str()).to_string();
            let v = c.get(2).map_or("", |m| m.as_str()).to_string();
            (k, v)
        })
        .collect()
}

/// Parsed A1111 generation parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Infotext {
    /// Positive prompt (may span lines).
    pub prompt: String,
    /// Negative prompt (empty when absent).
    pub negative_prompt: String,
    /// All `Key: value` pairs of the last line, in order, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Infotext {
    /// Parse an A1111 `parameters` string (A1111 `parse_generation_parameters`
    /// semantics, see module docs).
    pub fn parse(text: &str) -> Infotext {
        let trimmed = text.trim();
        let mut lines: Vec<&str> = trimmed.split('\n').collect();
        let mut last = lines.pop().unwrap_or("");
        if param_matches(last).len() < 3 {
            lines.push(last);
            last = "";
        }
        let (mut prompt, mut neg) = (String::new(), String::new());
        let mut done_with_prompt = false;
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                done_with_prompt = true;
                line = rest.trim();
            }
            let target = if done_with_prompt {
                &mut neg
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        let mut params = Vec::new();
        for (k, v) in param_matches(last) {
            if v.is_empty() {
                continue;
            }
            let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                unquote(&v)
            } else {
                v
            };
            params.push((k, v));
        }
        Infotext {
            prompt,
            negative_prompt: neg,
            params,
        }
    }

    /// Format in A1111's exact layout (`create_infotext`); keys whose value
    /// equals the key are written alone, as A1111 does.
    pub fn format(&self) -> String {
        let neg = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        let params = self
            .params
            .iter()
            .map(|(k, v)| {
                if k == v {
                    k.clone()
                } else {
                    format!("{k}: {}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("{}{}\n{}", self.prompt, neg, params)
            .trim()
            .to_string()
    }

    /// Value of a key (first occurrence).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Set a key, replacing its value in place or appending it.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
    }

    /// `Steps`.
    pub fn steps(&self) -> Option<u32> {
        self.get("Steps")?.trim().parse().ok()
    }
    /// `Sampler`.
    pub fn sampler(&self) -> Option<&str> {
        self.get("Sampler")
    }
    /// `Schedule type`.
    pub fn schedule_type(&self) -> Option<&str> {
        self.get("Schedule type")
    }
    /// `CFG scale`.
    pub fn cfg_scale(&self) -> Option<f64> {
        self.get("CFG scale")?.trim().parse().ok()
    }
    /// `Seed` (A1111 seeds are up to 2^32−1; i64 keeps −1 representable).
    pub fn seed(&self) -> Option<i64> {
        self.get("Seed")?.trim().parse().ok()
    }
    /// `Size` as (width, height), from `^(\d+)x(\d+)$`.
    pub fn size(&self) -> Option<(u32, u32)> {
        let (w, h) = self.get("Size")?.split_once('x')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(w) || !digits(h) {
            return None;
        }
        Some((w.parse().ok()?, h.parse().ok()?))
    }
    /// `Model hash` (A1111 short hash: sha256 of the file, first 10 hex).
    pub fn model_hash(&self) -> Option<&str> {
        self.get("Model hash")
    }
    /// `Model` (checkpoint file stem).
    pub fn model(&self) -> Option<&str> {
        self.get("Model")
    }
}

/// A1111 `quote`: raw unless the value contains `,`, `\n` or `:`, else
/// `json.dumps(v, ensure_ascii=False)`.
pub fn quote(v: &str) -> String {
    if !v.contains([',', '\n', ':']) {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A1111 `unquote`: `json.loads` of a `"…"` string; the input unchanged when
/// it is not a valid JSON string.
pub fn unquote(v: &str) -> String {
    match serde_json::from_str::<String>(v) {
        Ok(s) if v.starts_with('"') => s,
        _ => v.to_string(),
    }
}

/// Text chunks of a PNG as (keyword, text), in file order by kind (tEXt,
/// zTXt, iTXt), as far as the `png` crate reads them before the image data
/// (where A1111/Pillow put them). A compressed chunk that does not inflate
/// (corrupt, over 16 MiB, bad UTF-8) is left out, not the others with it.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let bad = |e: png::DecodingError| Error::Other(format!("png text chunks: {e}"));
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let reader = decoder.read_info().map_err(bad)?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push((c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        let mut c = c.clone();
        if let Ok(t) = c
            .decompress_text_with_limit(16 << 20)
            .and_then(|_| c.get_text())
        {
            out.push((c.keyword.clone(), t));
        }
    }
    for c in &info.utf8_text {
        let mut c = c.clone();
        if let Ok(t) = c
            .decompress_text_with_limit(16 << 20)
            .and_then(|_| c.get_text())
        {
            out.push((c.keyword.clone(), t));
        }
    }
    Ok(out)
}

/// The EXIF `UserComment` of a JPEG / WebP / PNG / TIFF, decoded to text.
///
/// Read leniently (`continue_on_error`): piexif — which A1111 uses — writes
/// the Exif sub-IFD without a next-IFD pointer, which kamadak-exif's strict
/// mode rejects ("Unexpected next IFD"); the fields themselves are intact.
pub fn exif_user_comment(bytes: &[u8]) -> Option<String> {
    let exif = exif::Reader::new()
        .continue_on_error(true)
        .read_from_container(&mut Cursor::new(bytes))
        .or_else(|e| e.distill_partial_result(|_errors| {}))
        .ok()?;
    let field = exif.get_field(exif::Tag::UserComment, exif::In::PRIMARY)?;
    match &field.value {
        // UNDEFINED is the standard's type (and A1111's, through piexif);
        // some writers (Pillow given bytes) store BYTE.
        exif::Value::Undefined(raw, _) | exif::Value::Byte(raw) => decode_user_comment(raw),
        exif::Value::Ascii(parts) => parts
            .first()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        _ => None,
    }
}

/// Decode an EXIF UserComment value: 8-byte character code then the text.
/// `UNICODE\0` → UTF-16 (BOM honoured; otherwise the byte order with more
/// zero high bytes wins, BE on a tie, as piexif writes); `ASCII\0\0\0` and
/// undefined (8 zero bytes) → UTF-8 (lossy); `JIS` is not supported. A
/// value with no known character code (shorter than 8 bytes, or another
/// prefix: a writer that stored bare UTF-8) is read whole as lossy UTF-8, as
/// A1111 falls back to. Trailing NULs are removed; nothing left is `None`.
pub fn decode_user_comment(raw: &[u8]) -> Option<String> {
    let whole = || {
        let t = String::from_utf8_lossy(raw);
        let t = t.trim_end_matches('\0');
        (!t.trim().is_empty()).then(|| t.to_string())
    };
    if raw.len() < 8 {
        return whole();
    }
    let (prefix, body) = raw.split_at(8);
    let text = match prefix {
        b"UNICODE\0" => {
            let mut body = body;
            let mut big_endian = None;
            if body.starts_with(&[0xFE, 0xFF]) {
                big_endian = Some(true);
                body = &body[2..];
            } else if body.starts_with(&[0xFF, 0xFE]) {
                big_endian = Some(false);
                body = &body[2..];
            }
            let be = big_endian.unwrap_or_else(|| {
                let even = body.iter().step_by(2).filter(|&&b| b == 0).count();
                let odd = body.iter().skip(1).step_by(2).filter(|&&b| b == 0).count();
                even >= odd
            });
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| {
                    if be {
                        u16::from_be_bytes([c[0], c[1]])
                    } else {
                        u16::from_le_bytes([c[0], c[1]])
                    }
                })
                .collect();
            String::from_utf16_lossy(&units)
        }
        b"ASCII\0\0\0" | [0, 0, 0, 0, 0, 0, 0, 0] => String::from_utf8_lossy(body).into_owned(),
        b"JIS\0\0\0\0\0" => return None,
        _ => return whole(),
    };
    Some(text.trim_end_matches('\0').to_string())
}

/// The raw A1111 `parameters` string of an image file, if any: PNG text
/// chunk `parameters` (tEXt/zTXt/iTXt) or, for any format, EXIF UserComment
/// ([`find_parameters`]).
pub fn read_parameters(bytes: &[u8]) -> Option<String> {
    find_parameters(bytes, sniff_format(bytes) == Some(SourceFormat::Png)).map(|(t, _)| t)
}

/// The raw A1111 `parameters` text of a file (`png`: a PNG, whose text
/// chunks are looked at first) and where it was found: a PNG text chunk
/// (`png_text`) or the EXIF UserComment (`exif_user_comment`, JPEG / WebP,
/// as A1111 writes them). A UserComment counts only with A1111's
/// parameter line (`Steps: …, Sampler: …`): a camera's or phone's comment
/// ("Screenshot") is no prompt.
pub fn find_parameters(bytes: &[u8], png: bool) -> Option<(String, &'static str)> {
    if png {
        if let Ok(chunks) = png_text_chunks(bytes) {
            if let Some((_, t)) = chunks.into_iter().find(|(k, _)| k == "parameters") {
                return Some((t, "png_text"));
            }
        }
    }
    exif_user_comment(bytes)
        .filter(|s| !Infotext::parse(s).params.is_empty())
        .map(|s| (s, "exif_user_comment"))
}

/// Encode an RGB8 image as PNG with a `parameters` text chunk: tEXt when the
/// text is Latin-1, iTXt (UTF-8) otherwise — like Pillow's `PngInfo.add_text`.
/// Uses [`png::Compression::Fast`] (fdeflate; ~5× faster than the default
/// for a modest size increase), see [`encode_png`].
pub fn write_png_with_parameters(rgb: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    encode_png(rgb, Some(parameters), png::Compression::Fast)
}

/// Encode an RGB8 image as PNG, optionally with a `parameters` text chunk
/// (tEXt if Latin-1, else iTXt), at the given compression level.
pub fn encode_png(
    rgb: &RgbImage,
    parameters: Option<&str>,
    compression: png::Compression,
) -> Result<Vec<u8>> {
    let bad = |e: png::EncodingError| Error::Other(format!("png encode: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, rgb.width(), rgb.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(compression);
        if let Some(text) = parameters {
            if text.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk("parameters".into(), text.into())
                    .map_err(bad)?;
            } else {
                enc.add_itxt_chunk("parameters".into(), text.into())
                    .map_err(bad)?;
            }
        }
        let mut w = enc.write_header().map_err(bad)?;
        w.write_image_data(rgb.as_raw()).map_err(bad)?;
        w.finish().map_err(bad)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/images")
                .join(name),
        )
        .unwrap()
    }

    const FULL: &str = "masterpiece, best quality, 1girl, solo, (red hair:1.2), looking at viewer, outdoors, cherry blossoms\nNegative prompt: lowres, bad anatomy, (worst quality:1.4), text\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, Lora hashes: \"detail: 7c1e2b7a3f4d, style: 0a1b2c3d4e5f\", Version: v1.10.1";

    #[test]
    fn regex_compiles() {
        assert!(Regex::new(RE_PARAM).is_ok());
    }

    #[test]
    fn parse_full_example() {
        let t = Infotext::parse(FULL);
        assert!(t.prompt.starts_with("masterpiece") && t.prompt.ends_with("cherry blossoms"));
        assert_eq!(
            t.negative_prompt,
            "lowres, bad anatomy, (worst quality:1.4), text"
        );
        assert_eq!(t.steps(), Some(28));
        assert_eq!(t.sampler(), Some("DPM++ 2M"));
        assert_eq!(t.schedule_type(), Some("Karras"));
        assert_eq!(t.cfg_scale(), Some(6.5));
        assert_eq!(t.seed(), Some(1234567890));
        assert_eq!(t.size(), Some((832, 1216)));
        assert_eq!(t.model_hash(), Some("31e35c80fc"));
        assert_eq!(t.model(), Some("sd_xl_base_1.0"));
        assert_eq!(
            t.get("Lora hashes"),
            Some("detail: 7c1e2b7a3f4d, style: 0a1b2c3d4e5f")
        );
        let keys: Vec<&str> = t.params.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "Steps",
                "Sampler",
                "Schedule type",
                "CFG scale",
                "Seed",
                "Size",
                "Model hash",
                "Model",
                "Clip skip",
                "Lora hashes",
                "Version"
            ]
        );
        assert_eq!(t.format(), FULL);
    }

    #[test]
    fn round_trip_with_quoting_and_multiline() {
        let mut t = Infotext {
            prompt: "line one,\nline two: \"quoted\"".into(),
            negative_prompt: "bad\nworse".into(),
            params: vec![],
        };
        t.set("Steps", "20");
        t.set("Sampler", "Euler a");
        t.set("CFG scale", "7");
        t.set("Hires upscaler", "4x-UltraSharp");
        t.set("Note", "a, b: \"c\" \\ d\ne");
        t.set("Plain quote", "say \"hi\"");
        t.set("Unicode", "桜, 着物");
        let s = t.format();
        assert!(s.contains("Note: \"a, b: \\\"c\\\" \\\\ d\\ne\""), "{s}");
        // A1111 quote() does not quote on '"' alone.
        assert!(s.contains("Plain quote: say \"hi\""), "{s}");
        assert!(s.contains("Unicode: \"桜, 着物\""), "{s}");
        let back = Infotext::parse(&s);
        assert_eq!(back.prompt, "line one,\nline two: \"quoted\"");
        assert_eq!(back.negative_prompt, "bad\nworse");
        assert_eq!(back.get("Note"), Some("a, b: \"c\" \\ d\ne"));
        assert_eq!(back.get("Unicode"), Some("桜, 着物"));
        assert_eq!(back.get("Hires upscaler"), Some("4x-UltraSharp"));
        assert_eq!(back.format(), s);
    }

    #[test]
    fn a1111_edge_cases() {
        // Fewer than 3 matches: the last line belongs to the prompt.
        let t = Infotext::parse("a cat\nSteps: 20, Seed: 1");
        assert_eq!(t.prompt, "a cat\nSteps: 20, Seed: 1");
        assert!(t.params.is_empty());
        // No negative prompt; prompt-only text.
        let t = Infotext::parse("  just a prompt  ");
        assert_eq!(
            (t.prompt.as_str(), t.negative_prompt.as_str()),
            ("just a prompt", "")
        );
        assert_eq!(t.format(), "just a prompt");
        // Empty value dropped; key equal to value written alone.
        let t = Infotext::parse("p\nSteps: 5, Empty: , Sampler: Euler, Seed: 3");
        assert_eq!(t.get("Empty"), None);
        assert_eq!(t.seed(), Some(3));
        let t = Infotext {
            prompt: "p".into(),
            negative_prompt: String::new(),
            params: vec![
                ("Tiling".into(), "Tiling".into()),
                ("Steps".into(), "1".into()),
            ],
        };
        assert_eq!(t.format(), "p\nTiling, Steps: 1");
        // Invalid JSON in quotes stays raw.
        assert_eq!(unquote("\"bad \\x\""), "\"bad \\x\"");
        assert_eq!(
            Infotext::parse("p\nSize: 12x, Steps: 1, Seed: 2").size(),
            None
        );
    }

    #[test]
    fn png_text_chunks_text_ztxt_itxt() {
        let t = read_parameters(&fixture("a1111_text.png")).unwrap();
        assert_eq!(t, FULL);
        let z = Infotext::parse(&read_parameters(&fixture("a1111_ztxt.png")).unwrap());
        assert_eq!(z.seed(), Some(7));
        assert_eq!(z.model_hash(), Some("45dee52b"));
        let i = Infotext::parse(&read_parameters(&fixture("a1111_itxt.png")).unwrap());
        assert_eq!(i.prompt, "1girl, 桜, 着物, smile");
        assert_eq!(i.negative_prompt, "低品質, blurry");
        assert_eq!(i.size(), Some((1024, 1024)));
        assert_eq!(read_parameters(&fixture("scene_rgb.png")), None);
    }

    #[test]
    fn exif_user_comment_of_type_byte_is_read() {
        // A JPEG of SOI, an Exif APP1 (little-endian TIFF: IFD0 pointing
        // at an Exif IFD whose UserComment has type BYTE) and EOI.
        let mut text = b"UNICODE\0".to_vec();
        for u in "1girl, smile\nSteps: 20".encode_utf16() {
            text.extend(u.to_be_bytes());
        }
        let mut tiff = b"II\x2a\x00\x08\x00\x00\x00".to_vec();
        let entry = |tag: u16, ty: u16, count: u32, value: u32| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend(ty.to_le_bytes());
            e.extend(count.to_le_bytes());
            e.extend(value.to_le_bytes());
            e
        };
        tiff.extend(1u16.to_le_bytes());
        tiff.extend(entry(0x8769, 4, 1, 26));
        tiff.extend(0u32.to_le_bytes());
        tiff.extend(1u16.to_le_bytes());
        tiff.extend(entry(0x9286, 1, text.len() as u32, 44));
        tiff.extend(0u32.to_le_bytes());
        tiff.extend(&text);
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1];
        jpeg.extend(((2 + 6 + tiff.len()) as u16).to_be_bytes());
        jpeg.extend(b"Exif\0\0");
        jpeg.extend(&tiff);
        jpeg.extend([0xFF, 0xD9]);
        assert_eq!(
            exif_user_comment(&jpeg).as_deref(),
            Some("1girl, smile\nSteps: 20")
        );
    }

    #[test]
    fn exif_user_comment_unicode_and_ascii() {
        let j = Infotext::parse(&read_parameters(&fixture("a1111_exif.jpg")).unwrap());
        assert_eq!(j.prompt, "1girl, 桜, 着物, smile");
        assert_eq!(j.steps(), Some(20));
        let a = Infotext::parse(&read_parameters(&fixture("a1111_ascii_exif.jpg")).unwrap());
        assert_eq!(a.prompt, "a photo of a cat sitting on a windowsill");
        assert_eq!(a.cfg_scale(), Some(5.0));
        let w = read_parameters(&fixture("a1111_exif.webp")).unwrap();
        assert_eq!(w, FULL);
        assert_eq!(read_parameters(&fixture("photo.jpg")), None);
        // No known character code: read whole, as A1111 falls back to.
        let bare = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7";
        assert_eq!(decode_user_comment(bare.as_bytes()).as_deref(), Some(bare));
        assert_eq!(decode_user_comment(b"a cat\0").as_deref(), Some("a cat"));
        assert_eq!(decode_user_comment(b"\0\0"), None);
        assert_eq!(decode_user_comment(b"JIS\0\0\0\0\0\x82\xa0"), None);
    }

    #[test]
    fn broken_files_have_no_parameters() {
        for name in [
            "empty.png",
            "truncated.png",
            "truncated.jpg",
            "garbage.png",
            "bomb.png",
        ] {
            assert_eq!(read_parameters(&fixture(name)), None, "{name}");
        }
    }

    /// Regressions: any EXIF UserComment ("Holiday 2019", a phone's
    /// "Screenshot") was read as an A1111 prompt; a zTXt chunk that does
    /// not inflate hid the file's good `parameters` chunk.
    #[test]
    fn only_a1111_comments_count_and_a_bad_chunk_hides_no_other() {
        let mut jpg = fixture("a1111_ascii_exif.jpg");
        assert!(find_parameters(&jpg, false).is_some());
        let start = jpg.windows(6).position(|w| w == b"ASCII\0").unwrap();
        let end = start
            + jpg[start..]
                .windows(2)
                .position(|w| w == b"\xff\xdb")
                .unwrap();
        for b in &mut jpg[start + 8..end] {
            if *b == b':' {
                *b = b';';
            }
        }
        assert_eq!(
            exif_user_comment(&jpg).map(|c| c.contains("Steps; 30")),
            Some(true)
        );
        assert_eq!(find_parameters(&jpg, false), None);

        let img = RgbImage::new(2, 2);
        let mut png = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png, 2, 2);
            enc.set_color(png::ColorType::Rgb);
            enc.add_text_chunk("parameters".into(), FULL.into())
                .unwrap();
            // Inflates past the 16 MiB limit.
            enc.add_ztxt_chunk("comment".into(), "0".repeat(17 << 20))
                .unwrap();
            let mut w = enc.write_header().unwrap();
            w.write_image_data(img.as_raw()).unwrap();
        }
        assert_eq!(
            find_parameters(&png, true),
            Some((FULL.to_string(), "png_text"))
        );
    }

    #[test]
    fn user_comment_byte_orders() {
        let text = "Steps: 1, a";
        let mut be = b"UNICODE\0".to_vec();
        let mut le = b"UNICODE\0".to_vec();
        for u in text.encode_utf16() {
            be.extend(u.to_be_bytes());
            le.extend(u.to_le_bytes());
        }
        assert_eq!(decode_user_comment(&be).as_deref(), Some(text));
        assert_eq!(decode_user_comment(&le).as_deref(), Some(text));
        assert_eq!(
            decode_user_comment(b"ASCII\0\0\0hi\0").as_deref(),
            Some("hi")
        );
        assert_eq!(decode_user_comment(b"JIS\0\0\0\0\0xx"), None);
        // Too short for a character code: read whole (A1111's fallback).
        assert_eq!(decode_user_comment(b"short").as_deref(), Some("short"));
    }

    #[test]
    fn write_png_parameters_latin1_and_utf8() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 99]));
        for text in [FULL, "1girl, 桜\nSteps: 1, Sampler: Euler, Seed: 2"] {
            let png = write_png_with_parameters(&img, text).unwrap();
            assert_eq!(read_parameters(&png).as_deref(), Some(text));
            let back = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(back, img);
        }
        let plain = encode_png(&img, None, png::Compression::Balanced).unwrap();
        assert_eq!(read_parameters(&plain), None);
        assert_eq!(image::load_from_memory(&plain).unwrap().to_rgb8(), img);
    }
}
