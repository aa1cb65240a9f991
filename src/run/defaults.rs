//! Where the committed toy models live: the one place `eps2v run` looks
//! for its defaults. The toy world's own module will provide the same two
//! paths (`toy::default_model_path` / `toy::default_tagger_dir`); when it
//! does, these two functions become calls to it.

use std::path::PathBuf;

/// The committed toy eps base model, `fixtures/toy/model.safetensors` in
/// the source tree this binary was built from.
pub fn default_model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/model.safetensors")
}

/// The committed toy WD tagger folder, `fixtures/toy/tagger/`.
pub fn default_tagger_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/tagger")
}
