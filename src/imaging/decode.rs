//! Decode untrusted image bytes into RGB8, safely and predictably.
//!
//! Why: import sees whatever is in a user's folder — empty files, half-copied
//! downloads, decompression bombs, CMYK JPEGs, 16-bit PNGs, phone photos with
//! an EXIF rotation. Each must either become a correct RGB8 image or a typed
//! rejection ([`DecodeReason`], stable snake_case names for the manifest).
//!
//! Rules (documented because hashes and buckets depend on them):
//! - The format is sniffed from the content ([`sniff_format`]), never from the
//!   extension; [`extension_note`] reports a mismatching extension.
//! - Limits ([`DecodeLimits`]) are checked on the header dimensions *before*
//!   any pixel allocation, and handed to the `image` crate as `image::Limits`
//!   (a PNG declaring 100000×100000 costs a few hundred bytes of work).
//! - Truncation is detected structurally (PNG without `IEND`, JPEG without
//!   `EOI`, RIFF shorter than declared) because some decoders (zune-jpeg)
//!   silently fill the missing part with grey.
//! - EXIF orientation is applied (`ImageDecoder::orientation`,
//!   `DynamicImage::apply_orientation`); width/height are the displayed size.
//! - 16-bit samples become 8-bit by rounding (v / 257, the `image` crate's
//!   conversion); grey is replicated to RGB; palettes are expanded; CMYK
//!   JPEGs are converted by the JPEG decoder (zune-jpeg).
//! - Alpha is composited on white: `out = (c·a + 255·(255−a) + 127) / 255`
//!   (integer). imagededup instead drops alpha; see `hash.rs` and the golden
//!   script `fixtures/scripts/gen_phash_goldens.py`.

use std::fmt;
use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

/// Decode limits against decompression bombs and absurd sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeLimits {
    /// Largest accepted width in pixels (default 16384).
    pub max_width: u32,
    /// Largest accepted height in pixels (default 16384).
    pub max_height: u32,
    /// Largest accepted pixel count width·height (default 40 MP).
    pub max_pixels: u64,
    /// Largest allocation the decoder may make, bytes (default 512 MiB).
    pub max_alloc_bytes: u64,
}

impl DecodeLimits {
    /// No gate: for an image of the dataset, which import (or generate)
    /// already accepted under its own run's limits (`--max-pixels` may
    /// have raised the defaults); a later stage must not reject it again
    /// by stricter ones.
    pub fn accepted() -> Self {
        DecodeLimits {
            max_width: u32::MAX,
            max_height: u32::MAX,
            max_pixels: u64::MAX,
            max_alloc_bytes: u64::MAX,
        }
    }
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_width: 16384,
            max_height: 16384,
            max_pixels: 40_000_000,
            max_alloc_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Container formats recognised from the file content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// PNG.
    Png,
    /// JPEG (baseline or progressive).
    Jpeg,
    /// WebP (lossy or lossless).
    Webp,
    /// GIF (first frame).
    Gif,
    /// Windows bitmap.
    Bmp,
    /// TIFF.
    Tiff,
}

impl SourceFormat {
    /// Stable lowercase name for the manifest (`png`, `jpeg`, …).
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Png => "png",
            SourceFormat::Jpeg => "jpeg",
            SourceFormat::Webp => "webp",
            SourceFormat::Gif => "gif",
            SourceFormat::Bmp => "bmp",
            SourceFormat::Tiff => "tiff",
        }
    }

    /// File extensions (lowercase, no dot) that are correct for this format.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            SourceFormat::Png => &["png"],
            SourceFormat::Jpeg => &["jpg", "jpeg", "jpe", "jfif"],
            SourceFormat::Webp => &["webp"],
            SourceFormat::Gif => &["gif"],
            SourceFormat::Bmp => &["bmp", "dib"],
            SourceFormat::Tiff => &["tif", "tiff"],
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            SourceFormat::Png => ImageFormat::Png,
            SourceFormat::Jpeg => ImageFormat::Jpeg,
            SourceFormat::Webp => ImageFormat::WebP,
            SourceFormat::Gif => ImageFormat::Gif,
            SourceFormat::Bmp => ImageFormat::Bmp,
            SourceFormat::Tiff => ImageFormat::Tiff,
        }
    }
}

/// Colour model of the stored image (before conversion to RGB8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorModel {
    /// Single grey channel.
    Grey,
    /// Grey + alpha.
    GreyAlpha,
    /// RGB (or YCbCr in JPEG).
    Rgb,
    /// RGB + alpha.
    Rgba,
    /// Indexed colour (PNG palette, GIF).
    Palette,
    /// CMYK / YCCK JPEG.
    Cmyk,
}

