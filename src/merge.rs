//! `eps2v merge`: blend single-file SDXL checkpoints, block by block.
//!
//! Modes (supermerger's conventions, reference/sdxl.md §2):
//! - weighted sum: `M = (1 − α)·A + α·B`;
//! - add difference: `M = A + α·(B − C)`.
//!
//! α is per MBW block of the UNet ([`BlockId`]: `IN00`…`IN08`, `M00`,
//! `OUT00`…`OUT08` — `out.*` counts as `OUT08`, as in supermerger —
//! `TIME_EMBED`, `LABEL_EMB`), given as `"IN00-IN08=0.2,M00=0.5,OUT00-OUT08=0.8"`;
//! blocks not named use `--alpha`. The text encoders and the VAE are not
//! blended: they are copied from the side chosen with `--te` / `--vae`, and
//! the `v_pred` / `ztsnr` markers (and the prediction metadata) from the side
//! chosen with `--markers` — a blend of an eps and a v model is sampled as
//! one of the two, and the user says which: without `--markers`, models
//! whose predictions differ (eps vs v, ZTSNR or not) are refused rather than
//! silently given A's markers (an unmarked v model is sampled as eps by
//! ComfyUI and A1111/Forge).
//!
//! Only float tensors are blended or copied. A UNet, text-encoder or VAE
//! tensor in another dtype (an fp8 or quantized release) is an error naming
//! it, never a silently incomplete file; other non-float keys (the CLIP
//! `position_ids` buffers) are left out and listed.
//!
//! Streaming: the output is written tensor by tensor ([`save_lazy`]), each
//! blended from the memory-mapped inputs when it is written, so peak memory
//! is about one tensor per input, not three models.
//!
//! `--sweep 0,0.25,…` writes one merge per α (all blocks at that α, block
//! overrides kept), samples each with a fixed prompt × seed set and scores
//! its shape retention against a reference model's samples
//! ([`crate::train::retention`]); the report names the best α.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::models::sdxl::blocks::BlockId;
use crate::models::sdxl::checkpoint::{
    is_ignored_key, is_marker_key, save_lazy, Checkpoint, LazyTensor, SaveOptions, MARKER_V_PRED,
    MARKER_ZTSNR, META_PREDICTION_TYPE, META_UNCOND, META_ZTSNR,
};
use crate::models::sdxl::UNET_PREFIX;
use crate::stages::Ctx;
use crate::{Error, Result};

/// Which input a component comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Side {
    /// The first model.
    #[default]
    A,
    /// The second model.
    B,
}

impl std::str::FromStr for Side {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "a" => Ok(Side::A),
            "b" => Ok(Side::B),
            o => Err(Error::config(format!("side {o:?}: use a or b"))),
        }
    }
}

/// Per-block α (`None` for a block means the default α).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BlockAlphas {
    per_block: BTreeMap<String, f64>,
}

fn parse_block(s: &str) -> Result<Vec<BlockId>> {
    let bad = || {
        Error::config(format!(
            "--blocks: unknown block {s:?}; use IN00…IN08, M00, OUT00…OUT08, TIME_EMBED, LABEL_EMB or ranges like IN00-IN08"
        ))
    };
    if let Some((a, b)) = s.split_once('-') {
        return match (
            BlockId::parse(a).ok_or_else(bad)?,
            BlockId::parse(b).ok_or_else(bad)?,
        ) {
            (BlockId::In(x), BlockId::In(y)) if x <= y => Ok((x..=y).map(BlockId::In).collect()),
            (BlockId::Out(x), BlockId::Out(y)) if x <= y => Ok((x..=y).map(BlockId::Out).collect()),
            _ => Err(Error::config(format!(
                "--blocks: range {s:?} must go from IN to IN or OUT to OUT, increasing"
            ))),
        };
    }
    match BlockId::parse(s).ok_or_else(bad)? {
        BlockId::Base | BlockId::Vae | BlockId::Other => Err(Error::config(format!(
            "--blocks: {s} is not a UNet block; text encoders and VAE come from --te / --vae"
        ))),
        b => Ok(vec![b]),
    }
}

