//! Model implementations (candle), built on the differentiable layers of
//! [`crate::nn`] and loading checkpoints under their native key names.
//!
//! - [`sdxl`]: Stable Diffusion XL (UNet, VAE, checkpoint I/O) with LDM/sgm
//!   key names (DESIGN.md §3, reference/sdxl.md §1), text encoders, tokenizer.
//! - [`tagger`]: the WD v3 ViT tagger (timm names), its tag list and input
//!   transform.

pub mod sdxl;
pub mod tagger;
