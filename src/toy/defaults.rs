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

/// What made a dataset's images, for the defaults that follow the toy
/// world without being told (caption's tagger, bucket's set, train's
/// model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generator {
    /// No image of the dataset was planned by `generate` (imported ones
    /// only, or none).
    Nothing,
    /// Every image is a toy model's, planned by `generate`.
    Toy,
    /// Toy models generated some images, and others were imported.
    ToyAndImported,
    /// Some images are another model's, or one whose file cannot be
    /// checked: what it is, as a phrase ("m, not a toy model").
    Other(String),
}

/// [`plan_models`]' answer: `(model file name, AutoV2 hash)` pairs and
/// model paths.
type PlanModels = (Vec<(String, String)>, Vec<PathBuf>);

/// The `(model file name, AutoV2 hash)` pairs of the dataset's plan rows
/// and the model paths its `generate` runs were given (absolute; as typed,
/// read from the current folder, from earlier versions). Empty without a
/// plan.
fn plan_models(m: &crate::manifest::Manifest) -> Result<PlanModels> {
    let rows = |sql: &str| -> Result<Vec<(String, String)>> {
        let mut st = m.conn().prepare(sql).map_err(|e| m.err(e))?;
        let v = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| m.err(e))?;
        Ok(v)
    };
    let has_plan = m
        .conn()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'gen_items'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| m.err(e))?
        > 0;
    if !has_plan {
        return Ok((Vec::new(), Vec::new()));
    }
    let used = rows("SELECT DISTINCT model, model_hash FROM gen_items ORDER BY model, model_hash")?;
    let mut paths = Vec::new();
    for (cfg, _) in rows("SELECT config_json, '' FROM runs WHERE stage = 'generate' ORDER BY id")? {
        if let Some(p) = serde_json::from_str::<serde_json::Value>(&cfg)
            .ok()
            .and_then(|v| v.get("model")?.as_str().map(PathBuf::from))
        {
            paths.push(p);
        }
    }
    paths.sort();
    paths.dedup();
    Ok((used, paths))
}

/// AutoV2 hash of the file at `p`, if it is one.
fn autov2_of(p: &std::path::Path) -> Option<String> {
    if !p.is_file() {
        return None;
    }
    crate::models::sdxl::checkpoint::sha256_file(p)
        .ok()
        .map(|h| crate::models::sdxl::checkpoint::autov2(&h))
}

/// Where the file of a plan's model is now.
enum Located {
    /// At this path, with the hash the plan recorded.
    Found(PathBuf),
    /// A file of its name is where `generate` was given it, with another
    /// hash (changed since).
    Changed(PathBuf),
    /// No recorded path holds it (moved, deleted).
    Gone(Vec<PathBuf>),
}

/// Look for the model `name` with AutoV2 `hash` among `paths` (the
/// recorded ones and the toy base). Only files of that name are hashed,
/// through the hash cache that `generate` filled.
fn locate(name: &str, hash: &str, paths: &[PathBuf]) -> Located {
    let named: Vec<&PathBuf> = paths
        .iter()
        .filter(|p| p.file_stem().is_some_and(|s| s.to_string_lossy() == name))
        .collect();
    if let Some(p) = named.iter().find(|p| autov2_of(p).as_deref() == Some(hash)) {
        return Located::Found((*p).clone());
    }
    match named.iter().find(|p| p.is_file()) {
        Some(p) => Located::Changed((*p).clone()),
        None => Located::Gone(named.into_iter().cloned().collect()),
    }
}

/// The recorded paths and the toy base, for [`locate`].
fn candidate_paths(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.push(toy_dir().join("model.safetensors"));
    paths
}

/// Why `name` cannot be told to be a toy model, or what it is.
fn describe(name: &str, at: &Located) -> String {
    match at {
        Located::Found(p) => format!("{}, not a toy model", p.display()),
        Located::Changed(p) => format!(
            "{name}, whose file {} has changed since (another hash)",
            p.display()
        ),
        Located::Gone(p) if p.is_empty() => {
            format!("{name}, whose file this dataset has no record of")
        }
        Located::Gone(p) => format!(
            "{name}, whose file is no longer at {}",
            p.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
}

/// Which models made the dataset of `m`: every model of its plan must be
/// a toy model ([`is_toy_model`]) found by its recorded hash — at a path
/// a `generate` run of this dataset was given, or the toy base — and no
/// item may have been imported. The manifest keeps the file name and
/// hash, not the file: a model whose file is gone or changed cannot be
/// told to be a toy, and the answer says which.
pub fn dataset_generator(m: &crate::manifest::Manifest) -> Result<Generator> {
    let (used, paths) = plan_models(m)?;
    if used.is_empty() {
        return Ok(Generator::Nothing);
    }
    let paths = candidate_paths(paths);
    for (name, hash) in &used {
        match locate(name, hash, &paths) {
            Located::Found(p) if is_toy_model(&p) => {}
            other => return Ok(Generator::Other(describe(name, &other))),
        }
    }
    // Replanned or removed plan rows leave their items behind as
    // `generate` items: only another source is an imported image.
    let imported: i64 = m
        .conn()
        .query_row(
            "SELECT count(*) FROM items WHERE source <> 'generate'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| m.err(e))?;
    Ok(if imported > 0 {
        Generator::ToyAndImported
    } else {
        Generator::Toy
    })
}

/// The model file `generate` made the dataset of `m` with, for `train`
/// without `--model`: the one model of its plan, found by its recorded
/// hash where a `generate` run was given it (or as the toy base). `Err`
/// says where it was and whether it is gone or changed, or names the
/// models when there are several; `Ok(None)` when nothing was generated.
pub fn generating_model(m: &crate::manifest::Manifest) -> Result<Option<PathBuf>> {
    let (used, paths) = plan_models(m)?;
    let paths = candidate_paths(paths);
    match used.as_slice() {
        [] => Ok(None),
        [(name, hash)] => match locate(name, hash, &paths) {
            Located::Found(p) => Ok(Some(p)),
            other => Err(Error::config(format!(
                "{}: no --model given, and the model that generated the dataset is {} (hash {hash} recorded); pass --model FILE (the base model to convert)",
                m.root().display(),
                describe(name, &other)
            ))),
        },
        several => Err(Error::config(format!(
            "{}: no --model given, and the dataset was generated by {} models ({}); pass --model FILE (the base model to convert)",
            m.root().display(),
            several.len(),
            several
                .iter()
                .map(|(n, h)| format!("{n} {h}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
