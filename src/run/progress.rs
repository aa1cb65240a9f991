//! The pipeline's progress record (`runs.counts_json` of its row): per
//! finished stage, its digest and results. Paths inside the dataset folder
//! are kept relative to it and others absolute, so that a dataset folder
//! moved (or reached by another path) keeps every result: the digests do
//! not cover the dataset's path either (the manifest is in it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Adherence;
use crate::manifest::Manifest;
use crate::merge::SweepReport;
use crate::Result;

/// A model's adherence, labelled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelScore {
    /// What the row is (`base as eps`, `base as v + ZTSNR (untrained)`, …).
    pub label: String,
    /// The checkpoint.
    pub model: PathBuf,
    /// Sampled as.
    pub prediction: String,
    /// On the ZTSNR schedule.
    pub ztsnr: bool,
    /// The tagger's verdict.
    pub adherence: Adherence,
    /// Shape retention against the base model's eps samples, when known.
    pub retention: Option<f64>,
    /// The evaluation grid, relative to the report folder.
    pub grid: String,
}

/// The results of a stage kept in the progress record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageRecord {
    /// Digest of the settings up to and including this stage.
    pub digest: String,
    /// Seconds it took.
    pub seconds: f64,
    /// One line of what it did.
    pub summary: String,
    /// Failed / rejected items.
    pub failed: u64,
    /// `train`: the training run id.
    pub train_run: Option<i64>,
    /// `train`: the exported converted model.
    pub converted: Option<PathBuf>,
    /// `train`: retention at each evaluation `(step, score)`.
    pub retention: Vec<(usize, f64)>,
    /// `train`: retention of the exported weights (with `stop_below`, the
    /// last good step's, not the last evaluation's). `None` in rows from
    /// before it was kept: the last evaluation's.
    #[serde(default)]
    pub exported_retention: Option<f64>,
    /// `merge`: the sweep.
    pub sweep: Option<SweepReport>,
    /// `evaluate`: the scores.
    pub scores: Vec<ModelScore>,
    /// `report`: the page (rows from before it was kept: the summary).
    #[serde(default)]
    pub page: Option<PathBuf>,
    /// The newest run of the manifest when the stage ended (its own
    /// included): a dataset-writing run after it that is not the
    /// pipeline's own changed the dataset behind the pipeline's back
    /// ([`super::changed_outside`]). `None` in rows from before it was kept.
    #[serde(default)]
    pub last_run: Option<i64>,
}

/// The pipeline's progress (`runs.counts_json` of its row).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Key of the config the row runs ([`digests`]): its input files by
    /// content. Empty in rows written before it was kept.
    #[serde(default)]
    pub key: String,
    /// Finished stages.
    pub stages: BTreeMap<String, StageRecord>,
    /// The row ended because a signal stopped it (Ctrl-C / SIGTERM); the
    /// next `run` with the same config goes on from `stages`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

impl Progress {
    /// Apply `f` to every path the record holds.
    fn map_paths(&mut self, f: &dyn Fn(&Path) -> PathBuf) {
        for r in self.stages.values_mut() {
            for p in r.converted.iter_mut().chain(r.page.iter_mut()) {
                *p = f(p);
            }
            if let Some(s) = &mut r.sweep {
                s.reference = f(&s.reference);
                for pt in &mut s.points {
                    pt.out = f(&pt.out);
                    pt.grid = f(&pt.grid);
                }
            }
            for s in &mut r.scores {
                s.model = f(&s.model);
            }
        }
    }

    /// The record as kept in the manifest of the dataset at `root`.
    pub fn stored(&self, root: &Path) -> Progress {
        let mut p = self.clone();
        p.map_paths(&|x| stored_path(root, x));
        p
    }

    /// A record read from the manifest, its paths under `root` again.
    pub fn resolved(mut self, root: &Path) -> Progress {
        self.map_paths(&|x| {
            if x.is_absolute() {
                x.to_path_buf()
            } else {
                root.join(x)
            }
        });
        self
    }
}

/// `path` relative to `root` when inside it, else absolute (a relative
/// path outside it would otherwise be read back under `root`).
pub fn stored_path(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Keep `p` as the progress of pipeline row `id`.
pub(super) fn save_progress(m: &Manifest, id: i64, p: &Progress) -> Result<()> {
    m.conn()
        .execute(
            "UPDATE runs SET counts_json = ?1 WHERE id = ?2",
            rusqlite::params![serde_json::to_string(&p.stored(m.root()))?, id],
        )
        .map_err(|e| m.err(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_dataset_are_kept_relative_and_found_again_after_a_move() {
        let rec = StageRecord {
            converted: Some("/data/ds/runs/3/converted.safetensors".into()),
            page: Some("/data/ds/runs/3/report/index.html".into()),
            ..Default::default()
        };
        let outside = StageRecord {
            converted: Some("/models/out.safetensors".into()),
            // Relative to the working folder, outside the dataset: made
            // absolute, never read back under the dataset.
            page: Some("elsewhere/index.html".into()),
            ..Default::default()
        };
        let p = Progress {
            key: "k".into(),
            stages: [("train".to_string(), rec), ("merge".to_string(), outside)].into(),
            ..Default::default()
        };
        let kept = p.stored(Path::new("/data/ds"));
        let train = &kept.stages["train"];
        assert_eq!(
            train.converted.as_deref(),
            Some(Path::new("runs/3/converted.safetensors"))
        );
        assert_eq!(
            train.page.as_deref(),
            Some(Path::new("runs/3/report/index.html"))
        );
        let merge = &kept.stages["merge"];
        assert_eq!(
            merge.converted.as_deref(),
            Some(Path::new("/models/out.safetensors"))
        );
        let page = merge.page.clone().unwrap();
        assert!(page.is_absolute() && page.ends_with("elsewhere/index.html"));

        let json = serde_json::to_string(&kept).unwrap();
        let back = serde_json::from_str::<Progress>(&json)
            .unwrap()
            .resolved(Path::new("/mnt/moved"));
        assert_eq!(
            back.stages["train"].converted.as_deref(),
            Some(Path::new("/mnt/moved/runs/3/converted.safetensors"))
        );
        assert_eq!(back.stages["merge"].page, Some(page));
        // A relative dataset folder round-trips the same way.
        let rel = p.stored(Path::new("/data/ds")).resolved(Path::new("ds"));
        assert_eq!(
            rel.stages["train"].page.as_deref(),
            Some(Path::new("ds/runs/3/report/index.html"))
        );
        // Rows written before `page` existed still read.
        let old: StageRecord =
            serde_json::from_str(r#"{"digest":"d","seconds":1.0,"summary":"s","failed":0,"train_run":null,"converted":null,"retention":[],"sweep":null,"scores":[]}"#)
                .unwrap();
        assert_eq!(old.page, None);
    }
}
