//! `eps2v merge --sweep`: one merge per α, each sampled with a fixed
//! prompt × seed set and scored by shape retention against a reference
//! model; a rerun keeps every merge it scored whose file is unchanged
//! (`<stem>-sweep.state.json`).

use super::*;

/// How a sweep scores each merge.
#[derive(Debug, Clone)]
pub struct SweepEval {
    /// Reference model (default: whichever of A/B predicts eps, else A).
    pub reference: Option<PathBuf>,
    /// Prompts.
    pub prompts: Vec<String>,
    /// Seeds per prompt.
    pub seeds: Vec<u64>,
    /// Sampling steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Where and in what precision the reference and each merge sample
    /// (`run`'s `[device]`; the default device and precision otherwise).
    pub load: crate::pipeline::LoadOptions,
    /// Also score model A itself, unmerged, on the same samples
    /// ([`SweepReport::a_retention`]): `run` compares the converted model
    /// with its merges on one measure.
    pub score_a: bool,
}

impl SweepEval {
    /// The evaluation settings, checked before anything loads: each error
    /// names its `merge` flag. `model`: the checkpoint whose shapes the
    /// size must fit (A).
    pub fn check(&self, model: &Path) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(Error::config(
                "--sweep needs at least one --eval-prompt to score each merge",
            ));
        }
        if self.seeds.is_empty() {
            return Err(Error::config("--eval-seeds: give at least one seed"));
        }
        if self.steps == 0 {
            return Err(Error::config("--eval-steps must be at least 1"));
        }
        if !(self.cfg.is_finite() && self.cfg > 0.0) {
            return Err(Error::config(format!(
                "--eval-cfg must be a positive number, got {}",
                self.cfg
            )));
        }
        crate::pipeline::model::check_size_of(model, self.width, self.height).map_err(|e| match e {
            Error::Config(msg) => Error::config(format!("--eval-size: {msg}")),
            other => other,
        })
    }
}

/// One merge of a sweep.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SweepPoint {
    /// α of this merge.
    pub alpha: f64,
    /// The merge.
    pub out: PathBuf,
    /// Mean shape retention against the reference.
    pub retention: f64,
    /// Grid: reference column, then this merge.
    pub grid: PathBuf,
}

/// What a sweep did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SweepReport {
    /// The reference model the scores are against.
    pub reference: PathBuf,
    /// Every merge, in α order as given.
    pub points: Vec<SweepPoint>,
    /// α with the highest retention.
    pub best_alpha: f64,
    /// Its retention.
    pub best_retention: f64,
    /// Retention of model A itself, unmerged, on the same samples (with
    /// [`SweepEval::score_a`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_retention: Option<f64>,
}