impl ColorModel {
    /// Stable lowercase name for the manifest.
    pub fn name(self) -> &'static str {
        match self {
            ColorModel::Grey => "grey",
            ColorModel::GreyAlpha => "grey_alpha",
            ColorModel::Rgb => "rgb",
            ColorModel::Rgba => "rgba",
            ColorModel::Palette => "palette",
            ColorModel::Cmyk => "cmyk",
        }
    }
}

/// A successfully decoded image.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels, RGB8, orientation applied, alpha composited on white.
    pub rgb: RgbImage,
    /// Format sniffed from the content.
    pub format: SourceFormat,
    /// Displayed width (after EXIF orientation) = `rgb.width()`.
    pub width: u32,
    /// Displayed height (after EXIF orientation) = `rgb.height()`.
    pub height: u32,
    /// Width as stored in the file (before orientation).
    pub stored_width: u32,
    /// Height as stored in the file (before orientation).
    pub stored_height: u32,
    /// EXIF orientation tag value that was applied (1 = none, 1..=8).
    pub orientation: u8,
    /// Colour model as stored.
    pub color_model: ColorModel,
    /// Bits per sample as stored (1, 2, 4, 8 or 16).
    pub bit_depth: u8,
    /// The decoded image carried an alpha channel (incl. PNG `tRNS`, GIF).
    pub had_alpha: bool,
    /// At least one pixel was not fully opaque (so compositing changed it).
    pub alpha_used: bool,
}

/// Why an image was rejected. `name()` is stored in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeReason {
    /// Zero-length file.
    Empty,
    /// The file ends before the image does.
    Truncated,
    /// Recognised format but invalid data.
    Corrupt,
    /// Over the decode limits (dimensions, pixel count, allocation).
    TooLarge,
    /// Not a recognised image format, or a feature the decoder lacks.
    Unsupported,
}

impl DecodeReason {
    /// Stable snake_case name (`empty`, `truncated`, `corrupt`, `too_large`,
    /// `unsupported`).
    pub fn name(self) -> &'static str {
        match self {
            DecodeReason::Empty => "empty",
            DecodeReason::Truncated => "truncated",
            DecodeReason::Corrupt => "corrupt",
            DecodeReason::TooLarge => "too_large",
            DecodeReason::Unsupported => "unsupported",
        }
    }
}

/// A rejected image: a reason for counting and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Machine-readable reason.
    pub reason: DecodeReason,
    /// Human-readable detail (lowercase, says what was wrong).
    pub message: String,
}

