//! The stages of [`super::build`], one function each: a stage reuses its
//! product from `work/` when the settings that made it are unchanged
//! ([`cached`]), otherwise makes it and records those settings; and
//! [`side_by_side`], which runs two independent stages at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use candle_core::Tensor;

use super::{unet_train_config, BuildOptions, BuildRecipe, StageRecord};
use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::pipeline::sample::write_atomic;
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::stages::bucket::{BucketConfig, BucketSet, CropArg};
use crate::stages::import::ImportConfig;
use crate::stages::Ctx;
use crate::toy::resume::Checkpoints;
use crate::toy::tagger::{round_trip_pool, train_tagger};
use crate::toy::text::train_text;
use crate::toy::vae::train_vae;
use crate::toy::{write_scenes, WriteScenes};
use crate::train::{train, TrainOptions};
use crate::{Error, Result};

/// A cached stage: `work/<name>.json` holds the settings that made its
/// product and its record; reuse it when the settings are the same.
fn cached(work: &Path, name: &str, key: &serde_json::Value) -> Option<StageRecord> {
    let raw = std::fs::read(work.join(format!("{name}.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    if v.get("key")? != key {
        return None;
    }
    serde_json::from_value(v.get("record")?.clone()).ok()
}

fn record(work: &Path, name: &str, key: &serde_json::Value, rec: &StageRecord) -> Result<()> {
    let v = serde_json::json!({ "key": key, "record": rec });
    write_atomic(
        &work.join(format!("{name}.json")),
        serde_json::to_string_pretty(&v)?.as_bytes(),
    )
}

/// Write `tensors` to the safetensors file `path` (temp file + rename).
fn save_tensors(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<()> {
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

/// Run `main` here and `side` beside it on a pool of its own (with
/// `concurrent`; otherwise one after the other), and return both results.
/// The first to fail cancels the other through `ctx` (the trainers poll
/// [`Ctx::cancelled`] between steps) and its error is the one returned.
///
/// Why side by side: the toy models are small, so a training step keeps
/// two cores only partly busy (small tensors, serial stretches between
/// parallel kernels); the tagger beside the UNet cost the UNet about 2 % of
/// its time, where one after the other it costs all of its own (README,
/// Toy world). Same bytes: the side pool has the global pool's thread
/// count, and the kernels split work by that count, not by timing.
pub(super) fn side_by_side<A: Send, B: Send>(
    concurrent: bool,
    ctx: &Ctx,
    main: impl FnOnce() -> Result<A>,
    side: impl FnOnce() -> Result<B> + Send,
) -> Result<(A, B)> {
    if !concurrent {
        let a = main()?;
        return Ok((a, side()?));
    }
    // Until the first of the two finishes, idle workers sleep instead of
    // polling (`nn::keep_warm`); the one left then runs with its pool kept
    // warm.
    let shared = std::sync::Mutex::new(Some(crate::nn::share_cores()));
    let finished = || drop(shared.lock().map(|mut s| s.take()));
    // 1: main failed first, 2: side failed first.
    let first = AtomicU8::new(0);
    let failed = |who: u8| {
        let _ = first.compare_exchange(0, who, Ordering::SeqCst, Ordering::SeqCst);
        ctx.cancel();
    };
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("toy-build-side-{i}"))
                .build()
                .map_err(|e| Error::Other(format!("toy build: cannot start a thread pool: {e}")));
            let b = pool.and_then(|p| p.install(side));
            finished();
            if b.is_err() {
                failed(2);
            }
            b
        });
        let a = main();
        finished();
        if a.is_err() {
            failed(1);
        }
        let b = h.join().unwrap_or_else(|_| {
            Err(Error::Other(
                "toy build: a stage running beside another panicked".into(),
            ))
        });
        match (a, b) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
            // Both stopped by the same Ctrl-C: say where each was saved.
            (Err(Error::Interrupted(ea)), Err(Error::Interrupted(eb))) => {
                Err(Error::Interrupted(format!("{ea}\n{eb}")))
            }
            (Err(ea), Err(eb)) => Err(if first.load(Ordering::SeqCst) == 2 {
                eb
            } else {
                ea
            }),
        }
    })
}

