//! The toy world (DESIGN.md §4): a small stand-in for SDXL that runs on two
//! CPU cores — procedural scenes with their true tags, the toy template
//! pack, and the `toy` model configs (`UNetConfig::toy()`,
//! `VaeConfig::toy()`, `TextConfigs::toy()`, `TaggerConfig::toy()`).
//!
//! - [`scenes`]: scenes deterministic from `(seed, index)`, their tags and
//!   captions, and [`scenes::parse_tags`] (prompt → what it asks for).
//! - [`models`]: the `toy` config family fitting together; random toy
//!   checkpoints and taggers.
//! - [`tagger`]: training the toy tagger on scenes (BCE, AdamW), saving it
//!   as a WD tagger folder, accuracy on fresh scenes.
//! - [`text`]: pretraining the toy text encoders on toy captions (tags
//!   back from the encoders' SDXL outputs), so colours bind to their nouns.
//! - [`resume`]: the VAE, text and tagger loops of `toy build` save their
//!   state and go on from it after Ctrl-C or a kill.
//! - [`write_scenes`]: PNG + `.txt` sidecars that `eps2v import` takes.

pub mod build;
mod defaults;
pub mod eval;
pub mod models;
pub mod resume;
pub mod scenes;
pub mod tagger;
pub mod tags;
pub mod text;
pub mod vae;
pub use defaults::{
    dataset_generator, default_model_path, default_tagger_dir, generating_model, is_toy_model,
    model_or_default, tagger_or_default, toy_dir, where_to_find_it, Generator, TOY_DIR_ENV,
};
mod write;

pub use scenes::{parse_tags, Scene, SceneSpec};
pub use write::{write_scenes, WriteReport, WriteScenes};

/// One optimizer step of a toy training loop (VAE, tagger, text
/// encoders): the loss must be finite (else an error naming `what`, the
/// step and the cure), then backward, learning rate `lr`, update; the loss
/// is appended to `losses` and returned.
pub(crate) fn optimizer_step(
    opt: &mut crate::nn::optim::AdamW,
    loss: &candle_core::Tensor,
    lr: f64,
    step: usize,
    what: &str,
    losses: &mut Vec<f32>,
) -> crate::Result<f32> {
    let l = loss.to_scalar::<f32>()?;
    if !l.is_finite() {
        return Err(crate::Error::Other(format!(
            "{what} training: loss is {l} at step {step}; lower the learning rate"
        )));
    }
    let grads = loss.backward()?;
    opt.set_learning_rate(lr);
    opt.step(&grads)?;
    losses.push(l);
    Ok(l)
}