/// Write one merge per α, sample each with `eval`'s prompt × seed set (as
/// its markers say: eps, or v + ZTSNR) and score its shape retention
/// against the reference model's samples; a summary JSON goes beside them
/// (`<stem>-sweep.json`). A stop request ([`Ctx::should_stop`]) ends it
/// between merges with [`Error::Interrupted`], keeping the merges written.
pub fn sweep(
    cfg: &MergeConfig,
    alphas: &[f64],
    out: &Path,
    eval: &SweepEval,
    ctx: &Ctx,
) -> Result<SweepReport> {
    use crate::pipeline::SdxlModel;
    use crate::train::eval::{compose_grid, sample_set, EvalSpec};
    use crate::train::retention::mean_retention;

    if alphas.is_empty() || alphas.iter().any(|a| !a.is_finite()) {
        return Err(Error::config(
            "--sweep needs finite alphas, e.g. 0,0.25,0.5",
        ));
    }
    // Every output against the inputs before the first merge is written
    // (each merge refuses its own, but only when its turn comes).
    for &alpha in alphas {
        let p = sweep_path(out, alpha);
        if let Some((flag, input)) = input_at(cfg, &p) {
            return Err(Error::config(format!(
                "merge --sweep: its α = {alpha} output {} is model {flag} ({}); give another --out (eps2v never replaces its input)",
                p.display(),
                input.display()
            )));
        }
    }
    // As written, or one file (a link or a hard link to it).
    let same = |a: &Path, b: &Path| {
        crate::atomic::same_file(a, b)
            || matches!((std::path::absolute(a), std::path::absolute(b)), (Ok(a), Ok(b)) if a == b)
    };
    eval.check(&cfg.a)?;
    if let Some(r) = eval
        .reference
        .as_ref()
        .filter(|r| alphas.iter().any(|&a| same(&sweep_path(out, a), r)))
    {
        return Err(Error::config(format!(
            "--reference {}: is one of the sweep's own outputs (it would be overwritten); give the base model, or another --out",
            r.display()
        )));
    }
    let reference = match &eval.reference {
        Some(r) => r.clone(),
        None => {
            let b_eps = Checkpoint::open(&cfg.b)?.prediction().prediction.name() == "epsilon";
            let a_eps = Checkpoint::open(&cfg.a)?.prediction().prediction.name() == "epsilon";
            if !a_eps && b_eps {
                cfg.b.clone()
            } else {
                cfg.a.clone()
            }
        }
    };
    let spec = EvalSpec {
        prompts: eval.prompts.clone(),
        seeds: eval.seeds.clone(),
        width: eval.width,
        height: eval.height,
        steps: eval.steps,
        cfg: eval.cfg,
        sampler: crate::diffusion::SamplerKind::Euler,
        uncond: crate::diffusion::UncondMode::Zero,
    };
    // Merges a killed or earlier sweep of the same inputs and settings
    // scored, whose files are still the ones it wrote, are kept.
    let state_path = sweep_state_path(out);
    let key = sweep_key(cfg, eval, &reference)?;
    let mut state = SweepState::read(&state_path, &key);
    let mut ref_imgs: Option<Vec<image::RgbImage>> = None;
    let mut points: Vec<SweepPoint> = Vec::new();
    let mut reused = 0;
    let bar = ctx.bar(alphas.len() as u64 + u64::from(eval.score_a), "merge sweep");
    for &alpha in alphas {
        if ctx.should_stop() {
            return Err(Error::Interrupted(format!(
                "merge sweep: stopped after {} of {} merges; rerun to do the rest (the {} done are kept)",
                points.len(),
                alphas.len(),
                points.len()
            )));
        }
        let path = sweep_path(out, alpha);
        if let Some(p) = state.still_valid(alpha, &path) {
            points.push(p);
            reused += 1;
            bar.inc(1);
            continue;
        }
        // The merge before the reference renders: a merge that cannot be
        // made (shapes, components, markers) fails in seconds, not after
        // the reference images.
        merge(
            &MergeConfig {
                alpha,
                ..cfg.clone()
            },
            &path,
        )?;
        let ref_imgs = match &ref_imgs {
            Some(r) => r,
            None => {
                let ref_model = SdxlModel::load(&reference, &eval.load)?;
                ref_imgs.insert(sample_set(&ref_model, &spec)?)
            }
        };
        let m = SdxlModel::load(&path, &eval.load)?;
        let imgs = sample_set(&m, &spec)?;
        let retention = mean_retention(ref_imgs, &imgs);
        let grid = path.with_extension("grid.png");
        let g = compose_grid(&[ref_imgs.clone(), imgs], eval.width, eval.height);
        crate::pipeline::sample::write_atomic(&grid, &crate::stages::bucket::encode_png_fast(&g)?)?;
        let point = SweepPoint {
            alpha,
            out: path,
            retention,
            grid,
        };
        state.record(&point)?;
        crate::pipeline::sample::write_atomic(&state_path, &serde_json::to_vec_pretty(&state)?)?;
        points.push(point);
        bar.inc(1);
    }
    // Model A unmerged, against the same reference samples; kept in the
    // state like a merge (A's content is in its key).
    // An α = 0 merge is A's UNet with A's other parts and markers: its
    // score is A's (not sampled twice).
    let plain = cfg.c.is_none()
        && cfg.blocks.per_block.is_empty()
        && cfg.te == Side::A
        && cfg.vae == Side::A
        && cfg.markers.is_none_or(|m| m == Side::A)
        && cfg.dtype.is_none();
    let at_zero = points
        .iter()
        .find(|p| plain && p.alpha == 0.0)
        .map(|p| p.retention);
    let a_retention = match (eval.score_a, state.a_retention.or(at_zero)) {
        (false, _) => None,
        (true, Some(r)) => {
            bar.inc(1);
            Some(r)
        }
        (true, None) => {
            if ctx.should_stop() {
                return Err(Error::Interrupted(format!(
                    "merge sweep: stopped after its {} merges, before scoring {} unmerged; rerun to score it (the merges are kept)",
                    points.len(),
                    cfg.a.display()
                )));
            }
            let ref_imgs = match &ref_imgs {
                Some(r) => r,
                None => {
                    let ref_model = SdxlModel::load(&reference, &eval.load)?;
                    ref_imgs.insert(sample_set(&ref_model, &spec)?)
                }
            };
            let m = SdxlModel::load(&cfg.a, &eval.load)?;
            let r = mean_retention(ref_imgs, &sample_set(&m, &spec)?);
            state.a_retention = Some(r);
            crate::pipeline::sample::write_atomic(
                &state_path,
                &serde_json::to_vec_pretty(&state)?,
            )?;
            bar.inc(1);
            Some(r)
        }
    };
    if reused > 0 {
        ctx.say(&format!(
            "merge sweep: {reused} of {} merges kept from an earlier sweep of the same inputs and settings ({})",
            alphas.len(),
            state_path.display()
        ));
    }
    bar.finish_and_clear();
    let best = points
        .iter()
        .max_by(|a, b| a.retention.total_cmp(&b.retention))
        .ok_or_else(|| Error::Other("sweep: no merges".into()))?;
    let report = SweepReport {
        reference,
        best_alpha: best.alpha,
        best_retention: best.retention,
        points: points.clone(),
        a_retention,
    };
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merge".into());
    let summary = out.with_file_name(format!("{stem}-sweep.json"));
    crate::pipeline::sample::write_atomic(
        &summary,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Where a sweep keeps what it has scored (`m.safetensors` →
/// `m-sweep.state.json`).
fn sweep_state_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merge".into());
    out.with_file_name(format!("{stem}-sweep.state.json"))
}

/// What decides a sweep's merges and scores, but α: the inputs by
/// content, the merge settings, the evaluation, where it samples, and this
/// eps2v's version.
fn sweep_key(cfg: &MergeConfig, eval: &SweepEval, reference: &Path) -> Result<String> {
    use crate::models::sdxl::checkpoint::sha256_file;
    use sha2::{Digest, Sha256};
    let hash = |p: &Path| sha256_file(p);
    let device = eval
        .load
        .device
        .clone()
        .unwrap_or_else(crate::nn::default_device);
    let settings = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "a": hash(&cfg.a)?,
        "b": hash(&cfg.b)?,
        "c": cfg.c.as_deref().map(hash).transpose()?,
        "blocks": serde_json::to_value(&cfg.blocks)?,
        "te": serde_json::to_value(cfg.te)?,
        "vae": serde_json::to_value(cfg.vae)?,
        "markers": serde_json::to_value(cfg.markers)?,
        "dtype": format!("{:?}", cfg.dtype),
        "reference": hash(reference)?,
        "prompts": eval.prompts,
        "seeds": eval.seeds,
        "steps": eval.steps,
        "cfg": eval.cfg,
        "size": [eval.width, eval.height],
        // Where the models will sample: the default device and precision
        // when none is given (the CLI), as loading resolves them.
        "device": format!("{:?}", device.location()),
        "precision": format!("{:?}", crate::nn::model_dtype(&device, eval.load.dtype)?),
    });
    Ok(hex::encode(Sha256::digest(settings.to_string().as_bytes())))
}