impl DecodeError {
    fn new(reason: DecodeReason, message: impl Into<String>) -> Self {
        DecodeError {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.name(), self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Recognise the container format from the first bytes.
pub fn sniff_format(bytes: &[u8]) -> Option<SourceFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(SourceFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(SourceFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(SourceFormat::Webp)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(SourceFormat::Gif)
    } else if bytes.starts_with(b"BM") && bytes.len() >= 26 {
        Some(SourceFormat::Bmp)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Some(SourceFormat::Tiff)
    } else {
        None
    }
}

/// A note when the file extension does not match the sniffed format, e.g.
/// `extension .jpg but content is png`. `ext` may carry a leading dot.
pub fn extension_note(ext: &str, format: SourceFormat) -> Option<String> {
    let e = ext.trim_start_matches('.').to_ascii_lowercase();
    if format.extensions().contains(&e.as_str()) {
        None
    } else {
        Some(format!("extension .{e} but content is {}", format.name()))
    }
}

/// Whether the byte stream is structurally complete for its format.
/// Formats without a cheap structural check return `true`.
pub fn is_structurally_complete(format: SourceFormat, bytes: &[u8]) -> bool {
    match format {
        SourceFormat::Png => png_complete(bytes),
        SourceFormat::Jpeg => jpeg_complete(bytes),
        SourceFormat::Webp => {
            bytes.len() >= 8
                && (u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize)
                    .saturating_add(8)
                    <= bytes.len()
        }
        _ => true,
    }
}

/// PNG: walk chunks from the signature until `IEND`.
fn png_complete(b: &[u8]) -> bool {
    let mut pos = 8usize;
    while pos + 8 <= b.len() {
        let len = u32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
        let kind = &b[pos + 4..pos + 8];
        let end = pos.saturating_add(12).saturating_add(len);
        if end > b.len() {
            return false;
        }
        if kind == b"IEND" {
            return true;
        }
        pos = end;
    }
    false
}

/// JPEG: walk marker segments, skip entropy-coded data after each SOS, and
/// require an `EOI` marker. Zero bytes between a segment and the next
/// marker (padding some encoders and editors leave, which libjpeg reads
/// past with a warning) are skipped, not taken for the end of the stream;
/// any other byte there is.
fn jpeg_complete(b: &[u8]) -> bool {
    let n = b.len();
    let mut i = 2usize;
    while i + 1 < n {
        if b[i] == 0x00 {
            i += 1;
            continue;
        }
        if b[i] != 0xFF {
            return false;
        }
        let m = b[i + 1];
        match m {
            0xFF => i += 1,
            0xD9 => return true,
            0xD0..=0xD7 | 0x01 => i += 2,
            _ => {
                if i + 3 >= n {
                    return false;
                }
                let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
                let next = i + 2 + len;
                if next > n {
                    return false;
                }
                if m == 0xDA {
                    let mut j = next;
                    loop {
                        if j + 1 >= n {
                            return false;
                        }
                        let c = b[j + 1];
                        if b[j] == 0xFF && c != 0x00 && c != 0xFF && !(0xD0..=0xD7).contains(&c) {
                            break;
                        }
                        j += 1;
                    }
                    i = j;
                } else {
                    i = next;
                }
            }
        }
    }
    false
}

/// Colour model and bit depth as stored, from the header where the decoder
/// hides it (PNG IHDR, JPEG SOF), else from the decoder's colour type.
fn stored_color(format: SourceFormat, bytes: &[u8], ct: image::ColorType) -> (ColorModel, u8) {
    if format == SourceFormat::Png && bytes.len() >= 26 {
        let depth = bytes[24];
        let model = match bytes[25] {
            0 => ColorModel::Grey,
            2 => ColorModel::Rgb,
            3 => ColorModel::Palette,
            4 => ColorModel::GreyAlpha,
            _ => ColorModel::Rgba,
        };
        return (model, depth);
    }
    if format == SourceFormat::Jpeg {
        if let Some((precision, comps)) = jpeg_sof(bytes) {
            let model = match comps {
                1 => ColorModel::Grey,
                4 => ColorModel::Cmyk,
                _ => ColorModel::Rgb,
            };
            return (model, precision);
        }
    }
    if format == SourceFormat::Gif {
        return (ColorModel::Palette, 8);
    }
    let depth = (ct.bits_per_pixel() / u16::from(ct.channel_count().max(1))) as u8;
    let model = match (ct.has_color(), ct.has_alpha()) {
        (false, false) => ColorModel::Grey,
        (false, true) => ColorModel::GreyAlpha,
        (true, false) => ColorModel::Rgb,
        (true, true) => ColorModel::Rgba,
    };
    (model, depth)
}

/// (sample precision, component count) from the first JPEG SOFn segment.
fn jpeg_sof(b: &[u8]) -> Option<(u8, u8)> {
    let mut i = 2usize;
    while i + 9 < b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let m = b[i + 1];
        if m == 0xFF {
            i += 1;
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        let is_sof = matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            return Some((b[i + 4], b[i + 9]));
        }
        if m == 0xDA {
            return None;
        }
        i += 2 + len;
    }
    None
}

fn map_image_error(e: ImageError) -> DecodeError {
    match e {
        ImageError::Limits(l) => DecodeError::new(
            DecodeReason::TooLarge,
            format!("over the decode limits ({l}); raise them if the image is genuine"),
        ),
        ImageError::Unsupported(u) => DecodeError::new(DecodeReason::Unsupported, u.to_string()),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::new(DecodeReason::Truncated, format!("file ends early: {io}"))
        }
        other => DecodeError::new(DecodeReason::Corrupt, other.to_string()),
    }
}

/// Decode `bytes` (any supported format, sniffed from content) into RGB8.
///
/// See the module docs for the exact conversion rules. Never panics on bad
/// input; every failure is a [`DecodeError`] with a [`DecodeReason`].
///
/// A panic inside a third-party decoder on hostile input is caught and
/// reported as [`DecodeReason::Corrupt`], so one bad file cannot take down a
/// rayon import.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, DecodeError> {
    catch_unwind_quiet(|| decode_inner(bytes, limits)).unwrap_or_else(|_| {
        Err(DecodeError::new(
            DecodeReason::Corrupt,
            "the decoder panicked on this file (malformed data)",
        ))
    })
}

thread_local! {
    /// Depth of [`catch_unwind_quiet`] calls running on this thread.
    static QUIET: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Should the panic hook report a panic on this thread? Not while a
/// [`catch_unwind_quiet`] call runs: that panic becomes a typed error.
fn panic_reported() -> bool {
    QUIET.with(|q| q.get() == 0)
}

/// `catch_unwind` that keeps the panic message (and the backtrace that
/// `RUST_BACKTRACE` asks for) off stderr: the default hook would print one
/// per hostile file before import records it as `corrupt`, and the summary
/// already has one clean line per rejected file. The process-wide hook is
/// wrapped once; panics on other threads, or outside these calls, are still
/// reported by the previous hook.
fn catch_unwind_quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if panic_reported() {
                previous(info);
            }
        }));
    });
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(q.get().saturating_sub(1)));
        }
    }
    QUIET.with(|q| q.set(q.get() + 1));
    let _guard = Guard;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

