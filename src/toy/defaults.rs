//! Where the committed toy models live, so that every command taking a
//! model or a tagger works on a fresh clone with none given (issue 10).
//!
//! The folder is `$EPS2V_TOY_DIR` when set, else `fixtures/toy` of this
//! source tree (`CARGO_MANIFEST_DIR`, fixed at build time), holding
//! `model.safetensors` (the eps toy base model) and `tagger/` (the toy WD
//! tagger), both written by `eps2v toy build`.

use std::path::PathBuf;

use crate::{Error, Result};

/// Environment variable overriding the toy folder.
pub const TOY_DIR_ENV: &str = "EPS2V_TOY_DIR";

/// The toy folder (module docs); it may not exist.
pub fn toy_dir() -> PathBuf {
    match std::env::var_os(TOY_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/toy")),
    }
}

/// What to do when the toy world is not where it is looked for: the
/// folder is fixed when eps2v is built, so an installed or copied binary
/// needs the variable.
pub fn where_to_find_it() -> String {
    format!(
        "set {TOY_DIR_ENV} to a folder holding it (a clone's fixtures/toy; this eps2v looks in {} otherwise), or build one with `eps2v toy build --out DIR` (30 to 45 min)",
        toy_dir().display()
    )
}

/// The committed toy base model, or a config error naming the path and
/// what to do.
pub fn default_model_path() -> Result<PathBuf> {
    let p = toy_dir().join("model.safetensors");
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::config(format!(
            "no model given and the default toy model {} is missing; pass --model FILE, or {}",
            p.display(),
            where_to_find_it()
        )))
    }
}

/// The committed toy tagger folder, or a config error naming the path and
/// what to do.
pub fn default_tagger_dir() -> Result<PathBuf> {
    let p = toy_dir().join("tagger");
    if p.join("model.safetensors").is_file() {
        Ok(p)
    } else {
        Err(Error::config(format!(
            "no tagger given and the default toy tagger {} is missing; pass --tagger DIR, or {}",
            p.display(),
            where_to_find_it()
        )))
    }
}

/// `given`, or the default toy model.
pub fn model_or_default(given: Option<PathBuf>) -> Result<PathBuf> {
    given.map_or_else(default_model_path, Ok)
}

/// Is `path` a toy-world model, by its UNet's named config (the committed
/// base, and whatever `train` and `merge` made from it, under any name)?
/// Reads the header only; an unreadable file is "no" (loading it reports
/// why).
pub fn is_toy_model(path: &std::path::Path) -> bool {
    crate::models::sdxl::checkpoint::Checkpoint::open(path)
        .and_then(|c| c.infer_unet_config())
        .is_ok_and(|u| u.name == Some("toy"))
}

/// `given`, or the default toy tagger.
pub fn tagger_or_default(given: Option<PathBuf>) -> Result<PathBuf> {
    given.map_or_else(default_tagger_dir, Ok)
}
