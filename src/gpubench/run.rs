//! Our side of the device benchmark, in one process (so CUDA's one-time
//! costs — context, PTX JIT of candle's kernels — are paid once, in the
//! warm-up):
//! 1. the golden tiny models on the device ([`super::golden`]);
//! 2. `SdxlModel::load` in the bench dtype, our UNet on the fixed inputs of
//!    [`super::weights::write_inputs`] in that dtype and in f32, outputs
//!    saved for the Python side (`unet_out.safetensors`: `out_<dtype>`,
//!    `out_f32`), and the UNet call's median time, with the fused device
//!    forms of [`crate::nn::ops::fused`] and without them (their time and
//!    how far they move the output);
//! 3. `sample` timings: [`crate::pipeline::generate`] (the code behind
//!    `eps2v sample`: text encoding, 2·steps UNet rows per image with CFG,
//!    VAE decode, RGB8) after a 2-step warm-up, per batch size; a batch
//!    that would end past `budget_s` of sampling (time spent + the last
//!    time per image × its size) is skipped, with the reason in its row;
//! 4. a training step with `out`+`OUT08` and with the whole UNet trainable
//!    ([`super::step`]) at the sampling size, batch 1. A failure there (out
//!    of memory) is recorded in its row and the run goes on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::golden::{golden_checks, GoldenCheck};
use super::step::{time_steps, Batch, StepReport, Trainable};
use crate::diffusion::{SamplerKind, UncondMode};
use crate::models::sdxl::checkpoint::{save_tensors, Checkpoint, SaveOptions};
use crate::models::sdxl::{build_y, SizeCond, UNet};
use crate::nn::device::{dtype_name, gpu_memory};
use crate::nn::profile::ProfileRow;
use crate::pipeline::{generate, LoadOptions, SampleConfig, SdxlModel};
use crate::{Error, Result};

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The random checkpoint ([`super::weights::write_random_checkpoint`]).
    pub model: PathBuf,
    /// The UNet check inputs ([`super::weights::write_inputs`]).
    pub inputs: PathBuf,
    /// fixtures/golden/sdxl, or `None` to skip the golden checks.
    pub fixtures: Option<PathBuf>,
    /// Where models run.
    pub device: Device,
    /// Model dtype (bf16 on CUDA; f32 on the CPU).
    pub dtype: DType,
    /// Image width and height in pixels (sampling and training).
    pub size: (u32, u32),
    /// Sampling steps.
    pub steps: usize,
    /// Batch sizes to time `sample` at.
    pub batches: Vec<usize>,
    /// Timed training steps per selection (after one warm-up).
    pub train_steps: usize,
    /// Seconds of sampling after which further batch sizes are skipped.
    pub budget_s: f64,
    /// Seconds per training selection after which no further step starts.
    pub train_budget_s: f64,
    /// Output folder (`ours.json`, `unet_out.safetensors`).
    pub out_dir: PathBuf,
}

/// Prompt of the timed sampling runs (both sides).
pub const PROMPT: &str = "a photo of a red circle on a blue background, high quality";
/// CFG scale of the timed sampling runs (both sides).
pub const CFG_SCALE: f64 = 7.0;

/// Our UNet on the check inputs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnetCheck {
    /// Median UNet call on the two input rows (one CFG pair), bench dtype (ms).
    pub forward_ms: f64,
    /// The same call with the fused device forms off (`EPS2V_DEVICE_FUSED=0`:
    /// every softmax, attention and norm as its composite), median (ms). On
    /// the CPU the fused forms never run, so both calls take the same path.
    pub composite_forward_ms: f64,
    /// Relative L2 difference of the output with the fused forms against
    /// the one with the composites (0 on the CPU).
    pub fused_vs_composite_rel_l2: f64,
    /// One more call (fused forms on) with every op and UNet module timed
    /// between device synchronisations ([`crate::nn::profile`]), by name;
    /// diffusers' UNet gets the same breakdown on the Python side.
    pub profile: Vec<ProfileRow>,
    /// Wall time of that call (ms): [`Self::forward_ms`] plus the
    /// synchronisations' cost.
    pub profiled_ms: f64,
    /// Tensors in `unet_out.safetensors`.
    pub outputs: Vec<String>,
    /// Whether every output is finite.
    pub finite: bool,
    /// The call at the largest sampling batch's row count, when that is
    /// more than the inputs' two rows.
    pub wide: Option<WideCheck>,
}

