//! Where `eps2v run` looks for its default models: the toy folder of
//! [`crate::toy::toy_dir`] (`$EPS2V_TOY_DIR`, else
//! `fixtures/toy` of this source tree). Unlike the `toy` helpers these
//! return the path even when it is missing: the run config's file check
//! then names the key (`model`, `caption.tagger`) and the path.

use std::path::PathBuf;

/// The committed toy eps base model, `<toy dir>/model.safetensors`.
pub fn default_model_path() -> PathBuf {
    crate::toy::toy_dir().join("model.safetensors")
}

/// The committed toy WD tagger folder, `<toy dir>/tagger`.
pub fn default_tagger_dir() -> PathBuf {
    crate::toy::toy_dir().join("tagger")
}
