//! CLIP byte-level BPE tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer`),
//! built on the `tokenizers` crate, with the merges file embedded.
//!
//! Both SDXL text encoders (CLIP-L and OpenCLIP bigG) use the same
//! vocabulary; they differ only in padding (CLIP-L pads with EOS 49407, bigG
//! with 0). Facts followed: `shared/reference/sdxl.md` §3.2 and open_clip
//! 3.3.0 `open_clip/tokenizer.py`:
//! - vocabulary = the 256 byte symbols of `bytes_to_unicode` (printable
//!   ranges first), the same 256 with `</w>`, then one entry per merge line
//!   (lines 2..=48895 of `bpe_simple_vocab_16e6.txt.gz`), then
//!   `<start_of_text>` 49406 and `<end_of_text>` 49407;
//! - pre-tokenisation by the regex
//!   `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!   (case-insensitive); each piece becomes UTF-8 byte symbols, the last one
//!   with the `</w>` suffix, then lowest-rank merges apply.
//!
//! Text cleaning (open_clip `_clean_lower`: `ftfy.fix_text`, `html.unescape`
//! twice, whitespace collapse, lowercase). `ftfy` is Python-only; [`clean`]
//! implements this subset of its default `fix_text`, repeated to a fixed
//! point as ftfy does: HTML entities (only in lines without `<`), Latin
//! ligatures (`ﬁ` → `fi`), full/half-width forms (`ＡＢＣ` → `ABC`,
//! U+3000 → space), curly quotes → straight, ANSI terminal escapes and the
//! ftfy control characters removed, NFC normalisation. Not done: ftfy's
//! mojibake repair (`fix_encoding`), C1-control → cp1252 repair and its
//! all-caps entity variants (`&EACUTE;`). HTML entities: numeric ones
//! follow Python's `html.unescape` exactly; named ones cover the 106 legacy
//! HTML4/Latin-1 names (decoded also without `;`, as Python does) plus
//! about a hundred common HTML5 names (`&hellip;`, `&hearts;`, …); other
//! names stay as written. Prompts that need the missing parts are
//! mis-encoded by one or two tokens, never rejected.
//!
//! As in open_clip, the literal texts `<start_of_text>` / `<end_of_text>`
//! inside a prompt become the special ids (they are registered as special
//! tokens and split out before pre-tokenisation).
//!
//! Checked against open_clip's own `tokenize` on 208 prompts (Danbooru tag
//! lists, unicode scripts, emoji with ZWJ sequences, HTML entities,
//! ligatures, full-width text, control characters, emphasis syntax, long
//! prompts): golden test below, fixtures/scripts/gen_text_goldens.py.
//!
//! The merges file and its MIT licence are committed in
//! `fixtures/tokenizer/`; the file is embedded with `include_bytes!` so that
//! every command works without data files.

use std::io::Read;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// `bpe_simple_vocab_16e6.txt.gz` from the open-clip-torch 3.3.0 wheel.
pub static BPE_MERGES_GZ: &[u8] =
    include_bytes!("../../../fixtures/tokenizer/bpe_simple_vocab_16e6.txt.gz");

/// Vocabulary size (both encoders).
pub const VOCAB_SIZE: usize = 49408;
/// `<start_of_text>` (BOS).
pub const BOS: u32 = 49406;
/// `<end_of_text>` (EOS); also CLIP-L's padding id.
pub const EOS: u32 = 49407;
/// Tokens per encoder call: BOS + 75 + EOS.
pub const CONTEXT_LEN: usize = 77;
/// Prompt tokens per chunk (A1111 `chunk_length`).
pub const CHUNK_LEN: usize = 75;
/// Number of merges used (49152 − 256 − 2).
const N_MERGES: usize = 48894;
/// The pre-tokeniser regex (open_clip `SimpleTokenizer.pat`).
const SPLIT_PATTERN: &str =
    r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// How a 77-token row is filled after the EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Pad with EOS 49407 (CLIP-L: HF tokenizer `padding="max_length"`).
    Eos,
    /// Pad with 0 (OpenCLIP bigG: open_clip `tokenize` zero-fills).
    Zero,
}