/// The UNet call at the largest sampling batch's size (two rows per image
/// with CFG): where a bigger batch's time goes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WideCheck {
    /// Rows per call (the check inputs repeated).
    pub rows: usize,
    /// Median call (ms).
    pub forward_ms: f64,
    /// One more call with every op and module timed, as
    /// [`UnetCheck::profile`].
    pub profile: Vec<ProfileRow>,
    /// Wall time of that call (ms).
    pub profiled_ms: f64,
    /// Why the calls could not run (out of memory, …); the times are NaN then.
    pub error: Option<String>,
}

/// One `sample` timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleTiming {
    /// Images.
    pub batch: usize,
    /// Steps per image.
    pub steps: usize,
    /// Wall time of the whole call (s); `None` when skipped.
    pub seconds: Option<f64>,
    /// `seconds / batch`.
    pub seconds_per_image: Option<f64>,
    /// Why it was skipped.
    pub skipped: Option<String>,
}

impl SampleTiming {
    /// A batch that did not run (budget) or failed, and why.
    fn skipped(batch: usize, steps: usize, why: String) -> Self {
        Self {
            batch,
            steps,
            seconds: None,
            seconds_per_image: None,
            skipped: Some(why),
        }
    }
}

/// Everything [`run`] measured (written as `ours.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OursReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Model dtype.
    pub dtype: String,
    /// VAE dtype.
    pub vae_dtype: String,
    /// Image size `[w, h]`.
    pub size: [u32; 2],
    /// Named UNet config of the checkpoint.
    pub unet_config: String,
    /// Model load time (s).
    pub load_seconds: f64,
    /// Golden tiny-model checks on the device.
    pub golden: Vec<GoldenCheck>,
    /// The UNet check (`None` until it ran).
    pub unet_check: Option<UnetCheck>,
    /// `sample` timings.
    pub sample: Vec<SampleTiming>,
    /// Training steps.
    pub train: Vec<StepReport>,
    /// Pool memory in use after loading the sampling model (MiB, CUDA).
    pub model_mem_mb: Option<f64>,
    /// Whole run (s).
    pub seconds: f64,
    /// GPU kernels turned off during the run ([`crate::nn::kernels_off`]).
    pub kernels_off: Vec<String>,
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

type Inputs = std::collections::HashMap<String, Tensor>;

/// The check inputs with every tensor's rows repeated to `rows` (a multiple
/// of the inputs' own count).
fn repeat_rows(io: &Inputs, rows: usize) -> Result<Inputs> {
    io.iter()
        .map(|(k, t)| {
            let have = t.dim(0)?;
            if have == 0 || rows % have != 0 {
                return Err(Error::model(format!(
                    "inputs: tensor {k} has {have} rows, not a divisor of {rows}"
                )));
            }
            Ok((k.clone(), Tensor::cat(&vec![t; rows / have], 0)?))
        })
        .collect()
}

/// Run the UNet of `unet` on the check inputs; returns the output (f32).
fn unet_on_inputs(unet: &UNet, io: &Inputs, dtype: DType, device: &Device) -> Result<Tensor> {
    let get = |k: &str| -> Result<Tensor> {
        Ok(io
            .get(k)
            .ok_or_else(|| Error::model(format!("inputs: missing tensor {k}")))?
            .to_device(device)?)
    };
    let sizes: Vec<SizeCond> = get("time_ids")?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?
        .iter()
        .map(|r| SizeCond {
            original: (r[0], r[1]),
            crop_top_left: (r[2], r[3]),
            target: (r[4], r[5]),
        })
        .collect();
    let y = build_y(&get("pooled")?.to_dtype(dtype)?, &sizes)?;
    let out = unet.forward(
        &get("x")?.to_dtype(dtype)?,
        &get("timesteps")?,
        &get("context")?.to_dtype(dtype)?,
        &y,
    )?;
    Ok(out.to_dtype(DType::F32)?)
}

