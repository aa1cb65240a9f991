//! Which UNet parameters train: block selectors by MBW id.
//!
//! Selectors (case-insensitive): `all`; `INnn`, `M00`, `OUTnn` (the MBW ids
//! of [`crate::models::sdxl::blocks`], `input_blocks.N` / `middle_block` /
//! `output_blocks.N`); ranges `IN00-IN08`, `OUT00-OUT08`; and the three parts
//! outside the blocks: `out` (the final GroupNorm + conv, `out.*`),
//! `time_embed`, `label_emb`. Unlike merging, where supermerger folds
//! `out.*` into OUT08, training names `out` on its own: the conversion's
//! first stage is typically `out` + `OUT08` (reference/trainers-landscape.md).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::models::sdxl::UNET_PREFIX;
use crate::{Error, Result};

/// A trainable unit of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrainBlock {
    /// `time_embed.*`.
    TimeEmbed,
    /// `label_emb.*`.
    LabelEmb,
    /// `input_blocks.N.*`.
    In(u8),
    /// `middle_block.*`.
    Mid,
    /// `output_blocks.N.*`.
    Out(u8),
    /// `out.*` (final norm and conv).
    OutLayer,
}

impl fmt::Display for TrainBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainBlock::TimeEmbed => f.write_str("time_embed"),
            TrainBlock::LabelEmb => f.write_str("label_emb"),
            TrainBlock::In(n) => write!(f, "IN{n:02}"),
            TrainBlock::Mid => f.write_str("M00"),
            TrainBlock::Out(n) => write!(f, "OUT{n:02}"),
            TrainBlock::OutLayer => f.write_str("out"),
        }
    }
}

impl TrainBlock {
    /// The unit of a full checkpoint key (`model.diffusion_model.…`), or of a
    /// key relative to the UNet prefix.
    pub fn of_key(key: &str) -> Option<Self> {
        let rel = key
            .strip_prefix(UNET_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(key);
        let (head, rest) = rel.split_once('.')?;
        let num = || rest.split('.').next()?.parse::<u8>().ok();
        match head {
            "time_embed" => Some(TrainBlock::TimeEmbed),
            "label_emb" => Some(TrainBlock::LabelEmb),
            "input_blocks" => num().map(TrainBlock::In),
            "middle_block" => Some(TrainBlock::Mid),
            "output_blocks" => num().map(TrainBlock::Out),
            "out" => Some(TrainBlock::OutLayer),
            _ => None,
        }
    }

    fn parse_one(s: &str) -> Option<Self> {
        let u = s.trim().to_ascii_uppercase();
        let num = |r: &str| (r.len() == 2).then(|| r.parse::<u8>().ok()).flatten();
        match u.as_str() {
            "OUT" => Some(TrainBlock::OutLayer),
            "TIME_EMBED" => Some(TrainBlock::TimeEmbed),
            "LABEL_EMB" => Some(TrainBlock::LabelEmb),
            "M00" => Some(TrainBlock::Mid),
            _ => {
                if let Some(r) = u.strip_prefix("OUT") {
                    num(r).map(TrainBlock::Out)
                } else {
                    u.strip_prefix("IN").and_then(num).map(TrainBlock::In)
                }
            }
        }
    }
}

/// A set of trainable units (`None` = all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSet(Option<BTreeSet<TrainBlock>>);

const SELECTOR_HELP: &str =
    "use all, IN00…IN08, M00, OUT00…OUT08, ranges like IN00-IN08, out, time_embed, label_emb";

/// Expand one selector (`IN03`, `OUT00-OUT08`, `out`) into units.
fn expand(sel: &str) -> Result<Vec<TrainBlock>> {
    let unknown = || Error::config(format!("unknown block {:?}; {SELECTOR_HELP}", sel.trim()));
    if let Some((a, b)) = sel.split_once('-') {
        let (a, b) = (
            TrainBlock::parse_one(a).ok_or_else(unknown)?,
            TrainBlock::parse_one(b).ok_or_else(unknown)?,
        );
        return match (a, b) {
            (TrainBlock::In(x), TrainBlock::In(y)) if x <= y => {
                Ok((x..=y).map(TrainBlock::In).collect())
            }
            (TrainBlock::Out(x), TrainBlock::Out(y)) if x <= y => {
                Ok((x..=y).map(TrainBlock::Out).collect())
            }
            _ => Err(Error::config(format!(
                "block range {:?}: both ends must be IN or both OUT, in increasing order",
                sel.trim()
            ))),
        };
    }
    Ok(vec![TrainBlock::parse_one(sel).ok_or_else(unknown)?])
}

impl BlockSet {
    /// Parse selectors (each may also be a comma-separated list).
    pub fn parse(selectors: &[String]) -> Result<Self> {
        let parts: Vec<&str> = selectors
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if parts.is_empty() {
            return Err(Error::config(format!(
                "no blocks selected; {SELECTOR_HELP}"
            )));
        }
        if parts.iter().any(|p| p.eq_ignore_ascii_case("all")) {
            return Ok(Self(None));
        }
        let mut set = BTreeSet::new();
        for p in parts {
            set.extend(expand(p)?);
        }
        Ok(Self(Some(set)))
    }

