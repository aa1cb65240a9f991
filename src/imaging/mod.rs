//! Pure image handling for the curation stages: decode with limits, hashes,
//! A1111 infotext, cover-resize + crop, aspect-ratio buckets.
//!
//! Everything here works on plain data (byte slices, RGB8 buffers, numbers)
//! and knows nothing of the manifest, so each piece is unit-tested alone and
//! safe to call from rayon workers (no global state):
//!
//! - [`decode`]: bytes → RGB8 with decode limits (decompression bombs), format
//!   sniffing, EXIF orientation, CMYK / 16-bit / palette / grey / alpha
//!   (composited on white); typed rejection reasons for the manifest.
//! - [`hash`]: imagededup-compatible pHash and dHash (a port of Pillow's
//!   Lanczos resampling so the bits agree), sha256 of decoded pixels,
//!   Hamming distance.
//! - [`infotext`]: A1111 `parameters` parse / format, PNG text chunks and
//!   EXIF UserComment reading, PNG writing with a `parameters` chunk.
//! - [`resize`]: cover-scale + center / seeded-random crop with
//!   fast_image_resize (Lanczos3), crop offsets for SDXL micro-conditioning.
//! - [`buckets`]: the SDXL bucket list, a kohya-style generator, nearest
//!   log-aspect assignment.
//!
//! References: `shared/reference/curation-landscape.md` §2 (imagededup),
//! §5 (A1111 infotext), §6 (buckets), §7 (fast_image_resize).

pub mod buckets;
pub mod decode;
pub mod hash;
pub mod infotext;
pub mod resize;

pub use buckets::{assign_bucket, kohya_buckets, sdxl_buckets, Bucket};
pub use decode::{decode, DecodeError, DecodeLimits, DecodeReason, Decoded, SourceFormat};
pub use hash::{dhash, hamming, image_hashes, phash, pixel_sha256, ImageHashes};
pub use infotext::Infotext;
pub use resize::{plan_cover_crop, resize_and_crop, CropMode, CropPlan, ResizeRefusal};
