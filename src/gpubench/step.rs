//! One UNet training step, timed: forward, MSE loss, backward, the fused
//! AdamW of [`crate::nn::optim`] over the trainable parameters only.
//!
//! Two selections, as the trainer's MBW block sets
//! ([`crate::train::blocks::BlockSet`]); the weights stream from the file in
//! the bench dtype (no f32 master copy, unlike the trainer's store, so peak
//! memory is the step's own):
//! - `out+OUT08`: keys under `model.diffusion_model.out.` and
//!   `model.diffusion_model.output_blocks.8.` (diffusers: `conv_norm_out`,
//!   `conv_out`, `up_blocks.2.resnets.2`); every other weight is a plain
//!   tensor, so candle records no graph before output block 8 and the
//!   backward pass stops there, as PyTorch's does with `requires_grad=False`.
//! - `full`: every UNet key.
//!
//! Precision: weights, activations and gradients in the bench dtype (bf16
//! on CUDA), AdamW moments in f32 (the optimizer's tensor path); PyTorch's
//! `AdamW(fused=True)` on bf16 weights keeps its moments in bf16, so its
//! optimizer state is half the size — the report says so next to the
//! memory numbers. Timings are medians after one warm-up step, with a
//! device synchronisation between the phases; peak memory is the pool's
//! high-water mark from after loading to the end of the last step
//! (weights + moments + activations), or the process' peak RSS on the CPU.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{ParamsAdamW, VarBuilder};

use crate::models::sdxl::checkpoint::{unet_expected_keys, Checkpoint};
use crate::models::sdxl::{build_y, SizeCond, UNet, UNetConfig, UNET_PREFIX};
use crate::nn::device::gpu_memory;
use crate::nn::optim::AdamW;
use crate::train::blocks::BlockSet;
use crate::{Error, Result};

/// Which UNet parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// `out.*` and `output_blocks.8.*` (MBW `OUT08`).
    OutOut08,
    /// Every UNet parameter.
    Full,
}

impl Trainable {
    /// Name in reports (`out+OUT08`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Self::OutOut08 => "out+OUT08",
            Self::Full => "full",
        }
    }

    /// The trainer's block selection for it (`out,OUT08` or `all`).
    pub fn blocks(self) -> Result<BlockSet> {
        let sel = match self {
            Self::OutOut08 => "out,OUT08",
            Self::Full => "all",
        };
        BlockSet::parse(&[sel.to_string()])
    }
}