    /// Whether every UNet parameter trains.
    pub fn is_all(&self) -> bool {
        self.0.is_none()
    }

    /// Whether the parameter `key` trains.
    pub fn contains_key(&self, key: &str) -> bool {
        match (&self.0, TrainBlock::of_key(key)) {
            (None, _) => true,
            (Some(s), Some(b)) => s.contains(&b),
            (Some(_), None) => false,
        }
    }

    /// Whether every unit of `self` is in `other`.
    pub fn is_subset(&self, other: &BlockSet) -> bool {
        match (&self.0, &other.0) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => a.is_subset(b),
        }
    }

    /// Check that every selected unit exists among `keys` (the UNet's
    /// checkpoint keys); names the first that does not.
    pub fn check_exists<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let Some(set) = &self.0 else { return Ok(()) };
        let present: BTreeSet<TrainBlock> =
            keys.into_iter().filter_map(TrainBlock::of_key).collect();
        if let Some(missing) = set.iter().find(|b| !present.contains(b)) {
            let have: Vec<String> = present.iter().map(|b| b.to_string()).collect();
            return Err(Error::config(format!(
                "block {missing} does not exist in this UNet (it has {})",
                have.join(", ")
            )));
        }
        Ok(())
    }
}

/// Learning rate per trainable key: `block_lr` entries (each selector may
/// be a range) override `lr`; two entries covering the same unit are an error.
#[derive(Debug, Clone)]
pub struct BlockLr {
    lr: f64,
    per_block: BTreeMap<TrainBlock, f64>,
}

impl BlockLr {
    /// Build from a stage's base `lr` and its `block_lr` table.
    pub fn new(lr: f64, block_lr: &BTreeMap<String, f64>) -> Result<Self> {
        let mut per_block = BTreeMap::new();
        for (sel, &v) in block_lr {
            for b in expand(sel)? {
                if per_block.insert(b, v).is_some() {
                    return Err(Error::config(format!(
                        "block_lr: {b} is covered by more than one entry (e.g. {sel:?}); give each block one learning rate"
                    )));
                }
            }
        }
        Ok(Self { lr, per_block })
    }

    /// The learning rate of parameter `key`.
    pub fn of_key(&self, key: &str) -> f64 {
        TrainBlock::of_key(key)
            .and_then(|b| self.per_block.get(&b).copied())
            .unwrap_or(self.lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> BlockSet {
        BlockSet::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn keys_map_to_units() {
        let k = |r: &str| TrainBlock::of_key(&format!("{UNET_PREFIX}.{r}"));
        assert_eq!(k("out.2.weight"), Some(TrainBlock::OutLayer));
        assert_eq!(
            k("output_blocks.8.0.in_layers.0.weight"),
            Some(TrainBlock::Out(8))
        );
        assert_eq!(k("input_blocks.10.0.op.weight"), Some(TrainBlock::In(10)));
        assert_eq!(k("middle_block.1.proj_in.weight"), Some(TrainBlock::Mid));
        assert_eq!(k("label_emb.0.0.weight"), Some(TrainBlock::LabelEmb));
        assert_eq!(k("time_embed.2.bias"), Some(TrainBlock::TimeEmbed));
        assert_eq!(TrainBlock::of_key("first_stage_model.x"), None);
    }

    #[test]
    fn selectors_ranges_and_membership() {
        let s = set(&["out,OUT08", "IN01-IN03"]);
        let k = |r: &str| format!("{UNET_PREFIX}.{r}");
        assert!(s.contains_key(&k("out.0.bias")));
        assert!(s.contains_key(&k("output_blocks.8.0.skip_connection.weight")));
        assert!(!s.contains_key(&k("output_blocks.7.0.skip_connection.weight")));
        assert!(s.contains_key(&k("input_blocks.2.0.in_layers.2.weight")));
        assert!(!s.contains_key(&k("input_blocks.4.0.in_layers.2.weight")));
        assert!(set(&["all"]).is_all());
        assert!(set(&["OUT08"]).is_subset(&s) && !s.is_subset(&set(&["OUT08"])));
        for bad in ["OUT9", "IN03-OUT02", "IN05-IN01", "xyz", ""] {
            assert!(BlockSet::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        let e = set(&["IN09"]).check_exists(["model.diffusion_model.input_blocks.0.0.weight"]);
        assert!(e.unwrap_err().to_string().contains("IN09 does not exist"));
    }

    #[test]
    fn per_block_learning_rates() {
        let lr = BlockLr::new(
            1e-5,
            &[("OUT00-OUT08".to_string(), 2e-5), ("out".to_string(), 3e-5)].into(),
        )
        .unwrap();
        assert_eq!(
            lr.of_key("model.diffusion_model.output_blocks.3.1.proj_in.weight"),
            2e-5
        );
        assert_eq!(lr.of_key("model.diffusion_model.out.2.weight"), 3e-5);
        assert_eq!(lr.of_key("model.diffusion_model.middle_block.0.x"), 1e-5);
        let dup = BlockLr::new(
            1e-5,
            &[("OUT00-OUT08".into(), 1.0), ("OUT08".into(), 2.0)].into(),
        );
        assert!(dup.unwrap_err().to_string().contains("OUT08"));
    }
}