fn is_finite(t: &Tensor) -> Result<bool> {
    let s = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(s.is_finite())
}

/// Run every measurement, writing `ours.json` into `cfg.out_dir` after each
/// section (a run cut short by the script's timeout keeps what it measured)
/// and `unet_out.safetensors`.
pub fn run(cfg: &RunConfig, log: &mut dyn FnMut(&str)) -> Result<OursReport> {
    let t_run = Instant::now();
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| Error::io(&cfg.out_dir, e))?;
    let json_path = cfg.out_dir.join("ours.json");
    let dev = &cfg.device;
    let dtype = crate::nn::model_dtype(dev, Some(cfg.dtype))?;
    let (w, h) = cfg.size;
    let mut report = OursReport {
        device: device_name(dev),
        dtype: dtype_name(dtype).to_string(),
        vae_dtype: dtype_name(crate::nn::vae_dtype(dtype)).to_string(),
        size: [w, h],
        unet_config: String::new(),
        load_seconds: f64::NAN,
        golden: Vec::new(),
        unet_check: None,
        sample: Vec::new(),
        train: Vec::new(),
        model_mem_mb: None,
        seconds: 0.0,
        kernels_off: Vec::new(),
    };
    let save = |r: &mut OursReport| -> Result<()> {
        r.seconds = t_run.elapsed().as_secs_f64();
        r.kernels_off = crate::nn::kernels_off()
            .into_iter()
            .map(String::from)
            .collect();
        write_json(&json_path, r)
    };

    if let Some(dir) = &cfg.fixtures {
        log("golden tiny models");
        report.golden = golden_checks(dir, dev)?;
        save(&mut report)?;
    }

    log("loading the model");
    let t0 = Instant::now();
    let model = SdxlModel::load(
        &cfg.model,
        &LoadOptions {
            device: Some(dev.clone()),
            dtype: Some(dtype),
            ..Default::default()
        },
    )?;
    dev.synchronize()?;
    report.load_seconds = t0.elapsed().as_secs_f64();
    report.unet_config = model.info.unet_config.clone();
    report.model_mem_mb = gpu_memory::used_bytes(dev)?.map(|b| b as f64 / (1u64 << 20) as f64);

    log("unet check");
    report.unet_check = Some(unet_check(cfg, &model.unet, dtype)?);
    save(&mut report)?;

    log("sampling warm-up");
    let sample_cfg = |steps: usize, batch: usize| SampleConfig {
        prompt: PROMPT.into(),
        uncond: UncondMode::Zero,
        seed: 0,
        steps,
        cfg: CFG_SCALE,
        rescale: None,
        sampler: SamplerKind::Euler,
        schedule: None,
        width: w,
        height: h,
        batch,
    };
    // A sampling failure (a NaN image, a kernel error) is recorded in its
    // rows and the training steps still run.
    let warm_up = generate(&model, &sample_cfg(2, 1), &mut |_, _| {}).err();
    let t_sampling = Instant::now();
    let mut per_image: Option<f64> = None;
    for &batch in &cfg.batches {
        let spent = t_sampling.elapsed().as_secs_f64();
        let expected = per_image.map_or(0.0, |p| p * batch as f64);
        if let Some(e) = &warm_up {
            let why = format!("the warm-up failed: {e}");
            report
                .sample
                .push(SampleTiming::skipped(batch, cfg.steps, why));
            continue;
        }
        if spent + expected > cfg.budget_s {
            let why = format!(
                "sampling budget: {spent:.0} s spent + {expected:.0} s expected > {} s",
                cfg.budget_s
            );
            report
                .sample
                .push(SampleTiming::skipped(batch, cfg.steps, why));
            continue;
        }
        log(&format!("sample batch {batch}"));
        dev.synchronize()?;
        let t = Instant::now();
        let images = match generate(&model, &sample_cfg(cfg.steps, batch), &mut |_, _| {}) {
            Ok(images) => images,
            Err(e) => {
                log(&format!("sample batch {batch} failed: {e}"));
                let why = format!("failed: {e}");
                report
                    .sample
                    .push(SampleTiming::skipped(batch, cfg.steps, why));
                save(&mut report)?;
                continue;
            }
        };
        dev.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        let p = s / images.len().max(1) as f64;
        per_image = Some(p);
        report.sample.push(SampleTiming {
            batch,
            steps: cfg.steps,
            seconds: Some(s),
            seconds_per_image: Some(p),
            skipped: None,
        });
        save(&mut report)?;
    }
    let unet_cfg = model.unet.config().clone();
    drop(model);

    let ckpt = Checkpoint::open(&cfg.model)?;
    let latent = (h as usize / 8, w as usize / 8);
    let batch = Batch::random(&unet_cfg, 1, latent, dtype, dev, 0)?;
    for sel in [Trainable::OutOut08, Trainable::Full] {
        log(&format!("training step, {} trainable", sel.name()));
        let r = time_steps(
            &ckpt,
            &unet_cfg,
            sel,
            dtype,
            dev,
            &batch,
            cfg.train_steps,
            cfg.train_budget_s,
        )
        .unwrap_or_else(|e| {
            let mut failed = StepReport::failed(sel, &e.to_string());
            crate::gpubench::step::partial_memory(&mut failed);
            failed
        });
        report.train.push(r);
        save(&mut report)?;
    }
    save(&mut report)?;
    Ok(report)
}

