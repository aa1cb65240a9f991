//! The training set: which manifest items train, the held-out validation
//! split, and the order of batches.
//!
//! - Items: status `ok` (not rejected, not a duplicate), with a bucket (the
//!   resized training image and the crop actually taken) and a caption (the
//!   export's caption priority, [`crate::stages::export::load_rows`]).
//! - Split: every item gets a seeded rank `sha256(seed ‖ item sha256)`; the
//!   lowest `min(val_max, round(val_fraction · n))` are validation. It depends
//!   on the seed and the items only (not on their order or on other items'
//!   arrival), and is recorded in the manifest (`train_split`).
//! - Order: items are listed by content (sha256), not by manifest id, so the
//!   same images and captions train the same way whichever way the dataset
//!   was put together (one `generate`, shards merged in any order, a count
//!   extended later: ids differ, content does not).
//! - Batches: per epoch, each bucket's items are shuffled and cut into batches
//!   (the last one of a bucket may be smaller), then the batches are shuffled;
//!   both from `(seed, epoch)`, so a batch never mixes buckets and any
//!   position `(epoch, index)` can be recomputed on resume.
//! - Size conditioning: the item's real original size, the crop offset in
//!   resized pixels (kohya / OneTrainer / sgm convention) and the bucket size.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;
use crate::models::sdxl::SizeCond;
use crate::stages::export::{load_rows, ExportRow};
use crate::{Error, Result};

/// One trainable item.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainItem {
    /// Manifest item id.
    pub item_id: i64,
    /// sha256 of the original file.
    pub sha256: String,
    /// Training text.
    pub caption: String,
    /// Bucket `(width, height)` in pixels.
    pub bucket: (u32, u32),
    /// The resized, cropped training image (relative to the dataset).
    pub image_path: String,
    /// SDXL micro-conditioning.
    pub size: SizeCond,
    /// Cover-scaled size before the crop `(width, height)` (part of the cache key).
    pub resized: (u32, u32),
}

/// The digest format [`digest`] writes after the item count; runs saved
/// with another (the id-keyed one before it) cannot be resumed, as their
/// batches were drawn in id order.
pub const DIGEST_FORMAT: &str = "content";