/// Stages 1–2: the scenes and the bucketed dataset in `work/dataset`.
pub(super) fn dataset_stage(
    r: &BuildRecipe,
    work: &Path,
    data_key: &serde_json::Value,
    ctx: &Ctx,
) -> Result<StageRecord> {
    if let Some(rec) = cached(work, "dataset", data_key) {
        return Ok(rec);
    }
    let t = Instant::now();
    let scenes_dir = work.join("scenes");
    let ds = work.join("dataset");
    // What a stage cut short left here belongs to its key: another seed or
    // scene count starts over (a dataset imported from the other scenes
    // would be trained on, under this recipe's name).
    let stamp = work.join("dataset.key");
    let had = std::fs::read(&stamp)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if had.as_ref() != Some(data_key) {
        for d in [&scenes_dir, &ds] {
            if d.exists() {
                std::fs::remove_dir_all(d).at(d)?;
            }
        }
        write_atomic(&stamp, serde_json::to_string(data_key)?.as_bytes())?;
    }
    ctx.say(&format!("toy build: drawing {} scenes", r.scenes));
    let w = write_scenes(
        &scenes_dir,
        WriteScenes {
            count: r.scenes,
            seed: r.seed,
        },
        ctx,
    )?;
    let mut m = Manifest::init(&ds)?;
    let imp = crate::stages::import::run(
        &ImportConfig {
            from: scenes_dir.clone(),
            ..Default::default()
        },
        &mut m,
        ctx,
    )?;
    let buck = crate::stages::bucket::run(
        &BucketConfig {
            buckets: BucketSet::Kohya {
                resolution: 80,
                step: 32,
                min_side: 64,
                max_side: 96,
            },
            crop: CropArg::Center,
            max_upscale: 1.0,
            ..Default::default()
        },
        &mut m,
        ctx,
    )?;
    // Identical scenes (same pixels) are one item: import keeps one.
    if !buck.rejected.is_empty() || buck.bucketed + buck.already == 0 {
        return Err(Error::Other(format!(
            "toy build: {} scenes bucketed, rejected: {:?}; the toy bucket list and the scene sizes disagree",
            buck.bucketed + buck.already,
            buck.rejected
        )));
    }
    let rec = StageRecord {
        seconds: t.elapsed().as_secs_f64(),
        details: serde_json::json!({
            "scenes": w.written + w.skipped,
            "items": imp.imported + imp.already_imported,
            "identical_scenes": imp.same_file,
            "buckets": buck.histogram,
        }),
        ..Default::default()
    };
    record(work, "dataset", data_key, &rec)?;
    Ok(rec)
}

/// Stage 3: the VAE in `work/vae.safetensors`.
pub(super) fn vae_stage(
    opts: &BuildOptions,
    work: &Path,
    vae_key: &serde_json::Value,
    ctx: &Ctx,
) -> Result<StageRecord> {
    let r = &opts.recipe;
    let vae_file = work.join("vae.safetensors");
    if let Some(rec) = cached(work, "vae", vae_key).filter(|_| vae_file.is_file()) {
        return Ok(rec);
    }
    ctx.say(&format!(
        "toy build: training the VAE ({} steps)",
        r.vae.steps
    ));
    let ck =
        Checkpoints::new(work.join("vae.resume.safetensors"), vae_key).stop_at(opts.stop_at.vae);
    let (tv, rep) = train_vae(&r.vae, Some(&ck), ctx)?;
    save_tensors(&vae_file, tv.tensors()?)?;
    let rec = StageRecord::trained(
        rep.seconds,
        &rep.losses,
        serde_json::json!({
            "params": rep.params,
            "latent_mean_before": rep.latent_mean,
            "latent_std_before": rep.latent_std,
            "recon_mae_255": rep.recon_mae,
        }),
    );
    record(work, "vae", vae_key, &rec)?;
    ck.remove()?;
    Ok(rec)
}

/// Stage 4b: the text encoders of `random`, pretrained on toy captions, in
/// `work/text.safetensors` (none with `text.steps` 0).
pub(super) fn text_stage(
    opts: &BuildOptions,
    work: &Path,
    random: &Path,
    text_key: &serde_json::Value,
    ctx: &Ctx,
) -> Result<Option<StageRecord>> {
    let r = &opts.recipe;
    if r.text.steps == 0 {
        return Ok(None);
    }
    let text_file = work.join("text.safetensors");
    if let Some(rec) = cached(work, "text", text_key).filter(|_| text_file.is_file()) {
        return Ok(Some(rec));
    }
    ctx.say(&format!(
        "toy build: pretraining the text encoders ({} steps x {})",
        r.text.steps, r.text.batch
    ));
    let ck =
        Checkpoints::new(work.join("text.resume.safetensors"), text_key).stop_at(opts.stop_at.text);
    let (t, rep) = train_text(random, &r.text, Some(&ck), ctx)?;
    save_tensors(&text_file, t)?;
    let rec = StageRecord::trained(
        rep.seconds,
        &rep.losses,
        serde_json::json!({
            "captions_read_exactly_before": rep.exact_before,
            "captions_read_exactly_after": rep.exact_after,
        }),
    );
    record(work, "text", text_key, &rec)?;
    ck.remove()?;
    Ok(Some(rec))
}

