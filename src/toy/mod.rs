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
//! - [`write_scenes`]: PNG + `.txt` sidecars that `eps2v import` takes.

pub mod build;
mod defaults;
pub mod eval;
pub mod models;
pub mod scenes;
pub mod tagger;
pub mod text;
pub mod vae;
pub use defaults::{
    default_model_path, default_tagger_dir, model_or_default, tagger_or_default, toy_dir,
    TOY_DIR_ENV,
};
mod write;

pub use scenes::{parse_tags, Scene, SceneSpec};
pub use write::{write_scenes, WriteReport, WriteScenes};
