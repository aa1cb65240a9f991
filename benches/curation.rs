//! Curation throughput benchmark (prints a table; targets in README).
//!
//! `cargo bench --profile dev --bench curation [-- --images N --skip-images --skip-index --skip-manifest --rows N --sequential-sha]`
//!
//! 1. Chain vs floor on N (default 2000) synthetic ~1 MP PNGs: the whole
//!    `import + dedupe + bucket` chain against a decode + resize + encode
//!    loop over the same files with the same threads (the floor). Target:
//!    chain ≥ 0.5× the floor's throughput.
//! 2. Dedupe index: 1,000,000 random 64-bit hashes with planted near
//!    duplicates, radius 8; every planted pair must be found, checked against
//!    brute force for a sample of queries. Target ≤ 10 s on 2 cores.
//! 3. Manifest: 1,000,000 item rows inserted in one transaction (≤ 5 s)
//!    with `manifest::insert_items_bulk` and `inspect` over them (≤ 2 s);
//!    the same rows inserted the way the manifest did before issue 14
//!    (version-1 schema, per-row `insert_item`) are timed in the same run,
//!    for the ratio (both time the making of the rows too, as before). The
//!    sha256s are uniformly random like real ones; `--sequential-sha` gives
//!    the increasing keys the benchmark used before issue 14.

use std::path::Path;
use std::time::Instant;

use eps2v::manifest::{self, ItemStatus, Manifest, NewItem};
use eps2v::stages::{self, Ctx};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

mod common;
use common::{arg, flag};

/// A synthetic "photo" (~1 MP, one of four SDXL-ish aspect ratios):
/// gradient background, a disc and random blocks (distinct perceptual
/// hashes, so every image survives dedupe and reaches bucketing), light noise.
fn synth(k: usize) -> RgbImage {
    let sizes = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768)];
    let (w, h) = sizes[k % sizes.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
    let (a, b, c): (f32, f32, f32) = (rng.random(), rng.random(), rng.random());
    let (cx, cy, r) = (
        rng.random_range(0..w) as f32,
        rng.random_range(0..h) as f32,
        rng.random_range(50..300) as f32,
    );
    let blocks: Vec<(u32, u32, u32, u32, [u8; 3])> = (0..6)
        .map(|_| {
            (
                rng.random_range(0..w),
                rng.random_range(0..h),
                rng.random_range(w / 8..w / 2),
                rng.random_range(h / 8..h / 2),
                [rng.random(), rng.random(), rng.random()],
            )
        })
        .collect();
    RgbImage::from_fn(w, h, |x, y| {
        let n = ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 13) % 6;
        for &(bx, by, bw, bh, col) in &blocks {
            if x >= bx && x < bx + bw && y >= by && y < by + bh {
                return Rgb(col.map(|v| v.saturating_add(n as u8)));
            }
        }
        let (xf, yf) = (x as f32 / w as f32, y as f32 / h as f32);
        let n = n as f32;
        if ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) < r * r {
            Rgb([(255.0 * c) as u8, (200.0 * a) as u8, (90.0 + n) as u8])
        } else {
            Rgb([
                (255.0 * (a * xf + (1.0 - a) * yf) + n) as u8,
                (255.0 * (b * yf) + n) as u8,
                (255.0 * (c * (1.0 - xf)) + n) as u8,
            ])
        }
    })
}

fn make_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    (0..n).into_par_iter().for_each(|k| {
        let p = dir.join(format!("img_{k:05}.png"));
        if !p.exists() {
            let png = stages::bucket::encode_png_fast(&synth(k)).unwrap();
            std::fs::write(&p, png).unwrap();
        }
    });
}

fn floor_loop(dir: &Path) -> usize {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let list = eps2v::imaging::buckets::sdxl_buckets();
    files
        .par_iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let rgb = image::load_from_memory(&bytes).unwrap().to_rgb8();
            let b = list
                [eps2v::imaging::buckets::assign_bucket(rgb.width(), rgb.height(), &list).unwrap()];
            let plan = eps2v::imaging::resize::plan_cover_crop(
                rgb.width(),
                rgb.height(),
                b.width,
                b.height,
                eps2v::imaging::resize::CropMode::Center,
                1.25,
            )
            .unwrap();
            let img = eps2v::imaging::resize::resize_and_crop(&rgb, &plan).unwrap();
            stages::bucket::encode_png_fast(&img).unwrap().len()
        })
        .count()
}

