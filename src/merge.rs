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
    // ZTSNR counts for v only (a stray marker on an eps model is ignored
    // when sampling, and by the merge).
    let key = |p: &crate::models::sdxl::checkpoint::PredictionInfo| {
        use crate::models::sdxl::checkpoint::Prediction as P;
        (p.prediction, p.ztsnr && p.prediction == P::V)
    };
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

/// The input (`A`, `B` or `--diff`, and its path) that `out` is (the path,
/// a link or a hard link to it), if any.
fn input_at<'a>(cfg: &'a MergeConfig, out: &Path) -> Option<(&'static str, &'a Path)> {
    [
        ("A", Some(&cfg.a)),
        ("B", Some(&cfg.b)),
        ("--diff", cfg.c.as_ref()),
    ]
    .into_iter()
    .find_map(|(flag, input)| {
        input
            .filter(|i| crate::atomic::same_file(out, i))
            .map(|i| (flag, i.as_path()))
    })
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

/// Refuse a model A that is not a whole SDXL checkpoint (or UNet): A is
/// the layout of the output, and B and C are only checked against it key
/// by key, so an SD 1.x file, a LoRA or an SDXL file missing tensors
/// would be written through as a "merge". `eps2v merge` checks this
/// before [`merge`] / [`crate::merge_sweep::sweep`] (which take any
/// layout, as their unit tests do).
pub fn check_model_a(a: &Path) -> Result<()> {
    let a = Checkpoint::open(a)?;
    a.require_sdxl_family()?;
    let unet = a.infer_unet_config()?.config;
    let vae = match a.vae_prefix() {
        Some(_) => Some(a.infer_vae_config()?.config),
        None => None,
    };
    a.check_sdxl(&unet, vae.as_ref())
}

/// Merge `cfg` into `out` (streaming; atomic write).
pub fn merge(cfg: &MergeConfig, out: &Path) -> Result<MergeReport> {
    if !cfg.alpha.is_finite() {
        return Err(Error::config("--alpha must be a finite number"));
    }
    // The output is written over whatever is there: never over an input.
    if let Some((flag, input)) = input_at(cfg, out) {
        return Err(Error::config(format!(
            "merge --out {}: that is model {flag} ({}); write the merge to a new file (eps2v never replaces its input)",
            out.display(),
            input.display()
        )));
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
    // UNet weights only B has have nothing to blend with: said, not kept.
    let b_only: Vec<&String> = b
        .entries()
        .keys()
        .filter(|k| k.starts_with(&unet) && !keys.contains_key(*k))
        .collect();
    if let Some(first) = b_only.first() {
        warnings.push(format!(
            "{} UNet key(s) of B are not in A and are left out (e.g. {first}); A's layout decides the merge's",
            b_only.len()
        ));
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
    // Marked as the prediction the markers' side is read as, whether its
    // keys or only its metadata say so (a kohya v model has no `v_pred`
    // key: copying the keys' absence gave a v merge UIs sample as eps).
    let (v_pred, ztsnr) = {
        use crate::models::sdxl::checkpoint::Prediction as P;
        match pinfo.prediction {
            P::V => (true, pinfo.ztsnr),
            // EDM keys decide there (copied above); its own v_pred /
            // ztsnr keys (ComfyUI writes v_pred beside edm_vpred.*) stay.
            P::Edm | P::EdmV => (msrc.contains(MARKER_V_PRED), msrc.contains(MARKER_ZTSNR)),
            P::Epsilon => (false, false),
        }
    };
    let mut metadata = a.metadata().clone();
    for k in [META_PREDICTION_TYPE, META_ZTSNR, META_UNCOND] {
        metadata.remove(k);
        if let Some(v) = msrc.metadata().get(k) {
            metadata.insert(k.to_string(), v.clone());
        }
    }
    if pinfo.prediction == crate::models::sdxl::checkpoint::Prediction::V {
        metadata.insert(META_PREDICTION_TYPE.into(), "v".into());
    }
    // ZTSNR metadata only with the key (an eps side's stray one would make
    // the merge read as ZTSNR).
    if !ztsnr {
        metadata.remove(META_ZTSNR);
    }
    // What describes A alone and is wrong for the merge: its training
    // (eps2v's, kohya's `ss_*`), its file hash, an earlier merge's recipe.
    metadata.remove("eps2v.train");
    metadata.retain(|k, _| {
        !(k.starts_with("ss_")
            || k.starts_with("sshs_")
            || k.starts_with("modelspec.hash_")
            || k == "sd_merge_recipe"
            || k == "sd_merge_models")
    });
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

#[path = "merge_sweep.rs"]
mod sweeps;
pub use sweeps::{sweep, sweep_path, SweepEval, SweepPoint, SweepReport};

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
