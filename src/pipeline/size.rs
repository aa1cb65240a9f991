//! The image size a model draws at when the user names none (`sample`,
//! `diagnose uncond`, `merge --sweep`), and the `WIDTHxHEIGHT` parser
//! behind every `--size` flag.

use std::collections::BTreeMap;
use std::path::Path;

use crate::models::sdxl::checkpoint::{self, Checkpoint};
use crate::Result;

/// [`native_size`] of a checkpoint file, from its header alone.
pub fn native_size_of(path: &Path) -> Result<(u32, u32)> {
    let ckpt = Checkpoint::open(path)?;
    let unet = ckpt.infer_unet_config()?;
    Ok(native_size(
        ckpt.metadata(),
        unet.name.unwrap_or("custom"),
        &mut Vec::new(),
    ))
}

/// Parse `WIDTHxHEIGHT` (`832x1216`, `64X64`; both sides > 0).
pub fn parse_wxh(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.trim().split_once(['x', 'X'])?;
    let (w, h) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// The image size a model draws best at, used when the user names none:
/// the ModelSpec `modelspec.resolution` metadata that sd-scripts writes
/// (`1024x1024`), else by the UNet's named config: 64×64 for the toy world
/// (the first toy bucket; it was trained at 64–96 pixels, where 1024² gives
/// a tiled mess after a minute of sampling) and for the `tiny` test config,
/// 1024×1024 for the SDXL family and anything unnamed. An unreadable
/// resolution is a warning, not an error.
pub fn native_size(
    meta: &BTreeMap<String, String>,
    unet_config: &str,
    warnings: &mut Vec<String>,
) -> (u32, u32) {
    native_size_from(meta, unet_config, warnings).0
}

/// [`native_size`], and whether it came from the file's
/// `modelspec.resolution` (else from the UNet config).
pub fn native_size_from(
    meta: &BTreeMap<String, String>,
    unet_config: &str,
    warnings: &mut Vec<String>,
) -> ((u32, u32), bool) {
    if let Some(r) = meta.get(checkpoint::META_RESOLUTION) {
        // A size no SDXL-family model samples at (not a multiple of 32, or
        // past the largest side) is not taken as the default either.
        let usable = |(w, h): (u32, u32)| {
            w % 32 == 0 && h % 32 == 0 && w.max(h) <= crate::pipeline::model::MAX_SIDE
        };
        match parse_wxh(r) {
            Some(s) if usable(s) => return (s, true),
            Some(_) => warnings.push(format!(
                "metadata {} = {r:?} is not a size this model samples at (multiples of 32, at most {} a side); the default size falls back to the UNet config's",
                checkpoint::META_RESOLUTION,
                crate::pipeline::model::MAX_SIDE
            )),
            None => warnings.push(format!(
                "metadata {} = {r:?} is not WIDTHxHEIGHT; the default size falls back to the UNet config's",
                checkpoint::META_RESOLUTION
            )),
        }
    }
    let size = match unet_config {
        "toy" | "tiny" => (64, 64),
        _ => (1024, 1024),
    };
    (size, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_size_comes_from_modelspec_then_the_unet_config() {
        let mut meta = BTreeMap::new();
        let mut w = Vec::new();
        assert_eq!(native_size(&meta, "toy", &mut w), (64, 64));
        assert_eq!(native_size(&meta, "tiny", &mut w), (64, 64));
        for name in ["sdxl_base", "ssd_1b", "segmind_vega", "custom"] {
            assert_eq!(native_size(&meta, name, &mut w), (1024, 1024), "{name}");
        }
        assert!(w.is_empty(), "{w:?}");
        meta.insert(checkpoint::META_RESOLUTION.into(), "832x1216".into());
        assert_eq!(native_size(&meta, "toy", &mut w), (832, 1216));
        assert!(w.is_empty(), "{w:?}");
        meta.insert(checkpoint::META_RESOLUTION.into(), "1024".into());
        assert_eq!(native_size(&meta, "sdxl_base", &mut w), (1024, 1024));
        assert!(
            w.len() == 1 && w[0].contains("modelspec.resolution") && w[0].contains("\"1024\""),
            "{w:?}"
        );
        for bad in ["100x100", "1024x20000"] {
            let mut w = Vec::new();
            meta.insert(checkpoint::META_RESOLUTION.into(), bad.into());
            assert_eq!(
                native_size(&meta, "sdxl_base", &mut w),
                (1024, 1024),
                "{bad}"
            );
            assert!(w.len() == 1 && w[0].contains("not a size"), "{w:?}");
        }
        assert_eq!(parse_wxh(" 64X96 "), Some((64, 96)));
        for bad in ["", "64", "64x", "x64", "0x64", "-8x64", "axb", "64x64x64"] {
            assert_eq!(parse_wxh(bad), None, "{bad}");
        }
    }
}
