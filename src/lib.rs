//! eps2v: turn an eps-prediction SDXL checkpoint into a v-prediction
//! (zero-terminal-SNR) one — and back — by finetuning it on an *aligned*
//! synthetic dataset made from the base model itself.
//!
//! The pipeline, stage by stage, over one dataset folder whose source of
//! truth is a SQLite manifest (`manifest.sqlite`):
//!
//! 1. `import` existing images (A1111/kohya folders) or `generate` them from
//!    tag prompts with the base model;
//! 2. `caption` what is really in each image (tagger + caption policy);
//! 3. `dedupe` exact and near duplicates (perceptual hashes, multi-index);
//! 4. `bucket` by aspect ratio (SDXL bucket list), recording real crop
//!    offsets for micro-conditioning;
//! 5. `export` to kohya / HF imagefolder / Parquet / JSONL, or
//! 6. `train` with the v (or eps) objective, then `merge` with the base.
//!
//! Module map (dependency rule: `cli → stages/train/merge →
//! models/diffusion/manifest/imaging → error`):
//! - [`cli`]: clap front end (the only module that knows about flags).
//! - [`manifest`]: the SQLite manifest (schema, migrations, records).
//! - [`stages`]: curation stages (import, caption + filter, dedupe, bucket,
//!   export, inspect).
//! - [`diffusion`]: noise schedules (ZTSNR), eps/v parameterisations,
//!   σ schedules, samplers, CFG (rescale, uncond modes), seeded noise.
//! - [`error`]: the library error type.
//! - [`nn`]: differentiable layers and the ops behind them (fast CPU kernels
//!   plug in there).
//! - [`imaging`]: decode with limits, pHash/dHash, A1111 infotext, resize/crop, buckets.
//! - [`models`]: SDXL UNet / VAE / text encoders / tokenizer / checkpoint I/O
//!   under native LDM key names; the WD v3 ViT tagger under timm names.
//! - [`pipeline`]: checkpoint → images (`sample`) and model diagnostics (`diagnose uncond`).
//! - [`train`]: `eps2v train` (eps → v-pred ZTSNR and back, block subsets,
//!   evaluation by images, NaN guard, resume, export).
//! - [`merge`]: `eps2v merge` (weighted sum, add-difference, block weights, sweeps).
//! - [`report`]: charts (training curves) for run folders and reports.
//! - [`prompts`]: dynamicprompts-compatible prompt templates, wildcards and
//!   the built-in "1girl" pack (`prompts`, `generate`).
//! - [`gpubench`]: the Rust half of the device benchmark (benches/gpu/run.sh,
//!   hidden command `gpu-bench`): ours vs diffusers / PyTorch on one GPU.
//! - [`toy`]: the toy world — procedural scenes with true tags, toy configs.

pub mod atomic;
pub mod cli;
pub mod diffusion;
pub mod error;
pub mod gpubench;
pub mod imaging;
pub mod manifest;
pub mod merge;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod prompts;
pub mod report;
pub mod run;
pub mod signal;
pub mod stages;
pub mod toy;
pub mod train;

pub use error::{Error, Result};