impl BlockAlphas {
    /// Parse `"IN00-IN08=0.2,M00=0.5"`.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut per_block = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (sel, v) = part.split_once('=').ok_or_else(|| {
                Error::config(format!(
                    "--blocks: {part:?} needs BLOCK=ALPHA, e.g. OUT08=0.7"
                ))
            })?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| Error::config(format!("--blocks: {part:?}: {v:?} is not a number")))?;
            if !v.is_finite() {
                return Err(Error::config(format!(
                    "--blocks: {part:?}: the ratio must be a finite number"
                )));
            }
            for b in parse_block(sel.trim())? {
                if per_block.insert(b.to_string(), v).is_some() {
                    return Err(Error::config(format!(
                        "--blocks: {b} is given more than once"
                    )));
                }
            }
        }
        Ok(Self { per_block })
    }

    /// α of UNet key `key` (`default` when its block is not listed).
    pub fn alpha(&self, key: &str, default: f64) -> f64 {
        self.per_block
            .get(&BlockId::of_key(key).to_string())
            .copied()
            .unwrap_or(default)
    }
}

/// A merge.
#[derive(Debug, Clone, Serialize)]
pub struct MergeConfig {
    /// First model.
    pub a: PathBuf,
    /// Second model.
    pub b: PathBuf,
    /// `Some(C)`: add difference `A + α(B − C)`; `None`: weighted sum.
    pub c: Option<PathBuf>,
    /// Default α.
    pub alpha: f64,
    /// Per-block α.
    pub blocks: BlockAlphas,
    /// Text encoders from.
    pub te: Side,
    /// VAE from.
    pub vae: Side,
    /// Markers and prediction metadata from (`None`: A's, when A and B
    /// predict alike; models that differ are refused until the user says).
    pub markers: Option<Side>,
    /// Storage dtype (`None`: A's dtype per tensor).
    #[serde(skip)]
    pub dtype: Option<DType>,
}

/// What a merge wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// Output file.
    pub out: PathBuf,
    /// UNet tensors blended.
    pub blended: usize,
    /// Tensors copied from one side.
    pub copied: usize,
    /// Keys left out (non-float tensors such as `position_ids`).
    pub skipped: Vec<String>,
    /// Whether the output has the `v_pred` marker.
    pub v_pred: bool,
    /// Whether the output has the `ztsnr` marker.
    pub ztsnr: bool,
    /// What the user should know (the markers' side's own inconsistencies,
    /// keys left out).
    pub warnings: Vec<String>,
}

/// "eps", "v", "v + ZTSNR", … of a checkpoint, for messages.
fn prediction_label(p: &crate::models::sdxl::checkpoint::PredictionInfo) -> String {
    let mut s = p.prediction.name().to_string();
    if p.ztsnr {
        s.push_str(" + ZTSNR");
    }
    s
}

/// The side whose markers the merge carries: the one asked for, or A when A
/// and B predict alike; different predictions without `--markers` are an
/// error saying which is which.
fn markers_side(
    cfg: &MergeConfig,
    a: &Checkpoint,
    b: &Checkpoint,
    c: Option<&Checkpoint>,
) -> Result<Side> {
    if let Some(s) = cfg.markers {
        return Ok(s);
    }
    let (pa, pb) = (a.prediction(), b.prediction());
    let key = |p: &crate::models::sdxl::checkpoint::PredictionInfo| (p.prediction, p.ztsnr);
    if key(&pa) == key(&pb) {
        return Ok(Side::A);
    }
    let hint = match c.map(|c| c.prediction()) {
        Some(pc) if key(&pc) == key(&pa) => {
            " (with --diff, B's difference from C is what is added: --markers b, if that is the v conversion being transplanted)".to_string()
        }
        Some(pc) if key(&pc) == key(&pb) => {
            " (with --diff, A keeps its own prediction: usually --markers a)".to_string()
        }
        _ => String::new(),
    };
    Err(Error::config(format!(
        "merge: A ({}) is {} but B ({}) is {}; the merge is sampled as whichever markers it carries (ComfyUI and A1111/Forge read the v_pred / ztsnr keys): pass --markers a or --markers b{hint}",
        a.path().display(),
        prediction_label(&pa),
        b.path().display(),
        prediction_label(&pb),
    )))
}

/// Whether merge can read a tensor stored as `dtype`.
fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

/// A weight merge cannot read (fp8, quantized), named with its file.
fn not_float(ck: &Checkpoint, key: &str, dtype: &str) -> Error {
    Error::model(format!(
        "merge: {} stores {key} as {dtype}; merge blends and copies F16/BF16/F32/F64 weights only (an fp8 or quantized release?): convert it to f16 or bf16 first",
        ck.path().display()
    ))
}

