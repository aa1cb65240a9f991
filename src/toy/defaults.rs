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
    /// Some images are this model's (its file name as `generate`
    /// recorded it).
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

/// Which models made the dataset of `m`: each `gen_items` model hash must
/// be the AutoV2 hash of a toy model — the default one, or a model file a
/// `generate` run of this dataset was given that [`is_toy_model`]
/// confirms — and every item must come from the plan. The manifest keeps
/// the file name and hash, not the file: a model file that is gone reads
/// as not a toy.
pub fn dataset_generator(m: &crate::manifest::Manifest) -> Result<Generator> {
    let (used, mut paths) = plan_models(m)?;
    if used.is_empty() {
        return Ok(Generator::Nothing);
    }
    paths.push(toy_dir().join("model.safetensors"));
    let toy_hashes: std::collections::BTreeSet<String> = paths
        .iter()
        .filter(|p| p.is_file() && is_toy_model(p))
        .filter_map(|p| autov2_of(p))
        .collect();
    if let Some((model, _)) = used.into_iter().find(|(_, h)| !toy_hashes.contains(h)) {
        return Ok(Generator::Other(model));
    }
    let imported: i64 = m
        .conn()
        .query_row(
            "SELECT count(*) FROM items i
             WHERE NOT EXISTS (SELECT 1 FROM gen_items g WHERE g.item_id = i.id)",
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
/// without `--model`: the one model of its plan, found where a `generate`
/// run was given it and with the hash the plan recorded. `Err` names the
/// model when the plan has one whose file is not there any more, or
/// several; `Ok(None)` when nothing was generated.
pub fn generating_model(m: &crate::manifest::Manifest) -> Result<Option<PathBuf>> {
    let (used, paths) = plan_models(m)?;
    match used.as_slice() {
        [] => Ok(None),
        [(name, hash)] => paths
            .into_iter()
            .find(|p| autov2_of(p).as_deref() == Some(hash.as_str()))
            .map(Some)
            .ok_or_else(|| {
                Error::config(format!(
                    "{}: no --model given, and the model that generated the dataset ({name}, hash {hash}) is not where `generate` was given it; pass --model FILE (the base model to convert)",
                    m.root().display()
                ))
            }),
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