/// Our UNet on the check inputs in `dtype` (and f32 when that differs):
/// outputs saved to `unet_out.safetensors`, median call time.
fn unet_check(cfg: &RunConfig, unet: &UNet, dtype: DType) -> Result<UnetCheck> {
    let dev = &cfg.device;
    let io = candle_core::safetensors::load(&cfg.inputs, &Device::Cpu)?;
    let ours = unet_on_inputs(unet, &io, dtype, dev)?; // also the warm-up
    let median_ms = |io: &Inputs| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..3 {
            dev.synchronize()?;
            let t = Instant::now();
            unet_on_inputs(unet, io, dtype, dev)?;
            dev.synchronize()?;
            times.push(ms_since(t));
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    };
    let profiled = |io: &Inputs| -> Result<(Vec<ProfileRow>, f64)> {
        let was = crate::nn::profile::set_enabled(true);
        let t = Instant::now();
        let done = unet_on_inputs(unet, io, dtype, dev).and_then(|_| Ok(dev.synchronize()?));
        let ms = ms_since(t);
        crate::nn::profile::set_enabled(was);
        let rows = crate::nn::profile::take();
        done.map(|_| (rows, ms))
    };
    let forward_ms = median_ms(&io)?;
    let (profile, profiled_ms) = profiled(&io)?;
    let base_rows = io.get("x").map_or(Ok(0), |x| x.dim(0))?;
    let rows = 2 * cfg.batches.iter().copied().max().unwrap_or(1);
    let wide = (base_rows > 0 && rows > base_rows).then(|| {
        let timed = repeat_rows(&io, rows).and_then(|wide| {
            unet_on_inputs(unet, &wide, dtype, dev)?; // warm-up
            let ms = median_ms(&wide)?;
            Ok((ms, profiled(&wide)?))
        });
        match timed {
            Ok((forward_ms, (profile, profiled_ms))) => WideCheck {
                rows,
                forward_ms,
                profile,
                profiled_ms,
                error: None,
            },
            Err(e) => WideCheck {
                rows,
                forward_ms: f64::NAN,
                profile: Vec::new(),
                profiled_ms: f64::NAN,
                error: Some(e.to_string().lines().next().unwrap_or("").to_string()),
            },
        }
    });
    // A/B: the same calls with the fused device forms off (this thread only).
    let was = crate::nn::ops::set_device_fused(false);
    let composite =
        unet_on_inputs(unet, &io, dtype, dev).and_then(|out| Ok((out, median_ms(&io)?)));
    crate::nn::ops::set_device_fused(was);
    let (composite, composite_forward_ms) = composite?;
    let fused_vs_composite_rel_l2 = super::rel_l2(&ours, &composite)?;
    let mut outputs = vec![(format!("out_{}", dtype_name(dtype)), ours)];
    if dtype != DType::F32 {
        let ckpt = Checkpoint::open(&cfg.model)?;
        let unet32 = ckpt.load_unet(unet.config(), DType::F32, dev)?;
        outputs.push((
            "out_f32".into(),
            unet_on_inputs(&unet32, &io, DType::F32, dev)?,
        ));
    }
    let mut finite = true;
    for (_, t) in &outputs {
        finite &= is_finite(t)?;
    }
    let file = cfg.out_dir.join("unet_out.safetensors");
    let save = SaveOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    save_tensors(&file, &outputs, &save)?;
    Ok(UnetCheck {
        forward_ms,
        composite_forward_ms,
        fused_vs_composite_rel_l2,
        profile,
        profiled_ms,
        outputs: outputs.into_iter().map(|(k, _)| k).collect(),
        finite,
        wide,
    })
}

