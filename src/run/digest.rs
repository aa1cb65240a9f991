//! The stage digests of a `run` (module docs of [`super`]): each stage's
//! settings, with every input file by its content, chained to those of the
//! stages before it, and the key of the whole config.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::config::{RunConfig, STAGES};
use crate::Result;

/// A file as the digests see it: its name and SHA-256, so that a moved
/// file keeps its results and one replaced under the same path does not.
fn file_identity(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sha256": crate::models::sdxl::checkpoint::sha256_file(path)?,
    }))
}

/// A tagger folder by the content of its files.
pub(super) fn tagger_identity(dir: &Path) -> Result<serde_json::Value> {
    let f = crate::models::tagger::TaggerFiles::locate(dir)?;
    Ok(serde_json::json!({
        "model": file_identity(&f.model)?,
        "tags": file_identity(&f.tags)?,
        "config": f.config.as_deref().map(file_identity).transpose()?,
    }))
}

/// The resolved config with every input file replaced by its content
/// ([`file_identity`]) and the template by its digest: what the stage
/// digests and the pipeline row's key are made of. The dataset folder is
/// left out: the manifest that holds the rows is in it, and the results
/// keep their paths relative to it ([`Progress::stored`]), so a moved
/// dataset keeps them.
fn content_view(cfg: &RunConfig) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(cfg)?;
    v["dataset"] = serde_json::Value::Null;
    v["model"] = file_identity(&cfg.model_path())?;
    if !cfg.train.model.as_os_str().is_empty() {
        v["train"]["model"] = file_identity(&cfg.train.model)?;
    }
    if let Some(t) = &cfg.caption.tagger {
        v["caption"]["tagger"] = tagger_identity(t)?;
    }
    // Also when `generate` is not listed, so that listing it or not does
    // not change the digests after it; a template that does not load only
    // matters when it is.
    let template = cfg
        .generate_config()
        .and_then(|g| crate::prompts::load(&g.template, g.wildcards.as_deref()));
    v["generate"]["template_digest"] = match template {
        Ok(t) => t.digest().into(),
        Err(e) if cfg.has("generate") => return Err(e),
        Err(_) => serde_json::Value::Null,
    };
    Ok(v)
}

/// The settings each stage's digest covers (besides those before it).
/// `device.precision` is generate's, so a change of it reruns everything
/// (the device itself is not: results carry over to another machine); the
/// merge sweep scores retention on `[evaluate]`'s prompts and sampling, so
/// those are merge's too (the tagger threshold only matters to adherence).
fn stage_settings(view: &serde_json::Value, stage: &str) -> serde_json::Value {
    match stage {
        "generate" => serde_json::json!({
            "model": view["model"],
            "generate": view["generate"],
            "precision": view["device"]["precision"],
        }),
        "merge" => {
            let mut sweep = view["evaluate"].clone();
            if let Some(o) = sweep.as_object_mut() {
                o.remove("threshold");
            }
            serde_json::json!({"merge": view["merge"], "evaluate": sweep})
        }
        "caption" | "filter" | "dedupe" | "bucket" | "train" | "evaluate" => view[stage].clone(),
        _ => serde_json::Value::Null,
    }
}

/// Each stage's digest: its settings chained to those before it.
fn chain(view: &serde_json::Value) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut prev = String::new();
    for s in STAGES {
        let mut h = Sha256::new();
        h.update(prev.as_bytes());
        h.update(s.as_bytes());
        h.update(serde_json::to_string(&stage_settings(view, s))?.as_bytes());
        prev = hex::encode(h.finalize());
        out.insert(s.to_string(), prev.clone());
    }
    Ok(out)
}

/// Chained digests of every stage (module docs), and the key of the whole
/// config (the pipeline row is reused when it is unchanged).
pub fn digests(cfg: &RunConfig) -> Result<(BTreeMap<String, String>, String)> {
    let view = content_view(cfg)?;
    let key = hex::encode(Sha256::digest(serde_json::to_string(&view)?.as_bytes()));
    Ok((chain(&view)?, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which stages a change reruns: those from the first stage whose
    /// settings hold it. Regressions: `[evaluate]`'s sampling left the
    /// merge sweep's retention scores as they were, and a change of
    /// precision reran nothing.
    #[test]
    fn a_change_reruns_the_stages_that_read_it_and_those_after() {
        let view = |f: &dyn Fn(&mut RunConfig)| {
            let mut c = RunConfig::default();
            f(&mut c);
            let mut v = serde_json::to_value(&c).unwrap();
            v["model"] = "m".into();
            chain(&v).unwrap()
        };
        let base = view(&|_| {});
        let first_changed = |f: &dyn Fn(&mut RunConfig)| {
            let d = view(f);
            let same: Vec<bool> = STAGES.iter().map(|s| d[*s] == base[*s]).collect();
            let i = same.iter().position(|x| !x);
            // Once one differs, every later one does.
            assert!(i.is_none_or(|i| same[i..].iter().all(|x| !x)), "{same:?}");
            i.map(|i| STAGES[i])
        };
        assert_eq!(first_changed(&|_| {}), None);
        assert_eq!(
            first_changed(&|c| c.device.precision = Some("bf16".into())),
            Some("generate")
        );
        assert_eq!(
            first_changed(&|c| c.device.device = Some("cpu".into())),
            None
        );
        assert_eq!(first_changed(&|c| c.evaluate.steps = 7), Some("merge"));
        assert_eq!(
            first_changed(&|c| c.evaluate.threshold = 0.5),
            Some("evaluate")
        );
        assert_eq!(
            first_changed(&|c| c.merge.alphas = vec![0.3]),
            Some("merge")
        );
        assert_eq!(first_changed(&|c| c.dedupe = Default::default()), None);
        assert_eq!(first_changed(&|c| c.generate.seed = 9), Some("generate"));
    }
}
