//! Advice before a run: what a user may have got wrong that is not an
//! error (the run would go on, and could be what they meant).

use crate::manifest::Manifest;
use crate::train::config::TrainConfig;
use crate::Result;

/// A base that rendered the dataset in the objective's prediction:
/// training it on its own images converts nothing (a v model given as the
/// eps base, or `--objective` forgotten for v → eps). The prediction is the
/// one the generate plan recorded (`generate --prediction` may have
/// overridden the file's markers), else the file's markers. Another base
/// (a stage-1 export trained on the base's images) is a continuation.
pub fn same_prediction_warning(cfg: &TrainConfig, m: &Manifest) -> Result<Option<String>> {
    // Not found or several models: nothing to compare (and no reason to
    // stop a run that names its --model).
    let Ok(Some(generator)) = crate::toy::generating_model(m) else {
        return Ok(None);
    };
    if !crate::atomic::same_file(&generator, &cfg.model) {
        return Ok(None);
    }
    let (rendered, source) = match crate::stages::generate::plan::stored_plan(m.conn())
        .ok()
        .flatten()
    {
        Some(p) => match p.settings.prediction.as_str() {
            "v" => (
                crate::diffusion::Prediction::V,
                "the generate plan's prediction".to_string(),
            ),
            "eps" => (
                crate::diffusion::Prediction::Eps,
                "the generate plan's prediction".to_string(),
            ),
            _ => return Ok(None),
        },
        None => {
            let p = crate::models::sdxl::checkpoint::Checkpoint::open(&cfg.model)?.prediction();
            match crate::pipeline::model::discrete_prediction(p.prediction) {
                Some(d) => (d, format!("its markers: {}", p.source)),
                None => return Ok(None),
            }
        }
    };
    if rendered != cfg.objective {
        return Ok(None);
    }
    let (now, other) = match cfg.objective {
        crate::diffusion::Prediction::V => ("v", "eps"),
        crate::diffusion::Prediction::Eps => ("eps", "v"),
    };
    Ok(Some(format!(
        "{} rendered this dataset as {now} ({source}): training {now} on its own images converts nothing; use --objective {other} for {now} → {other}, or give the {other} model to convert",
        cfg.model.display(),
    )))
}