/// The merges a sweep scored, with the file each wrote as it was then
/// (size and modification time).
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct SweepState {
    key: String,
    points: Vec<(SweepPoint, u64, i128)>,
    /// Retention of model A unmerged ([`SweepEval::score_a`]).
    #[serde(default)]
    a_retention: Option<f64>,
}

/// Size and modification time (ns) of a file.
fn stamp(p: &Path) -> Option<(u64, i128)> {
    let m = std::fs::metadata(p).ok()?;
    let t = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((m.len(), t.as_nanos() as i128))
}

impl SweepState {
    /// The state at `path` when it is for `key`, else an empty one.
    fn read(path: &Path, key: &str) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<SweepState>(&b).ok())
            .filter(|s| s.key == key)
            .unwrap_or_else(|| SweepState {
                key: key.to_string(),
                points: Vec::new(),
                a_retention: None,
            })
    }

    /// The scored point of `alpha`, when the file at `path` and its grid
    /// beside it are still the ones it wrote (its folder may have moved).
    fn still_valid(&self, alpha: f64, path: &Path) -> Option<SweepPoint> {
        let grid = path.with_extension("grid.png");
        self.points
            .iter()
            .find(|(p, size, mtime)| {
                p.alpha.to_bits() == alpha.to_bits()
                    && grid.is_file()
                    && stamp(path) == Some((*size, *mtime))
            })
            .map(|(p, _, _)| SweepPoint {
                out: path.to_path_buf(),
                grid,
                ..p.clone()
            })
    }

    /// Remember `point` (replacing an older one of its α).
    fn record(&mut self, point: &SweepPoint) -> Result<()> {
        let (size, mtime) = stamp(&point.out)
            .ok_or_else(|| Error::Other(format!("{}: written, then gone", point.out.display())))?;
        self.points
            .retain(|(p, _, _)| p.alpha.to_bits() != point.alpha.to_bits());
        self.points.push((point.clone(), size, mtime));
        Ok(())
    }
}

/// The path of the sweep output for `alpha` (`m.safetensors` → `m-a0.25.safetensors`).
pub fn sweep_path(out: &Path, alpha: f64) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merge".into());
    out.with_file_name(format!("{stem}-a{alpha}.safetensors"))
}
