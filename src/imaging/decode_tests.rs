use super::*;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/images")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn dec(name: &str) -> Result<Decoded, DecodeError> {
    decode(&fixture(name), &DecodeLimits::default())
}

#[test]
fn broken_files_get_typed_reasons() {
    let cases = [
        ("empty.png", DecodeReason::Empty),
        ("truncated.png", DecodeReason::Truncated),
        ("truncated.jpg", DecodeReason::Truncated),
        ("garbage.png", DecodeReason::Unsupported),
        ("bomb.png", DecodeReason::TooLarge),
    ];
    for (name, want) in cases {
        let err = dec(name).expect_err(name);
        assert_eq!(err.reason, want, "{name}: {err}");
    }
    assert_eq!(DecodeReason::TooLarge.name(), "too_large");
}

#[test]
fn bomb_is_refused_from_the_header() {
    // 100000x100000 RGB would be 30 GB; refusal must not depend on the
    // allocation limit, only on the declared size.
    let limits = DecodeLimits {
        max_alloc_bytes: u64::MAX,
        ..DecodeLimits::default()
    };
    let err = decode(&fixture("bomb.png"), &limits).unwrap_err();
    assert_eq!(err.reason, DecodeReason::TooLarge);
    assert!(err.message.contains("100000x100000"), "{}", err.message);
}

#[test]
fn alloc_limit_applies() {
    let limits = DecodeLimits {
        max_alloc_bytes: 100_000,
        ..DecodeLimits::default()
    };
    let err = decode(&fixture("scene_rgb.png"), &limits).unwrap_err();
    assert_eq!(err.reason, DecodeReason::TooLarge);
    assert!(err.message.contains("MiB"), "{}", err.message);
}

#[test]
fn pixel_count_limit_applies() {
    let limits = DecodeLimits {
        max_pixels: 1000,
        ..DecodeLimits::default()
    };
    let err = decode(&fixture("scene_rgb.png"), &limits).unwrap_err();
    assert_eq!(err.reason, DecodeReason::TooLarge);
}

#[test]
fn wrong_extension_is_a_note_not_an_error() {
    let (d, note) = decode_with_extension(
        &fixture("png_named.jpg"),
        Some("jpg"),
        &DecodeLimits::default(),
    )
    .unwrap();
    assert_eq!(d.format, SourceFormat::Png);
    assert_eq!(note.as_deref(), Some("extension .jpg but content is png"));
    assert_eq!(extension_note(".JPEG", SourceFormat::Jpeg), None);
}

#[test]
fn colour_models_and_depths_are_reported() {
    let cases = [
        ("scene_rgb.png", ColorModel::Rgb, 8, false),
        ("sticker_rgba.png", ColorModel::Rgba, 8, true),
        ("grey.png", ColorModel::Grey, 8, false),
        ("grey_alpha.png", ColorModel::GreyAlpha, 8, true),
        ("palette.png", ColorModel::Palette, 8, false),
        ("palette_trns.png", ColorModel::Palette, 8, true),
        ("rgb16.png", ColorModel::Rgb, 16, false),
        ("grey16.png", ColorModel::Grey, 16, false),
        ("photo.jpg", ColorModel::Rgb, 8, false),
        ("grey.jpg", ColorModel::Grey, 8, false),
        ("cmyk.jpg", ColorModel::Cmyk, 8, false),
        ("lossless.webp", ColorModel::Rgb, 8, false),
        ("palette.gif", ColorModel::Palette, 8, false),
    ];
    for (name, model, depth, alpha_used) in cases {
        let d = dec(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.color_model, model, "{name}");
        assert_eq!(d.bit_depth, depth, "{name}");
        assert_eq!(d.alpha_used, alpha_used, "{name}");
        assert_eq!((d.width, d.height), d.rgb.dimensions(), "{name}");
    }
}

#[test]
fn exif_orientation_is_applied() {
    // Both files store the same upright 120x180 portrait, rotated.
    let a = dec("orient6.jpg").unwrap();
    let b = dec("orient8.jpg").unwrap();
    assert_eq!((a.stored_width, a.stored_height), (180, 120));
    assert_eq!((a.width, a.height), (120, 180));
    assert_eq!((a.orientation, b.orientation), (6, 8));
    // Same picture after rotation: mean absolute difference is JPEG noise.
    let diff: u64 = a
        .rgb
        .as_raw()
        .iter()
        .zip(b.rgb.as_raw())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    assert!(diff as f64 / (a.rgb.as_raw().len() as f64) < 3.0);
}

