//! Micro-benchmark of the per-image imaging kernels on a synthetic ~1 MP
//! photo-like image: decode (PNG, JPEG), pHash, dHash, pixel sha256,
//! cover-resize + crop into an SDXL bucket, PNG encode with parameters.
//! Prints a table (ms per image on the calling thread; fast_image_resize is
//! built with its `rayon` feature and may split one resize across the pool).
//!
//! Run: `cargo bench --profile dev --bench imaging`

use std::time::Instant;

use eps2v::imaging::{self, decode::DecodeLimits, resize::CropMode};
use image::{ImageEncoder, RgbImage};

fn photo(w: u32, h: u32) -> RgbImage {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (state % 7) as f32 - 3.0;
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let r = 128.0 + 90.0 * (6.0 * fx + 2.0 * fy).sin() + n;
        let g = 120.0 + 80.0 * (3.0 * fy - 4.0 * fx).cos() + n;
        let b = 100.0 + 70.0 * (9.0 * fx * fy).sin() + n;
        image::Rgb([
            r.clamp(0.0, 255.0) as u8,
            g.clamp(0.0, 255.0) as u8,
            b.clamp(0.0, 255.0) as u8,
        ])
    })
}

fn time<T>(label: &str, iters: u32, mut f: impl FnMut() -> T) {
    let _ = f(); // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(f());
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(iters);
    println!("| {label:<42} | {ms:>8.2} | {:>8.1} |", 1e3 / ms);
}

fn main() {
    let img = photo(1024, 1024);
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(img.as_raw(), 1024, 1024, image::ExtendedColorType::Rgb8)
        .expect("encode png");
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 92)
        .encode_image(&img)
        .expect("encode jpeg");
    let limits = DecodeLimits::default();
    println!(
        "synthetic 1024x1024 RGB: png {} KB, jpeg {} KB",
        png.len() / 1024,
        jpg.len() / 1024
    );
    println!("| kernel (per image)                         | ms/image | images/s |");
    println!("|--------------------------------------------|----------|----------|");
    time("decode png (limits, orientation, rgb8)", 20, || {
        imaging::decode(&png, &limits).expect("png")
    });
    time("decode jpeg", 20, || {
        imaging::decode(&jpg, &limits).expect("jpg")
    });
    time("phash (Pillow Lanczos 32x32 + DCT)", 20, || {
        imaging::phash(&img)
    });
    time("dhash (Pillow Lanczos 9x8)", 20, || imaging::dhash(&img));
    time("pixel sha256", 20, || imaging::pixel_sha256(&img));
    time("image_hashes (all three)", 20, || {
        imaging::image_hashes(&img)
    });
    let plan =
        imaging::plan_cover_crop(1024, 1024, 896, 1152, CropMode::Center, 2.0).expect("plan");
    time("cover resize+crop 1024^2 -> 896x1152 (fir)", 20, || {
        imaging::resize_and_crop(&img, &plan).expect("resize")
    });
    time("png encode + parameters tEXt (Fast)", 10, || {
        imaging::infotext::write_png_with_parameters(&img, "a\nSteps: 1, Seed: 2, Sampler: Euler")
            .expect("png")
    });
    time("png encode (Balanced, png crate default)", 5, || {
        imaging::infotext::encode_png(&img, None, png::Compression::Balanced).expect("png")
    });
}