/// What a run trains on, in one line: `"<items>:content:<sha-256 hex>"`
/// over each trainable item (by content hash, ids left out) with its image,
/// caption, bucket and micro-conditioning. A resume on a dataset that
/// changed since (items added or set aside, recaptioned, rebucketed) would
/// split it and walk its batches otherwise, leaking validation items into
/// training.
pub fn digest(items: &[TrainItem]) -> String {
    let mut sorted: Vec<&TrainItem> = items.iter().collect();
    sorted.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    let mut h = Sha256::new();
    for it in &sorted {
        let s = &it.size;
        for text in [&it.sha256, &it.caption, &it.image_path] {
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        for v in [it.bucket.0, it.bucket.1, it.resized.0, it.resized.1] {
            h.update(v.to_le_bytes());
        }
        for v in [
            s.original.0,
            s.original.1,
            s.crop_top_left.0,
            s.crop_top_left.1,
            s.target.0,
            s.target.1,
        ] {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    format!("{}:{DIGEST_FORMAT}:{:x}", sorted.len(), h.finalize())
}

/// Why items of an ok dataset cannot train.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Eligibility {
    /// Items with status ok.
    pub ok: usize,
    /// Ok items without a bucket.
    pub unbucketed: usize,
    /// Ok, bucketed items without a caption.
    pub uncaptioned: usize,
    /// Items that train.
    pub eligible: usize,
}

/// Load every trainable item (ordered by content hash, see the module
/// docs) and the counts behind it.
pub fn load_items(m: &Manifest) -> Result<(Vec<TrainItem>, Eligibility)> {
    let rows = load_rows(m, true)?;
    let mut e = Eligibility {
        ok: rows.len(),
        ..Default::default()
    };
    let mut items = Vec::new();
    for r in rows {
        if r.bucket_w.is_none() || r.bucket_h.is_none() || r.bucket_path.is_none() {
            e.unbucketed += 1;
            continue;
        }
        let Some(caption) = r.caption.clone().filter(|c| !c.trim().is_empty()) else {
            e.uncaptioned += 1;
            continue;
        };
        items.extend(bucketed_item(&r, caption));
    }
    e.eligible = items.len();
    items.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    if items.is_empty() {
        return Err(Error::config(format!(
            "{}: nothing to train on: {} ok items, {} without a bucket (run `eps2v bucket`), {} without a caption (run `eps2v caption`)",
            m.root().display(),
            e.ok,
            e.unbucketed,
            e.uncaptioned
        )));
    }
    Ok((items, e))
}

/// The item of a bucketed row with its training text, `None` without a
/// bucket. Its bucket geometry is what keys its latent cache entry, so
/// whatever encodes latents (train, the kohya export) builds items here.
pub fn bucketed_item(r: &ExportRow, caption: String) -> Option<TrainItem> {
    let (Some(bw), Some(bh), Some(path)) = (r.bucket_w, r.bucket_h, r.bucket_path.clone()) else {
        return None;
    };
    let get = |v: Option<i64>| v.unwrap_or(0) as f32;
    Some(TrainItem {
        item_id: r.item_id,
        sha256: r.sha256.clone(),
        caption,
        bucket: (bw as u32, bh as u32),
        image_path: path,
        size: SizeCond {
            original: (get(r.height), get(r.width)),
            crop_top_left: (get(r.crop_top_resized), get(r.crop_left_resized)),
            target: (bh as f32, bw as f32),
        },
        resized: (
            r.resized_w.unwrap_or(0) as u32,
            r.resized_h.unwrap_or(0) as u32,
        ),
    })
}

/// Seeded rank of an item for the split.
fn split_rank(seed: u64, sha256: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(sha256.as_bytes());
    h.finalize().into()
}

/// Split `items` into (train, validation): the `min(val_max,
/// round(fraction·n))` items of lowest seeded rank are held out, but never
/// so many that nothing trains. Both keep the input order.
pub fn split(
    items: Vec<TrainItem>,
    fraction: f64,
    val_max: usize,
    seed: u64,
) -> (Vec<TrainItem>, Vec<TrainItem>) {
    let n = items.len();
    let n_val = ((fraction * n as f64).round() as usize)
        .min(val_max)
        .min(n.saturating_sub(1));
    let mut ranked: Vec<(usize, [u8; 32])> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (i, split_rank(seed, &it.sha256)))
        .collect();
    ranked.sort_by_key(|a| a.1);
    let mut is_val = vec![false; n];
    for (i, _) in ranked.iter().take(n_val) {
        is_val[*i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (it, v) in items.into_iter().zip(is_val) {
        if v {
            val.push(it);
        } else {
            train.push(it);
        }
    }
    (train, val)
}

/// The first 64 bits of an item's sha256 (hex): its position in the
/// streams keyed by content.
pub fn content_key(sha256: &str) -> u64 {
    sha256
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| {
            let d: [u8; 32] = Sha256::digest(sha256.as_bytes()).into();
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        })
}

/// A seeded RNG for one purpose and position (independent streams).
pub fn rng_for(seed: u64, purpose: u64, a: u64, b: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    for x in [seed, purpose, a, b] {
        h.update(x.to_le_bytes());
    }
    let d: [u8; 32] = h.finalize().into();
    ChaCha8Rng::from_seed(d)
}

/// RNG stream ids.
pub mod stream {
    /// Batch order of an epoch.
    pub const EPOCH: u64 = 1;
    /// Noise, timesteps and caption dropout of a micro-batch.
    pub const STEP: u64 = 2;
    /// Validation-loss noise.
    pub const VAL: u64 = 3;
    /// VAE latent samples.
    pub const LATENT: u64 = 4;
}

/// The batches of one epoch as indices into `items` (see the module docs).
pub fn epoch_batches(items: &[TrainItem], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = rng_for(seed, stream::EPOCH, epoch, 0);
    let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by_bucket.entry(it.bucket).or_default().push(i);
    }
    let mut batches = Vec::new();
    for (_, mut idx) in by_bucket {
        idx.shuffle(&mut rng);
        batches.extend(idx.chunks(batch.max(1)).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Where the data stream is: epoch and batch index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPos {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Next batch of that epoch.
    pub batch: usize,
}

/// Iterates batches across epochs from a [`DataPos`].
pub struct Batches<'a> {
    items: &'a [TrainItem],
    batch: usize,
    seed: u64,
    pos: DataPos,
    current: Vec<Vec<usize>>,
}

impl<'a> Batches<'a> {
    /// Start at `pos`.
    pub fn new(items: &'a [TrainItem], batch: usize, seed: u64, pos: DataPos) -> Self {
        let current = epoch_batches(items, batch, seed, pos.epoch);
        Self {
            items,
            batch,
            seed,
            pos,
            current,
        }
    }

    /// The position of the next batch.
    pub fn pos(&self) -> DataPos {
        self.pos
    }

    /// The next batch (indices into the items), advancing the position.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.pos.batch >= self.current.len() {
            self.pos = DataPos {
                epoch: self.pos.epoch + 1,
                batch: 0,
            };
            self.current = epoch_batches(self.items, self.batch, self.seed, self.pos.epoch);
        }
        let b = self.current[self.pos.batch].clone();
        self.pos.batch += 1;
        b
    }
}

/// Record the split of a run (idempotent).
pub(super) fn record_split(
    m: &mut Manifest,
    run_id: i64,
    train: &[TrainItem],
    val: &[TrainItem],
) -> Result<()> {
    let path = m.db_path().to_path_buf();
    let err = crate::manifest::sql_err(&path);
    let tx = m.conn_mut().transaction().map_err(err)?;
    {
        let mut st = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO train_split (run_id, item_id, split) VALUES (?1, ?2, ?3)",
            )
            .map_err(err)?;
        for (items, split) in [(train, "train"), (val, "val")] {
            for it in items {
                st.execute(rusqlite::params![run_id, it.item_id, split])
                    .map_err(err)?;
            }
        }
    }
    tx.commit().map_err(err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn item(id: i64, bucket: (u32, u32)) -> TrainItem {
        TrainItem {
            item_id: id,
            sha256: format!("{id:064x}"),
            caption: format!("item {id}"),
            bucket,
            image_path: format!("buckets/{id}.png"),
            size: SizeCond::inference(bucket.1 as f32, bucket.0 as f32),
            resized: bucket,
        }
    }

    #[test]
    fn split_is_seeded_stable_and_never_empties_training() {
        let items: Vec<_> = (0..40).map(|i| item(i, (64, 64))).collect();
        let (t, v) = split(items.clone(), 0.1, 64, 7);
        assert_eq!((t.len(), v.len()), (36, 4));
        let (t2, v2) = split(items.iter().rev().cloned().collect(), 0.1, 64, 7);
        let ids = |x: &[TrainItem]| {
            let mut v: Vec<i64> = x.iter().map(|i| i.item_id).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&v), ids(&v2), "order-independent");
        assert_eq!(ids(&t), ids(&t2));
        let (_, v3) = split(items.clone(), 0.1, 64, 8);
        assert_ne!(ids(&v), ids(&v3), "seed-dependent");
        assert_eq!(split(items.clone(), 0.5, 3, 7).1.len(), 3, "val_max");
        assert_eq!(split(vec![item(1, (64, 64))], 0.5, 3, 7).0.len(), 1);
    }

    #[test]
    fn batches_never_mix_buckets_and_resume_from_any_position() {
        let mut items: Vec<_> = (0..10).map(|i| item(i, (64, 64))).collect();
        items.extend((10..17).map(|i| item(i, (96, 32))));
        let b = epoch_batches(&items, 3, 1, 0);
        // 10 → 3+3+3+1, 7 → 3+3+1
        assert_eq!(b.len(), 7);
        for batch in &b {
            let bucket = items[batch[0]].bucket;
            assert!(batch.iter().all(|&i| items[i].bucket == bucket));
        }
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..17).collect::<Vec<_>>());
        assert_ne!(b, epoch_batches(&items, 3, 1, 1), "reshuffled per epoch");
        // 12 batches straight vs 5, then resume from the saved position.
        let mut s = Batches::new(&items, 3, 1, DataPos::default());
        let straight: Vec<_> = (0..12).map(|_| s.next_batch()).collect();
        let mut r = Batches::new(&items, 3, 1, DataPos::default());
        let mut resumed: Vec<_> = (0..5).map(|_| r.next_batch()).collect();
        let mut r = Batches::new(&items, 3, 1, r.pos());
        resumed.extend((0..7).map(|_| r.next_batch()));
        assert_eq!(straight, resumed);
        assert_eq!(s.pos(), DataPos { epoch: 1, batch: 5 });
    }
}
