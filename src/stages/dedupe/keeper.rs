//! Which member of a duplicate cluster is kept.
//!
//! The keeper rule, in order (the first difference decides):
//! 1. **larger resolution** (pixel count): a downscaled copy never wins;
//! 2. **lossless over lossy**: PNG, GIF, BMP, TIFF and lossless WebP (VP8L)
//!    over JPEG and lossy WebP (VP8), so a JPEG re-encode of a PNG is
//!    dropped in favour of the PNG;
//! 3. **a caption someone wrote**: a sidecar `.txt` / `.caption` over
//!    only prompts and machine captions (the tagger's, the caption
//!    policy's) or none — a kohya user's hand-written caption is kept
//!    even when a pixel-identical copy has the same tagger scores;
//! 4. **better caption/tag score**: the tagger's alignment of the image
//!    with its generation prompt (`tagging.alignment`, the share of the
//!    prompt's checkable tags it shows) when it has one, else the highest
//!    stored tag or caption score; an item with a score beats one
//!    without; then an item with any caption beats one with none;
//! 5. **larger file** (at equal pixels and codec class, more bytes usually
//!    means less compression loss or more metadata);
//! 6. the older item (smaller id), so the choice is deterministic.
//!
//! TIFF counts as lossless (a JPEG-compressed TIFF is rare and not told
//! apart). WebP is told apart by its first image chunk ([`webp_is_lossless`]).

use std::cmp::Ordering;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// One candidate item as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Item id (smaller = older).
    pub id: i64,
    /// Pixel count (width × height).
    pub pixels: u64,
    /// Stored with a lossless codec (see the module docs).
    pub lossless: bool,
    /// Best caption/tag score, when any.
    pub score: Option<f64>,
    /// Has at least one caption (of any source).
    pub captioned: bool,
    /// Has a caption someone wrote ([`WRITTEN_CAPTION_SOURCES`]).
    pub written_caption: bool,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// sha256 of the decoded pixels.
    pub pixel_sha256: String,
    /// The perceptual hash compared.
    pub hash: u64,
}

/// Caption sources someone wrote: the sidecar files imported beside an
/// image (not an A1111 prompt: `generate` writes one for every image it
/// makes, and a prompt says what was asked for, not what is there).
pub const WRITTEN_CAPTION_SOURCES: &[&str] = &["sidecar_txt", "sidecar_caption"];