fn check_same(a: &Checkpoint, other: &Checkpoint, key: &str) -> Result<()> {
    let ea = a.entry(key);
    match other.entry(key) {
        Some(e) if !is_float(&e.dtype) => Err(not_float(other, key, &e.dtype)),
        Some(e) if Some(&e.shape) == ea.map(|x| &x.shape) => Ok(()),
        Some(e) => Err(Error::model(format!(
            "merge: {key} has shape {:?} in {} but {:?} in {}; the models are of different architectures",
            ea.map(|x| x.shape.clone()).unwrap_or_default(),
            a.path().display(),
            e.shape,
            other.path().display()
        ))),
        None => Err(Error::model(format!(
            "merge: {} has no {key} (present in {}); merge models of the same architecture",
            other.path().display(),
            a.path().display()
        ))),
    }
}

/// The blend of one tensor, in f32.
pub fn blend(a: &Tensor, b: &Tensor, c: Option<&Tensor>, alpha: f64) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    Ok(match c {
        None => ((&a * (1.0 - alpha))? + (&b * alpha)?)?,
        Some(c) => (&a + ((b - c.to_dtype(DType::F32)?)? * alpha)?)?,
    })
}

/// Merge `cfg` into `out` (streaming; atomic write).
pub fn merge(cfg: &MergeConfig, out: &Path) -> Result<MergeReport> {
    if !cfg.alpha.is_finite() {
        return Err(Error::config("--alpha must be a finite number"));
    }
    let a = Checkpoint::open(&cfg.a)?;
    let b = Checkpoint::open(&cfg.b)?;
    let c = cfg.c.as_ref().map(Checkpoint::open).transpose()?;
    let unet = format!("{UNET_PREFIX}.");
    if !a.entries().keys().any(|k| k.starts_with(&unet)) {
        return Err(Error::model(format!(
            "{}: no SDXL UNet (model.diffusion_model.*); merge takes single-file SDXL checkpoints",
            cfg.a.display()
        )));
    }
    let markers = markers_side(cfg, &a, &b, c.as_ref())?;
    let side = |s: Side| if s == Side::A { &a } else { &b };
    let name = |s: Side| if s == Side::A { "A" } else { "B" };
    // A component asked from B must be there; one A lacks and B has is
    // said (the merge would have none).
    let mut warnings = Vec::new();
    for (s, filter, flag, what) in [
        (
            cfg.te,
            BlockId::Base,
            "--te",
            "text encoders (conditioner.embedders.*)",
        ),
        (cfg.vae, BlockId::Vae, "--vae", "VAE (first_stage_model.*)"),
    ] {
        let has = |ck: &Checkpoint| ck.entries().keys().any(|k| BlockId::of_key(k) == filter);
        let (in_a, in_b) = (has(&a), has(&b));
        if s == Side::B && !in_b && in_a {
            return Err(Error::config(format!(
                "merge: {flag} b, but {} has no {what}; use {flag} a",
                cfg.b.display()
            )));
        }
        if s == Side::A && !in_a && in_b {
            warnings.push(format!(
                "A ({}) has no {what}, so the merge has none; {flag} b takes B's",
                cfg.a.display()
            ));
        }
    }
    let mut items: Vec<(String, LazyTensor<'_>)> = Vec::new();
    let (mut blended, mut copied) = (0, 0);
    let mut skipped = Vec::new();
    // Keys: A's UNet keys, and every non-UNet key of the side each component comes from.
    let mut keys: BTreeMap<String, Side> = BTreeMap::new();
    for k in a.entries().keys() {
        if k.starts_with(&unet) {
            keys.insert(k.clone(), Side::A);
        }
    }
    for (s, filter) in [
        (cfg.te, BlockId::Base),
        (cfg.vae, BlockId::Vae),
        (Side::A, BlockId::Other),
    ] {
        for k in side(s).entries().keys() {
            if k.starts_with(&unet) || BlockId::of_key(k) != filter || is_marker_key(k) {
                continue;
            }
            if filter == BlockId::Other && is_ignored_key(k) {
                // A leftover EMA copy (`model_ema.*`) would be A's
                // unmerged UNet, for any loader that prefers it.
                skipped.push(k.clone());
                continue;
            }
            keys.insert(k.clone(), s);
        }
    }
    // The prediction's keys all come from the markers' side: `v_pred` and
    // `ztsnr` through the save options, EDM's (`edm_vpred.*`, `edm_mean`,
    // `edm_std`: ComfyUI reads them before `v_pred`) copied from it.
    for k in side(markers).entries().keys() {
        if is_marker_key(k) && k != MARKER_V_PRED && k != MARKER_ZTSNR {
            keys.insert(k.clone(), markers);
        }
    }
    for (k, s) in keys {
        let src = side(s);
        let Some(e) = src.entry(&k) else { continue };
        if !is_float(&e.dtype) {
            let component = BlockId::of_key(&k);
            if !is_ignored_key(&k)
                && (k.starts_with(&unet) || matches!(component, BlockId::Base | BlockId::Vae))
            {
                return Err(not_float(src, &k, &e.dtype));
            }
            skipped.push(k);
            continue;
        }
        if !k.starts_with(&unet) {
            items.push((k.clone(), src.lazy(&k)?));
            copied += 1;
            continue;
        }
        check_same(&a, &b, &k)?;
        if let Some(c) = &c {
            check_same(&a, c, &k)?;
        }
        let alpha = cfg.blocks.alpha(&k, cfg.alpha);
        let la = a.lazy(&k)?;
        let dtype = la.dtype;
        let shape = la.shape.clone();
        let (a, b, c) = (&a, &b, c.as_ref());
        let key = k.clone();
        items.push((
            k,
            LazyTensor {
                dtype,
                shape,
                produce: Box::new(move || {
                    // A NaN or ±inf in an input would be carried into the
                    // merge (any blend of it is NaN): refused as it streams,
                    // naming the file (the output stays a temporary file).
                    for ck in [Some(a), Some(b), c].into_iter().flatten() {
                        ck.check_key_finite(&key)?;
                    }
                    let cpu = candle_core::Device::Cpu;
                    let ta = a.tensor(&key, DType::F32, &cpu)?;
                    let tb = b.tensor(&key, DType::F32, &cpu)?;
                    let tc = c.map(|c| c.tensor(&key, DType::F32, &cpu)).transpose()?;
                    // In f32: the save rounds once, to the stored dtype
                    // (A's, or --dtype), and refuses f16 overflow.
                    blend(&ta, &tb, tc.as_ref(), alpha)
                }),
            },
        ));
        blended += 1;
    }
    let msrc = side(markers);
    let pinfo = msrc.prediction();
    for w in &pinfo.warnings {
        warnings.push(format!("model {} (the markers' side): {w}", name(markers)));
    }
    let not_ignored = skipped.iter().filter(|k| !is_ignored_key(k)).count();
    if not_ignored > 0 {
        warnings.push(format!(
            "{not_ignored} non-float key(s) outside the UNet, text encoders and VAE left out (listed under `skipped` in --json)"
        ));
    }
    let v_pred = msrc.contains(MARKER_V_PRED);
    let ztsnr = msrc.contains(MARKER_ZTSNR);
    let mut metadata = a.metadata().clone();
    for k in [META_PREDICTION_TYPE, META_ZTSNR, META_UNCOND] {
        metadata.remove(k);
        if let Some(v) = msrc.metadata().get(k) {
            metadata.insert(k.to_string(), v.clone());
        }
    }
    metadata.remove("eps2v.train");
    metadata.insert(
        "eps2v.merge".into(),
        serde_json::json!({
            // As text (`json!` panics on a path that is not UTF-8).
            "a": cfg.a.to_string_lossy(), "b": cfg.b.to_string_lossy(),
            "c": cfg.c.as_ref().map(|c| c.to_string_lossy()), "alpha": cfg.alpha,
            "blocks": cfg.blocks.per_block, "te": cfg.te, "vae": cfg.vae, "markers": markers,
            "prediction": pinfo.prediction.name(),
        })
        .to_string(),
    );
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    save_lazy(
        out,
        items,
        &SaveOptions {
            dtype: cfg.dtype,
            v_pred,
            ztsnr,
            metadata,
        },
    )?;
    Ok(MergeReport {
        out: out.to_path_buf(),
        blended,
        copied,
        skipped,
        v_pred,
        ztsnr,
        warnings,
    })
}

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
    eval.check(&cfg.a)?;
    let same = |a: &Path, b: &Path| match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
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
    let bar = ctx.bar(alphas.len() as u64, "merge sweep");
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

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