fn decode_inner(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::new(
            DecodeReason::Empty,
            "file is empty (0 bytes)",
        ));
    }
    let format = sniff_format(bytes).ok_or_else(|| {
        DecodeError::new(
            DecodeReason::Unsupported,
            "content is not a recognised image format (png, jpeg, webp, gif, bmp, tiff)",
        )
    })?;
    if !is_structurally_complete(format, bytes) {
        return Err(DecodeError::new(
            DecodeReason::Truncated,
            format!("{} stream ends before its end marker", format.name()),
        ));
    }

    // Open with no limits (headers only: no pixel buffer is allocated yet) so
    // that our own check below can report the declared size; the limits are
    // then handed to the decoder before any pixel is decoded.
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format.image_format());
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(map_image_error)?;

    let (sw, sh) = decoder.dimensions();
    if sw == 0 || sh == 0 {
        return Err(DecodeError::new(
            DecodeReason::Corrupt,
            format!("header declares an empty image ({sw}x{sh})"),
        ));
    }
    if sw > limits.max_width
        || sh > limits.max_height
        || u64::from(sw) * u64::from(sh) > limits.max_pixels
    {
        return Err(DecodeError::new(
            DecodeReason::TooLarge,
            format!(
                "header declares {sw}x{sh} ({:.1} MP), over the limit of {}x{} / {:.1} MP",
                (u64::from(sw) * u64::from(sh)) as f64 / 1e6,
                limits.max_width,
                limits.max_height,
                limits.max_pixels as f64 / 1e6
            ),
        ));
    }
    let color_type = decoder.color_type();
    let needed = u64::from(sw) * u64::from(sh) * u64::from(color_type.bytes_per_pixel());
    if needed > limits.max_alloc_bytes {
        return Err(DecodeError::new(
            DecodeReason::TooLarge,
            format!(
                "decoding {sw}x{sh} needs {} MiB, over the limit of {} MiB",
                needed >> 20,
                limits.max_alloc_bytes >> 20
            ),
        ));
    }
    let mut img_limits = image::Limits::default();
    img_limits.max_image_width = Some(limits.max_width);
    img_limits.max_image_height = Some(limits.max_height);
    img_limits.max_alloc = Some(limits.max_alloc_bytes);
    decoder.set_limits(img_limits).map_err(map_image_error)?;
    // A missing or unreadable EXIF block means "no rotation", not an error.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let (color_model, bit_depth) = stored_color(format, bytes, color_type);

    let img = DynamicImage::from_decoder(decoder).map_err(map_image_error)?;
    let had_alpha = img.color().has_alpha();
    // `into_*`: no copy when the decoder already gave that layout (an
    // 8-bit RGB image, the common case), where `to_*` always copies.
    let (rgb, alpha_used) = if had_alpha {
        composite_on_white(&img.into_rgba8())
    } else {
        (img.into_rgb8(), false)
    };
    let mut dynimg = DynamicImage::ImageRgb8(rgb);
    dynimg.apply_orientation(orientation);
    let rgb = dynimg.into_rgb8();
    Ok(Decoded {
        width: rgb.width(),
        height: rgb.height(),
        rgb,
        format,
        stored_width: sw,
        stored_height: sh,
        orientation: orientation.to_exif(),
        color_model,
        bit_depth,
        had_alpha,
        alpha_used,
    })
}

/// Decode and add an extension check: returns the image and, when `ext`
/// disagrees with the content, a note such as
/// `extension .jpg but content is png`.
pub fn decode_with_extension(
    bytes: &[u8],
    ext: Option<&str>,
    limits: &DecodeLimits,
) -> Result<(Decoded, Option<String>), DecodeError> {
    let d = decode(bytes, limits)?;
    let note = ext.and_then(|e| extension_note(e, d.format));
    Ok((d, note))
}

/// Composite RGBA8 on a white background:
/// `out = (c·a + 255·(255−a) + 127) / 255`. Returns the image and whether
/// any pixel was not fully opaque.
pub fn composite_on_white(rgba: &image::RgbaImage) -> (RgbImage, bool) {
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    let mut used = false;
    for px in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(px[3]);
        if a != 255 {
            used = true;
        }
        for &c in &px[..3] {
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    // Length is exactly w*h*3 by construction, so this cannot fail.
    let rgb = RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h));
    (rgb, used)
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