fn bench_images(n: usize) {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let t = Instant::now();
    make_images(&src, n);
    eprintln!("made {n} images in {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let done = floor_loop(&src);
    let floor_s = t.elapsed().as_secs_f64();
    assert_eq!(done, n);

    let ds = work.path().join("ds");
    let mut m = Manifest::init(&ds).unwrap();
    let ctx = Ctx::quiet();
    let t = Instant::now();
    let ri = stages::import::run(
        &stages::import::ImportConfig {
            from: src.clone(),
            ..Default::default()
        },
        &mut m,
        &ctx,
    )
    .unwrap();
    let import_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rd = stages::dedupe::run(&Default::default(), &mut m, &ctx).unwrap();
    let dedupe_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rb = stages::bucket::run(&Default::default(), &mut m, &ctx).unwrap();
    let bucket_s = t.elapsed().as_secs_f64();
    let chain_s = import_s + dedupe_s + bucket_s;
    assert_eq!(ri.imported, n);
    println!(
        "\n## chain vs floor ({n} synthetic ~1 MP PNGs, {} threads)",
        rayon::current_num_threads()
    );
    println!("| step | seconds | images/s |");
    println!("|---|---|---|");
    println!(
        "| floor: decode + resize + encode | {floor_s:.2} | {:.1} |",
        n as f64 / floor_s
    );
    println!(
        "| import (read, sha256, decode, hashes, copy, manifest) | {import_s:.2} | {:.1} |",
        n as f64 / import_s
    );
    println!(
        "| dedupe ({} clusters) | {dedupe_s:.3} | {:.0} |",
        rd.clusters,
        n as f64 / dedupe_s
    );
    println!(
        "| bucket ({} images: decode, resize, crop, encode, manifest) | {bucket_s:.2} | {:.1} |",
        rb.bucketed,
        n as f64 / bucket_s
    );
    println!("| **chain** | {chain_s:.2} | {:.1} |", n as f64 / chain_s);
    println!(
        "\nchain / floor throughput ratio: **{:.2}×** (target ≥ 0.5×)",
        floor_s / chain_s
    );
}

fn bench_index() {
    use eps2v::stages::dedupe::index::{brute_force_pairs, MultiIndex};
    let n = 1_000_000usize;
    let radius = 8;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut hashes: Vec<u64> = (0..n).map(|_| rng.random()).collect();
    // Plant 10,000 near duplicates at distances 0..=8 of random originals.
    let mut planted = Vec::new();
    for k in 0..10_000 {
        let i = rng.random_range(0..n);
        let d = k % (radius as usize + 1);
        let mut h = hashes[i];
        let mut bits: Vec<u32> = (0..64).collect();
        for b in 0..d {
            let j = rng.random_range(b..64);
            bits.swap(b, j);
            h ^= 1 << bits[b];
        }
        let j = rng.random_range(0..n);
        hashes[j] = h;
        if i != j {
            planted.push((i.min(j) as u32, i.max(j) as u32));
        }
    }
    let t = Instant::now();
    let idx = MultiIndex::new(&hashes, radius);
    let pairs = idx.all_pairs();
    let secs = t.elapsed().as_secs_f64();
    let found: std::collections::HashSet<(u32, u32)> = pairs.iter().map(|p| (p.i, p.j)).collect();
    // Planted pairs whose original was later overwritten by another plant
    // are no longer near; count only those still within radius.
    let live: Vec<_> = planted
        .iter()
        .filter(|(i, j)| (hashes[*i as usize] ^ hashes[*j as usize]).count_ones() <= radius)
        .collect();
    let missed = live.iter().filter(|p| !found.contains(p)).count();
    // Brute-force check on a sample of 200 query rows (all partners of each).
    let sample: Vec<usize> = (0..200).map(|_| rng.random_range(0..n)).collect();
    let mut brute_missing = 0;
    for &q in &sample {
        for (j, &h) in hashes.iter().enumerate() {
            if j != q && (h ^ hashes[q]).count_ones() <= radius {
                let key = (q.min(j) as u32, q.max(j) as u32);
                if !found.contains(&key) {
                    brute_missing += 1;
                }
            }
        }
    }
    let small = &hashes[..5000];
    let exact_small =
        MultiIndex::new(small, radius).all_pairs() == brute_force_pairs(small, radius);
    println!(
        "\n## dedupe index (1,000,000 hashes, radius 8, {} chunks)",
        idx.chunk_count()
    );
    println!("| what | value |");
    println!("|---|---|");
    println!("| build + all-pairs search | {secs:.2} s (target ≤ 10 s) |");
    println!("| pairs found | {} |", pairs.len());
    println!(
        "| planted pairs still within radius / missed | {} / {missed} |",
        live.len()
    );
    println!("| brute-force check, 200 sampled rows: missed | {brute_missing} |");
    println!("| first 5,000 hashes: identical to brute force | {exact_small} |");
}

/// SplitMix64 finaliser: a cheap bijective mix, so the digests below are
/// uniformly spread like real sha256s at no measurable cost.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The benchmark's item rows: 64-hex-digit sha256s, 5 % rejected and 5 %
/// duplicates with reasons. The digests are uniformly random like real
/// content hashes, so every index insert lands at a random place; with
/// `--sequential-sha` they increase with `k` (`k · 0x9E3779B97F4A7C15`, the
/// benchmark before issue 14: every index insert appends).
fn bench_item(k: usize) -> NewItem {
    static SEQUENTIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let sha = if *SEQUENTIAL.get_or_init(|| flag("--sequential-sha")) {
        format!("{:064x}", k as u128 * 0x9E37_79B9_7F4A_7C15u128)
    } else {
        let w = |i: u64| mix64((k as u64) << 2 | i);
        format!("{:016x}{:016x}{:016x}{:016x}", w(0), w(1), w(2), w(3))
    };
    let status = match k % 20 {
        0 => ItemStatus::Rejected,
        1 => ItemStatus::Duplicate,
        _ => ItemStatus::Ok,
    };
    NewItem {
        path: Some(format!("images/{}/{sha}.png", &sha[..2])),
        source: format!("/data/src/{k}.png"),
        sha256: sha,
        width: Some(1024),
        height: Some(1024),
        format: Some("png".into()),
        status,
        reason: match status {
            ItemStatus::Rejected => Some(format!("corrupt: bad chunk at {k}")),
            ItemStatus::Duplicate => Some(format!("near_duplicate: of item {k}")),
            ItemStatus::Ok => None,
        },
    }
}

/// CPU seconds used by this thread so far (user + system): on a busy
/// machine wall time mostly measures the other processes.
fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage writes one plain struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// (wall, CPU) seconds to insert `rows` items in one transaction into the version-1
/// schema (CHECK with an IN list) with a statement-cache lookup and a clock
/// read per row: the manifest as it was before issue 14, for the ratio.
fn insert_v1_per_row(rows: &[NewItem]) -> (f64, f64) {
    let work = tempfile::tempdir().unwrap();
    let mut c = rusqlite::Connection::open(work.path().join("manifest.sqlite")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY; PRAGMA cache_size = -262144;",
    )
    .unwrap();
    c.execute_batch(manifest::SCHEMA_V1).unwrap();
    c.execute(
        "INSERT INTO runs (stage, config_json, tool_version, started_at) VALUES ('bench', '{}', '0', 'x')",
        [],
    )
    .unwrap();
    let (t, c0) = (Instant::now(), thread_cpu_s());
    let tx = c.transaction().unwrap();
    for item in rows {
        manifest::insert_item(&tx, 1, item).unwrap();
    }
    tx.commit().unwrap();
    (t.elapsed().as_secs_f64(), thread_cpu_s() - c0)
}

fn bench_manifest(rows: usize) {
    // The rows are made before the clocks start: the benchmark times the
    // manifest, not its synthetic row generator (which took 0.3–0.5 s of
    // the million-row insert when it ran inside the timed loop).
    let items: Vec<NewItem> = (0..rows).map(bench_item).collect();
    let (before_s, before_cpu) = insert_v1_per_row(&items);
    let work = tempfile::tempdir().unwrap();
    let mut m = Manifest::init(work.path()).unwrap();
    let run = m.begin_run("bench", &serde_json::json!({})).unwrap();
    let (t, c0) = (Instant::now(), thread_cpu_s());
    {
        let tx = m.conn_mut().transaction().unwrap();
        manifest::insert_items_bulk(&tx, run, items.iter()).unwrap();
        tx.commit().unwrap();
    }
    let (insert_s, insert_cpu) = (t.elapsed().as_secs_f64(), thread_cpu_s() - c0);
    drop(m);
    let m = Manifest::open_read_only(work.path()).unwrap();
    let t = Instant::now();
    let r = stages::inspect::run(&m, 20).unwrap();
    let inspect_s = t.elapsed().as_secs_f64();
    assert_eq!(r.items as usize, rows);
    let keys = if flag("--sequential-sha") {
        "sequential"
    } else {
        "uniformly random"
    };
    println!("\n## manifest ({rows} item rows, {keys} sha256s)");
    println!("| what | seconds | CPU seconds | target |");
    println!("|---|---|---|---|");
    println!(
        "| insert (one transaction, `insert_items_bulk`) | {insert_s:.2} | {insert_cpu:.2} | ≤ 5 |"
    );
    println!(
        "| same rows, v1 schema + per-row `insert_item` (before) | {before_s:.2} | {before_cpu:.2} | ({:.2}x wall, {:.2}x CPU) |",
        before_s / insert_s,
        before_cpu / insert_cpu
    );
    println!("| inspect | {inspect_s:.2} | | ≤ 2 |");
}

fn main() {
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build_global()
            .ok();
    }
    if !flag("--skip-images") {
        bench_images(arg("--images", 2000));
    }
    if !flag("--skip-index") {
        bench_index();
    }
    if !flag("--skip-manifest") {
        bench_manifest(arg("--rows", 1_000_000));
    }
}