/// Serves tensors from a checkpoint; the selected keys come back as [`Var`]s
/// (collected in `vars`), every other key as a plain tensor.
struct Selective<'a> {
    ckpt: &'a Checkpoint,
    trainable: BlockSet,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for Selective<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let e = self
            .ckpt
            .entry(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        if e.shape.as_slice() != s.dims() {
            candle_core::bail!("{name}: shape {:?}, expected {:?}", e.shape, s.dims());
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .ckpt
            .tensor(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if !self.trainable.contains_key(name) {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::Msg("vars lock poisoned".into()))?
            .push((name.to_string(), var));
        Ok(out)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// Load the UNet of `ckpt` with only the `trainable` keys as [`Var`]s
/// (returned sorted by key).
pub fn load_selective(
    ckpt: &Checkpoint,
    cfg: &UNetConfig,
    trainable: Trainable,
    dtype: DType,
    device: &Device,
) -> Result<(UNet, Vec<(String, Var)>)> {
    ckpt.validate(&unet_expected_keys(cfg)?, UNET_PREFIX)
        .into_result(ckpt.path(), "UNet config")?;
    let vars = Arc::new(Mutex::new(Vec::new()));
    let backend = Selective {
        ckpt,
        trainable: trainable.blocks()?,
        vars: vars.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let unet = UNet::new(vb.pp(UNET_PREFIX), cfg)?;
    drop(vb);
    let mut vars = std::mem::take(
        &mut *vars
            .lock()
            .map_err(|_| Error::Other("vars lock poisoned".into()))?,
    );
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((unet, vars))
}

/// Timings and memory of one selection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// `out+OUT08` or `full`.
    pub trainable: String,
    /// Trainable parameter count.
    pub params: usize,
    /// Median forward time (ms).
    pub forward_ms: f64,
    /// Median backward time (ms).
    pub backward_ms: f64,
    /// Median optimizer time (ms).
    pub optimizer_ms: f64,
    /// Median whole step (ms).
    pub step_ms: f64,
    /// Timed steps after the warm-up (0: the budget allowed only the
    /// warm-up, whose times are reported instead).
    pub steps: usize,
    /// Peak GPU memory in use (MiB; pool high-water mark), CUDA only.
    pub peak_mem_mb: Option<f64>,
    /// Peak resident memory of the process (MiB), CPU runs.
    pub peak_rss_mb: Option<f64>,
    /// Loss of the last step (finite = the step ran in range).
    pub loss: f64,
    /// Why the step could not run (out of memory, …); the numbers are NaN then.
    pub error: Option<String>,
    /// Device memory left in use after the warm-up step's forward, its
    /// backward and its optimizer step (MiB, CUDA), as far as it got.
    pub memory_after_mb: Vec<(String, f64)>,
    /// Whether the step recomputed the blocks in the backward (gradient
    /// checkpointing; the whole UNet's step does).
    pub recomputed: bool,
    /// The warm-up forward's memory by module and op ([`crate::nn::profile`]
    /// with memory on: what each scope left in use, i.e. what the graph
    /// keeps for the backward), as far as it got.
    pub memory: Vec<crate::nn::profile::ProfileRow>,
}

impl StepReport {
    /// The row of a selection whose step failed with `error`.
    pub fn failed(trainable: Trainable, error: &str) -> Self {
        Self {
            trainable: trainable.name().to_string(),
            params: 0,
            forward_ms: f64::NAN,
            backward_ms: f64::NAN,
            optimizer_ms: f64::NAN,
            step_ms: f64::NAN,
            steps: 0,
            peak_mem_mb: None,
            peak_rss_mb: None,
            loss: f64::NAN,
            // The message without the backtrace candle appends.
            error: Some(error.lines().next().unwrap_or("").trim().to_string()),
            memory_after_mb: Vec::new(),
            memory: Vec::new(),
            recomputed: trainable == Trainable::Full,
        }
    }
}

/// What the warm-up step measured before it failed: the memory marks and
/// the profile rows collected so far (profiling is turned off here).
pub fn partial_memory(report: &mut StepReport) {
    crate::nn::profile::set_enabled(false);
    crate::nn::profile::set_memory(false);
    report.memory = crate::nn::profile::take();
    report.memory_after_mb = MARKS.with_borrow_mut(std::mem::take);
}

thread_local! {
    /// The warm-up step's memory marks so far (see [`StepReport::memory_after_mb`]).
    static MARKS: std::cell::RefCell<Vec<(String, f64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Record (and log) the device memory in use after `stage` of the warm-up step.
fn mark(device: &Device, stage: &str) -> Result<()> {
    if let Some(b) = gpu_memory::used_bytes(device)? {
        let mb = b as f64 / (1u64 << 20) as f64;
        eprintln!("[memory] {stage}: {mb:.0} MiB in use");
        MARKS.with_borrow_mut(|m| m.push((stage.to_string(), mb)));
    }
    Ok(())
}

/// A fixed training batch: noisy latents, per-sample timesteps, text context,
/// `y`, and the regression target.
pub struct Batch {
    /// `(b, 4, h, w)` in the model dtype.
    pub x: Tensor,
    /// `(b,)`.
    pub timesteps: Tensor,
    /// `(b, 77, ctx)`.
    pub context: Tensor,
    /// `(b, adm)`.
    pub y: Tensor,
    /// `(b, 4, h, w)` f32.
    pub target: Tensor,
}

impl Batch {
    /// A seeded batch of `b` latents of `h × w` for `cfg` on `device`
    /// (values as the PyTorch side draws its own: N(0, 1); the timing does
    /// not depend on them).
    pub fn random(
        cfg: &UNetConfig,
        b: usize,
        latent: (usize, usize),
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        use crate::diffusion::noise::{image_rng, normals};
        let mut rng = image_rng(seed, 7);
        let (h, w) = latent;
        let mut normal = |dims: &[usize]| -> Result<Tensor> {
            let n = dims.iter().product();
            Ok(Tensor::from_vec(normals(&mut rng, n), dims, &Device::Cpu)?.to_device(device)?)
        };
        let x = normal(&[b, cfg.in_channels, h, w])?.to_dtype(dtype)?;
        let target = normal(&[b, cfg.out_channels, h, w])?;
        let context = normal(&[b, 77, cfg.context_dim])?.to_dtype(dtype)?;
        let pooled = normal(&[b, cfg.pooled_dim])?.to_dtype(dtype)?;
        let sizes = vec![SizeCond::inference((8 * h) as f32, (8 * w) as f32); b];
        let y = build_y(&pooled, &sizes)?;
        let ts: Vec<f32> = (0..b).map(|i| (999 * (i + 1) / (b + 1)) as f32).collect();
        let timesteps = Tensor::from_vec(ts, b, device)?;
        Ok(Self {
            x,
            timesteps,
            context,
            y,
            target,
        })
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Peak resident set size of this process in MiB (Linux `ru_maxrss`).
pub fn peak_rss_mb() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            return Some(ru.ru_maxrss as f64 / 1024.0);
        }
    }
    None
}

/// Load the UNet with `trainable` selected and time up to `steps` training
/// steps (after one warm-up) on `batch`; no further step starts once
/// `budget_s` seconds have passed since the warm-up began. When not even one
/// timed step fits, the warm-up step's times are reported (`steps` = 0).
#[allow(clippy::too_many_arguments)]
pub fn time_steps(
    ckpt: &Checkpoint,
    cfg: &UNetConfig,
    trainable: Trainable,
    dtype: DType,
    device: &Device,
    batch: &Batch,
    steps: usize,
    budget_s: f64,
) -> Result<StepReport> {
    let (unet, vars) = load_selective(ckpt, cfg, trainable, dtype, device)?;
    let params = vars.iter().map(|(_, v)| v.elem_count()).sum();
    // The whole UNet's step keeps activations only at block boundaries
    // (`UNet::loss_and_grads_recomputed`): with every activation kept it
    // did not fit in 139 GiB (runs 2–6).
    let recomputed = trainable == Trainable::Full;
    let var_list: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let loss_of = |out: &Tensor| -> candle_core::Result<Tensor> {
        (out.to_dtype(DType::F32)? - &batch.target)?
            .sqr()?
            .mean_all()
    };
    let mut opt = AdamW::new(
        vars.into_iter().map(|(_, v)| v).collect(),
        ParamsAdamW {
            lr: 1e-5,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    gpu_memory::reset_peak(device)?;
    let (mut fw, mut bw, mut op, mut st) = (vec![], vec![], vec![], vec![]);
    let mut loss_value = f64::NAN;
    let start = Instant::now();
    let mut warmup = [0.0; 4];
    for i in 0..=steps {
        if i > 0 && start.elapsed().as_secs_f64() > budget_s {
            break;
        }
        device.synchronize()?;
        // The warm-up step's forward is profiled with memory (it is not
        // timed), and each stage's memory in use is marked.
        let warm = i == 0;
        if warm {
            MARKS.with_borrow_mut(Vec::clear);
            mark(device, "weights and optimizer")?;
            crate::nn::profile::set_enabled(true);
            crate::nn::profile::set_memory(true);
        }
        let t0 = Instant::now();
        let (loss, grads, t1) = if recomputed {
            let (loss, grads) = unet.loss_and_grads_recomputed(
                &batch.x,
                &batch.timesteps,
                &batch.context,
                &batch.y,
                &var_list,
                &loss_of,
            )?;
            (loss, grads, None)
        } else {
            let out = unet.forward(&batch.x, &batch.timesteps, &batch.context, &batch.y)?;
            let loss = loss_of(&out)?;
            drop(out);
            device.synchronize()?;
            let t1 = Instant::now();
            if warm {
                crate::nn::profile::set_enabled(false);
                crate::nn::profile::set_memory(false);
                mark(device, "forward")?;
            }
            let grads = loss.backward()?;
            (loss, grads, Some(t1))
        };
        device.synchronize()?;
        let t2 = Instant::now();
        if warm {
            crate::nn::profile::set_enabled(false);
            crate::nn::profile::set_memory(false);
            mark(device, "backward")?;
        }
        // With recomputation forward and backward interleave: the forward
        // time is not separable (NaN), the backward's is the whole.
        let t1 = t1.unwrap_or(t0);
        opt.step(&grads)?;
        drop(grads);
        device.synchronize()?;
        let t3 = Instant::now();
        if warm {
            mark(device, "optimizer step")?;
        }
        loss_value = loss.to_scalar::<f32>()? as f64;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let forward_ms = if recomputed { f64::NAN } else { ms(t0, t1) };
        let times = [forward_ms, ms(t1, t2), ms(t2, t3), ms(t0, t3)];
        if i == 0 {
            warmup = times;
        } else {
            fw.push(times[0]);
            bw.push(times[1]);
            op.push(times[2]);
            st.push(times[3]);
        }
    }
    let timed = st.len();
    if timed == 0 {
        (fw, bw, op, st) = (
            vec![warmup[0]],
            vec![warmup[1]],
            vec![warmup[2]],
            vec![warmup[3]],
        );
    }
    let peak = gpu_memory::peak_bytes(device)?.map(|b| b as f64 / (1u64 << 20) as f64);
    Ok(StepReport {
        trainable: trainable.name().to_string(),
        params,
        forward_ms: median(&mut fw),
        backward_ms: median(&mut bw),
        optimizer_ms: median(&mut op),
        step_ms: median(&mut st),
        steps: timed,
        peak_rss_mb: if device.is_cpu() { peak_rss_mb() } else { None },
        peak_mem_mb: peak,
        loss: loss_value,
        error: None,
        memory_after_mb: MARKS.with_borrow_mut(std::mem::take),
        memory: crate::nn::profile::take(),
        recomputed,
    })
}