/// Write `value` as pretty JSON to `path` atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    crate::pipeline::sample::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpubench::weights::{write_inputs, write_random_checkpoint};
    use crate::gpubench::Variant;

    #[test]
    fn tiny_run_on_the_cpu_measures_everything() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        let inputs = dir.path().join("io.safetensors");
        write_random_checkpoint(&model, Variant::Tiny, 0, DType::F32).unwrap();
        write_inputs(&inputs, Variant::Tiny, 0, (8, 8)).unwrap();
        let cfg = RunConfig {
            model,
            inputs,
            fixtures: None,
            device: Device::Cpu,
            dtype: DType::F32,
            size: (64, 64),
            steps: 2,
            batches: vec![1, 2],
            train_steps: 1,
            budget_s: 1e9,
            train_budget_s: 1e9,
            out_dir: dir.path().join("out"),
        };
        let r = run(&cfg, &mut |_| {}).unwrap();
        let check = r.unet_check.as_ref().unwrap();
        assert!(check.finite);
        // The fused forms never run on the CPU: the A/B took one path.
        assert!(check.composite_forward_ms > 0.0);
        assert_eq!(check.fused_vs_composite_rel_l2, 0.0);
        assert_eq!(check.outputs, vec!["out_f32"]);
        let calls = |name: &str| {
            check
                .profile
                .iter()
                .find(|r| r.name == name)
                .map_or(0, |r| r.calls)
        };
        // The tiny UNet: one resblock per level and level-1/2 transformers.
        assert!(calls("unet resblock") > 0 && calls("op conv2d") > calls("unet resblock"));
        assert!(calls("unet self-attention") > 0);
        assert_eq!(calls("unet self-attention"), calls("unet cross-attention"));
        assert!(check.profiled_ms > 0.0);
        // Batch 2 with CFG: the inputs' two rows repeated to four.
        let wide = check.wide.as_ref().unwrap();
        assert!(wide.error.is_none(), "{wide:?}");
        assert_eq!(wide.rows, 4);
        assert!(wide.forward_ms > 0.0 && wide.profiled_ms > 0.0);
        let wide_calls = wide
            .profile
            .iter()
            .find(|r| r.name == "unet resblock")
            .map_or(0, |r| r.calls);
        assert_eq!(wide_calls, calls("unet resblock"));
        assert_eq!(r.sample.len(), 2);
        assert!(r.sample.iter().all(|s| s.seconds.is_some()));
        assert_eq!(r.train.len(), 2);
        let (head, full) = (&r.train[0], &r.train[1]);
        assert!(
            head.error.is_none() && full.error.is_none(),
            "{head:?} {full:?}"
        );
        assert!(head.loss.is_finite() && full.loss.is_finite());
        assert!(head.params > 0 && head.params < full.params);
        let unet_params: usize =
            crate::models::sdxl::checkpoint::unet_expected_keys(&Variant::Tiny.unet())
                .unwrap()
                .iter()
                .map(|(_, d)| d.iter().product::<usize>())
                .sum();
        assert_eq!(full.params, unet_params);
        assert!(cfg.out_dir.join("ours.json").is_file());
        let saved =
            candle_core::safetensors::load(cfg.out_dir.join("unet_out.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(saved["out_f32"].dims(), &[2, 4, 8, 8]);
    }
}