/// [`WRITTEN_CAPTION_SOURCES`] as an SQL list (`'sidecar_txt', …`).
pub fn written_sql() -> String {
    WRITTEN_CAPTION_SOURCES
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keeper preference: `Less` means `a` is the better keeper (see the module
/// docs for the rule).
pub fn keeper_order(a: &Candidate, b: &Candidate) -> Ordering {
    b.pixels
        .cmp(&a.pixels)
        .then_with(|| b.lossless.cmp(&a.lossless))
        .then_with(|| b.written_caption.cmp(&a.written_caption))
        .then_with(|| match (a.score, b.score) {
            (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| b.captioned.cmp(&a.captioned))
        .then_with(|| b.file_size.cmp(&a.file_size))
        .then_with(|| a.id.cmp(&b.id))
}

/// Whether a format name stored in `items.format` is lossless, when the
/// name alone says (`None` for WebP, which can be either).
pub fn format_is_lossless(format: &str) -> Option<bool> {
    match format {
        "png" | "gif" | "bmp" | "tiff" => Some(true),
        "jpeg" => Some(false),
        _ => None,
    }
}

/// Whether the WebP file at `path` is lossless: the first image chunk of the
/// RIFF container is `VP8L` (lossless) or `VP8 ` (lossy, also with an
/// `ALPH` alpha chunk); chunks before it (`VP8X`, `ICCP`, `ANIM`, …) are
/// skipped by their sizes. An animation's frames (`ANMF`) hold their image
/// chunks after a 16-byte frame header: the first frame's decides. `None`
/// when the file cannot be read or holds neither chunk.
pub fn webp_is_lossless(path: &Path) -> Option<bool> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 12];
    f.read_exact(&mut head).ok()?;
    if &head[0..4] != b"RIFF" || &head[8..12] != b"WEBP" {
        return None;
    }
    for _ in 0..64 {
        let mut chunk = [0u8; 8];
        f.read_exact(&mut chunk).ok()?;
        match &chunk[0..4] {
            b"VP8L" => return Some(true),
            b"VP8 " => return Some(false),
            // Into the frame: its sub-chunks follow the frame header.
            b"ANMF" => {
                f.seek(SeekFrom::Current(16)).ok()?;
            }
            _ => {
                let size = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]) as i64;
                f.seek(SeekFrom::Current(size + (size & 1))).ok()?;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: i64, pixels: u64, lossless: bool, score: Option<f64>) -> Candidate {
        Candidate {
            id,
            pixels,
            lossless,
            score,
            captioned: false,
            written_caption: false,
            file_size: 100,
            pixel_sha256: String::new(),
            hash: 0,
        }
    }

    fn best(mut v: Vec<Candidate>) -> i64 {
        v.sort_by(keeper_order);
        v[0].id
    }

    #[test]
    fn rule_order_resolution_codec_written_caption_score_caption_size_age() {
        // Resolution beats everything.
        assert_eq!(
            best(vec![
                cand(1, 100, true, Some(0.9)),
                cand(2, 400, false, None)
            ]),
            2
        );
        // Lossless beats lossy at equal resolution, whatever the score.
        assert_eq!(
            best(vec![
                cand(1, 400, false, Some(0.9)),
                cand(2, 400, true, None)
            ]),
            2
        );
        // Score, then a score over none.
        assert_eq!(
            best(vec![
                cand(1, 400, true, Some(0.5)),
                cand(2, 400, true, Some(0.8))
            ]),
            2
        );
        assert_eq!(
            best(vec![
                cand(1, 400, true, None),
                cand(2, 400, true, Some(0.1))
            ]),
            2
        );
        // A caption over none.
        let mut c = cand(2, 400, true, None);
        c.captioned = true;
        assert_eq!(best(vec![cand(1, 400, true, None), c]), 2);
        // A caption someone wrote beats the score (pixel-identical copies
        // have the same tagger scores) and a larger file; not the codec.
        let mut w = cand(6, 400, true, None);
        (w.captioned, w.written_caption) = (true, true);
        let mut scored = cand(1, 400, true, Some(0.9));
        (scored.captioned, scored.file_size) = (true, 500);
        assert_eq!(best(vec![scored, w.clone()]), 6);
        assert_eq!(
            best(vec![cand(1, 400, true, None), {
                let mut l = w.clone();
                l.lossless = false;
                l
            }]),
            1
        );
        // Larger file, then the older item.
        let mut big = cand(3, 400, true, None);
        big.file_size = 101;
        assert_eq!(best(vec![cand(1, 400, true, None), big]), 3);
        assert_eq!(
            best(vec![cand(5, 400, true, None), cand(4, 400, true, None)]),
            4
        );
    }

    /// An animated WebP of one frame holding `image` (a whole `VP8 `/`VP8L`
    /// chunk), laid out as libwebp's muxer writes it.
    fn animated_webp(image: &[u8]) -> Vec<u8> {
        let chunk = |tag: &[u8], payload: &[u8]| {
            let mut c = tag.to_vec();
            c.extend((payload.len() as u32).to_le_bytes());
            c.extend(payload);
            if payload.len() % 2 == 1 {
                c.push(0);
            }
            c
        };
        let mut body = b"WEBP".to_vec();
        body.extend(chunk(b"VP8X", &[0x02, 0, 0, 0, 7, 0, 0, 7, 0, 0]));
        body.extend(chunk(b"ANIM", &[0; 6]));
        let mut frame = vec![0u8; 16]; // offsets, size, duration, flags
        frame.extend(image);
        body.extend(chunk(b"ANMF", &frame));
        let mut file = b"RIFF".to_vec();
        file.extend((body.len() as u32).to_le_bytes());
        file.extend(body);
        file
    }

    #[test]
    fn webp_codec_is_read_from_the_fixture_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images");
        assert_eq!(webp_is_lossless(&dir.join("lossless.webp")), Some(true));
        assert_eq!(webp_is_lossless(&dir.join("lossy.webp")), Some(false));
        // VP8X header first, then the lossy VP8 chunk.
        assert_eq!(webp_is_lossless(&dir.join("a1111_exif.webp")), Some(false));
        assert_eq!(webp_is_lossless(&dir.join("scene_rgb.png")), None);
        // Animated: VP8X, ANIM, then each frame's image chunk inside ANMF.
        let d = tempfile::tempdir().unwrap();
        for (name, lossless) in [("lossless.webp", true), ("lossy.webp", false)] {
            let still = std::fs::read(dir.join(name)).unwrap();
            let image = &still[12..]; // the one image chunk of a simple file
            let path = d.path().join(name);
            std::fs::write(&path, animated_webp(image)).unwrap();
            assert_eq!(webp_is_lossless(&path), Some(lossless), "animated {name}");
        }
        assert_eq!(format_is_lossless("png"), Some(true));
        assert_eq!(format_is_lossless("jpeg"), Some(false));
        assert_eq!(format_is_lossless("webp"), None);
    }
}