/// Stage 5: the UNet of `base`, trained with the project's trainer on the
/// dataset `ds`, exported to `model_path`; an interrupted training run of
/// the same settings in `ds` is resumed ([`crate::train::state::resumable_run`]).
pub(super) fn unet_stage(
    opts: &BuildOptions,
    work: &Path,
    ds: &Path,
    base: &Path,
    model_path: &Path,
    unet_key: &serde_json::Value,
    ctx: &Ctx,
) -> Result<StageRecord> {
    let r = &opts.recipe;
    if let Some(rec) = cached(work, "unet", unet_key).filter(|_| model_path.is_file()) {
        return Ok(rec);
    }
    ctx.say(&format!(
        "toy build: training the UNet ({} steps x {})",
        r.unet.steps, r.unet.batch
    ));
    let cfg = unet_train_config(r, base, model_path);
    let mut m = Manifest::open(ds)?;
    // A run that a kill or Ctrl-C stopped goes on from its last checkpoint
    // (every `save_every` steps, and where Ctrl-C stopped it), bit for bit.
    let resume = crate::train::state::resumable_run(&m, &cfg)?;
    if let Some(id) = resume {
        ctx.say(&format!(
            "toy build: resuming UNet training run {id} from its last checkpoint"
        ));
    }
    let t = Instant::now();
    let train_opts = TrainOptions {
        resume,
        stop_at_step: opts.stop_at.unet,
        ..Default::default()
    };
    let rep = train(&cfg, &mut m, &train_opts, ctx)?;
    if rep.interrupted {
        return Err(Error::Interrupted(format!(
            "toy build: UNet training was interrupted at step {} of {}; rerun `eps2v toy build` with the same settings to resume it from its last checkpoint",
            rep.steps, r.unet.steps
        )));
    }
    let losses: Vec<f32> = crate::train::log::read(&rep.run_dir.join("log.csv"))
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.loss)
                .map(|l| l as f32)
                .collect()
        })
        .unwrap_or_default();
    let rec = StageRecord::trained(
        t.elapsed().as_secs_f64(),
        &losses,
        serde_json::json!({
            "train_items": rep.train_items,
            "val_items": rep.val_items,
            "val_loss": rep.val_loss,
            "skipped": rep.skipped,
            "config": cfg,
        }),
    );
    record(work, "unet", unet_key, &rec)?;
    Ok(rec)
}

/// Stage 6: the tagger in `tagger_dir` (with round trips through the VAE of
/// `base` when the recipe asks for them).
pub(super) fn tagger_stage(
    opts: &BuildOptions,
    work: &Path,
    base: &Path,
    tagger_dir: &Path,
    tagger_key: &serde_json::Value,
    ctx: &Ctx,
) -> Result<StageRecord> {
    let r = &opts.recipe;
    if let Some(rec) = cached(work, "tagger", tagger_key)
        .filter(|_| tagger_dir.join("model.safetensors").is_file())
    {
        return Ok(rec);
    }
    ctx.say(&format!(
        "toy build: training the tagger ({} steps x {})",
        r.tagger.steps, r.tagger.batch
    ));
    let pool = if r.tagger.round_trips > 0 {
        let vae_model = SdxlModel::load(base, &LoadOptions::default())?;
        round_trip_pool(
            &vae_model,
            r.tagger.data_seed.wrapping_add(1),
            r.tagger.round_trips,
            ctx,
        )?
    } else {
        Vec::new()
    };
    let ck = Checkpoints::new(work.join("tagger.resume.safetensors"), tagger_key)
        .stop_at(opts.stop_at.tagger);
    let (t, rep) = train_tagger(&r.tagger, &pool, Some(&ck), ctx)?;
    t.save(tagger_dir)?;
    let rec = StageRecord::trained(
        rep.seconds,
        &rep.losses,
        serde_json::json!({ "params": rep.params }),
    );
    record(work, "tagger", tagger_key, &rec)?;
    ck.remove()?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that fails stops the one beside it (through the context's
    /// stop flag) and its error is the one reported, whichever side it is
    /// on; the side pool has the global pool's size (the bytes depend on it).
    #[test]
    fn side_by_side_reports_the_first_failure_and_stops_the_other() {
        use std::sync::atomic::AtomicBool;
        let _polling = crate::nn::warm::tests::lock(); // it shares the cores
        let waits = |ctx: &Ctx, saw: &AtomicBool| -> Result<()> {
            let t = Instant::now();
            while !ctx.cancelled() {
                if t.elapsed().as_secs() > 60 {
                    return Err(Error::Other("never stopped".into()));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            saw.store(true, Ordering::SeqCst);
            Err(Error::Other("stopped".into()))
        };
        let fails = |what: &str| -> Result<()> { Err(Error::Other(format!("{what} broke"))) };
        for side_fails in [true, false] {
            let ctx = Ctx::quiet().concurrent();
            let saw = AtomicBool::new(false);
            let e = if side_fails {
                side_by_side(true, &ctx, || waits(&ctx, &saw), || fails("side"))
            } else {
                side_by_side(true, &ctx, || fails("main"), || waits(&ctx, &saw))
            }
            .unwrap_err()
            .to_string();
            let want = if side_fails {
                "side broke"
            } else {
                "main broke"
            };
            assert!(e.contains(want), "{e}");
            assert!(
                saw.load(Ordering::SeqCst),
                "the other stage was not stopped"
            );
        }
        let ctx = Ctx::quiet().concurrent();
        let (a, b) = side_by_side(
            true,
            &ctx,
            || Ok(rayon::current_num_threads()),
            || Ok(rayon::current_num_threads()),
        )
        .unwrap();
        assert_eq!(a, b);
        assert!(!ctx.cancelled());
    }
}