#[test]
fn composite_on_white_formula() {
    let rgba =
        image::RgbaImage::from_raw(3, 1, vec![0, 0, 0, 0, 10, 20, 30, 255, 100, 0, 200, 128])
            .unwrap();
    let (rgb, used) = composite_on_white(&rgba);
    assert!(used);
    // a=128: (100*128 + 255*127 + 127)/255 = 177, (0 + 32385 + 127)/255 = 127, (25600+32512)/255=227
    assert_eq!(rgb.as_raw(), &[255, 255, 255, 10, 20, 30, 177, 127, 227]);
}

/// A panic inside a quiet call is caught and not reported by the hook;
/// outside (and after it, even when it panicked) panics are reported.
#[test]
fn quiet_catch_hides_the_panic_and_restores_reporting() {
    assert!(panic_reported());
    let r = catch_unwind_quiet(|| {
        assert!(!panic_reported());
        let nested = catch_unwind_quiet(|| 7);
        assert_eq!(nested.ok(), Some(7));
        assert!(!panic_reported(), "nested call ended the outer quiet scope");
        panic!("hostile input");
    });
    assert!(r.is_err());
    assert!(panic_reported());
    assert_eq!(catch_unwind_quiet(|| 3).ok(), Some(3));
    assert!(panic_reported());
}

/// End to end: a child test process with `RUST_BACKTRACE=1` panics
/// inside a quiet call; neither the message nor a backtrace reaches its
/// stderr.
#[test]
fn quiet_catch_keeps_stderr_clean() {
    const NAME: &str = "imaging::decode::tests::quiet_catch_keeps_stderr_clean";
    if std::env::var_os("EPS2V_QUIET_PANIC_CHILD").is_some() {
        assert!(catch_unwind_quiet(|| panic!("hostile input 8d1f")).is_err());
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env("EPS2V_QUIET_PANIC_CHILD", "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    assert!(
        !text.contains("hostile input") && !text.contains("stack backtrace"),
        "{text}"
    );
}

/// Every prefix length and a sweep of byte flips of real fixtures either
/// decode or give a typed error — never a panic, never an empty image.
#[test]
fn damaged_files_never_panic() {
    let limits = DecodeLimits::default();
    for name in [
        "scene_rgb.png",
        "photo.jpg",
        "progressive.jpg",
        "lossy.webp",
        "palette.gif",
        "cmyk.jpg",
    ] {
        let good = fixture(name);
        for cut in (0..good.len()).step_by((good.len() / 37).max(1)) {
            if let Ok(d) = decode(&good[..cut], &limits) {
                assert!(d.width > 0 && d.height > 0, "{name} cut {cut}");
            }
        }
        for i in (20..good.len()).step_by((good.len() / 29).max(1)) {
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            if let Ok(d) = decode(&bad, &limits) {
                assert_eq!((d.width, d.height), d.rgb.dimensions(), "{name} flip {i}");
            }
        }
    }
}

#[test]
fn truncation_scanners() {
    let png = fixture("scene_rgb.png");
    assert!(png_complete(&png));
    assert!(!png_complete(&png[..png.len() - 1]));
    for name in ["photo.jpg", "progressive.jpg", "cmyk.jpg", "orient6.jpg"] {
        let j = fixture(name);
        assert!(jpeg_complete(&j), "{name}");
        assert!(!jpeg_complete(&j[..j.len() - 2]), "{name}");
    }
    // Zero padding after the first segment (APP0/APP1) is not an end.
    let j = fixture("photo.jpg");
    let first = 4 + u16::from_be_bytes([j[4], j[5]]) as usize;
    let mut padded = j[..first].to_vec();
    padded.extend([0u8; 7]);
    padded.extend(&j[first..]);
    assert!(jpeg_complete(&padded));
    assert!(!jpeg_complete(&padded[..padded.len() - 2]));
    let (a, b) = (
        decode(&j, &DecodeLimits::default()).unwrap(),
        decode(&padded, &DecodeLimits::default()).unwrap(),
    );
    assert_eq!(a.rgb, b.rgb);
    let w = fixture("lossy.webp");
    assert!(is_structurally_complete(SourceFormat::Webp, &w));
    assert!(!is_structurally_complete(
        SourceFormat::Webp,
        &w[..w.len() - 1]
    ));
}
