//! The glue that turns a single-file SDXL checkpoint into images, and the
//! model diagnostics built on it (`eps2v sample`, `eps2v diagnose uncond`).
//!
//! - [`model`]: load UNet + CLIP-L + bigG + VAE through
//!   [`crate::models::sdxl::checkpoint`] (every config inferred from the
//!   file's keys and shapes, as `ckpt info` shows; prediction type and ZTSNR from marker keys /
//!   modelspec, overridable), encode prompts (A1111 chunking and emphasis),
//!   build the unconditional branch (`zero` / `empty` / negative text), and
//!   bind the UNet to it as the raw ε/v predictor ([`model::Bound`]).
//! - [`sample`]: the sampling loop from [`crate::diffusion`] (σ schedule, CFG
//!   with rescale, sampler) over a batch of images with their own prompts and
//!   seeds in one UNet call per step (`sample_batch`, batch-invariant on the
//!   CPU), per-image seeded CPU noise (the seed of image k is seed + k,
//!   A1111's convention), f32 VAE decode, PNGs with A1111 `parameters`
//!   infotext, atomic writes.
//! - [`latent`]: one image from a given starting latent, σ list and
//!   schedule (the entry point of the end-to-end golden against diffusers'
//!   `StableDiffusionXLPipeline`), with UNet call counts.
//! - [`diagnose`]: how differently the model treats `""` and zeroed
//!   conditioning.
//! - [`tiny`]: seeded random checkpoints (tiny, or any configs) for tests,
//!   with our config metadata.
//!
//! There is no built-in toy model yet, so every entry point takes a
//! checkpoint path.

pub mod diagnose;
pub mod latent;
pub mod model;
pub mod sample;
pub mod size;
pub mod tiny;

pub use model::{LoadOptions, ModelInfo, SdxlModel, TextConfigs};
pub use sample::{
    generate, sample_batch, sample_many, BatchItem, BrokenRender, Rendered, SampleConfig,
    SampleReport,
};