impl Padding {
    /// The id written after the EOS.
    pub fn id(self) -> u32 {
        match self {
            Padding::Eos => EOS,
            Padding::Zero => 0,
        }
    }
}

/// The CLIP BPE tokenizer.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    comma: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &VOCAB_SIZE)
            .finish()
    }
}

/// open_clip `bytes_to_unicode`: byte → symbol, listed in vocabulary order
/// (printable ranges first, then the 68 remapped bytes from U+0100 on).
fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out: Vec<char> = (0u32..256)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable(b) {
            if let Some(c) = char::from_u32(256 + n) {
                out.push(c);
            }
            n += 1;
        }
    }
    out
}

impl ClipTokenizer {
    /// The tokenizer over the embedded open_clip merges file.
    pub fn new() -> Result<Self> {
        Self::from_merges_gz(BPE_MERGES_GZ)
    }

    /// Build from a gzip'd `bpe_simple_vocab_16e6.txt` (open_clip format).
    pub fn from_merges_gz(gz: &[u8]) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| Error::model(format!("clip merges file: cannot decompress ({e}); expected bpe_simple_vocab_16e6.txt.gz")))?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < N_MERGES + 1 {
            return Err(Error::model(format!(
                "clip merges file: {} lines, need at least {}; expected bpe_simple_vocab_16e6.txt.gz",
                lines.len(),
                N_MERGES + 1
            )));
        }
        let symbols = byte_symbols();
        let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
        let mut merges = Vec::with_capacity(N_MERGES);
        for (i, line) in lines[1..=N_MERGES].iter().enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => {
                    vocab.push(format!("{a}{b}"));
                    merges.push((a.to_string(), b.to_string()));
                }
                _ => {
                    return Err(Error::model(format!(
                        "clip merges file: line {} is not a merge pair: {line:?}",
                        i + 2
                    )))
                }
            }
        }
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let map: tokenizers::models::bpe::Vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        if map.len() != VOCAB_SIZE {
            return Err(Error::model(format!(
                "clip merges file: vocabulary has {} distinct entries, expected {VOCAB_SIZE}",
                map.len()
            )));
        }
        let tok_err = |e: Box<dyn std::error::Error + Send + Sync>| {
            Error::model(format!("clip tokenizer: {e}"))
        };
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(tok_err)?;
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ]);
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner
            .add_special_tokens([
                AddedToken::from("<start_of_text>", true),
                AddedToken::from("<end_of_text>", true),
            ])
            .map_err(tok_err)?;
        let comma = inner
            .token_to_id(",</w>")
            .ok_or_else(|| Error::model("clip tokenizer: no ',</w>' token in the vocabulary"))?;
        Ok(Self { inner, comma })
    }

    /// Token ids of `text` after [`clean`], without BOS/EOS and without
    /// truncation (open_clip `SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let cleaned = clean(text);
        if cleaned.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode_fast(cleaned.as_str(), false)
            .map_err(|e| Error::model(format!("clip tokenizer: cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One 77-token row as open_clip `tokenize` makes it: BOS + ids + EOS,
    /// truncated to 77 with the last position forced to EOS, then padded.
    pub fn tokenize(&self, text: &str, padding: Padding) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(CONTEXT_LEN);
        ids.push(BOS);
        ids.extend(self.encode(text)?);
        ids.push(EOS);
        if ids.len() > CONTEXT_LEN {
            ids.truncate(CONTEXT_LEN);
            ids[CONTEXT_LEN - 1] = EOS;
        }
        ids.resize(CONTEXT_LEN, padding.id());
        Ok(ids)
    }

    /// Id of `,</w>` (A1111 comma backtracking).
    pub fn comma_id(&self) -> u32 {
        self.comma
    }

    /// Vocabulary string of `id` (byte symbols, `</w>` suffix), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Id of a vocabulary string such as `"a</w>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[path = "tokenizer_clean.rs"]
mod clean_text;
pub use clean_text::{clean, html_unescape};

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "tokenizer_golden.rs"]
mod golden;
