//! Merge-block-weighted (MBW) block ids of SDXL checkpoints.
//!
//! Follows reference/sdxl.md §2 (supermerger `BLOCKIDXLL` / `blockfromkey`,
//! lora-block-weight `BLOCKID20`, ComfyUI `ModelMergeSDXL`): `INnn` =
//! `input_blocks.nn`, `M00` = `middle_block.*`, `OUTnn` = `output_blocks.nn`
//! (and `out.*`, as supermerger does), `BASE` = text encoders, `VAE` =
//! `first_stage_model.*`. `time_embed` and `label_emb` get their own ids
//! (supermerger leaves them unmerged, ComfyUI gives them sliders).

use std::fmt;

use super::{UNET_PREFIX, VAE_PREFIX};

/// The block a checkpoint key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockId {
    /// Text encoders (`conditioner.embedders.*`).
    Base,
    /// `model.diffusion_model.time_embed.*`.
    TimeEmbed,
    /// `model.diffusion_model.label_emb.*`.
    LabelEmb,
    /// `model.diffusion_model.input_blocks.N.*` (IN00–IN08).
    In(u8),
    /// `model.diffusion_model.middle_block.*` (M00).
    Mid,
    /// `model.diffusion_model.output_blocks.N.*` and `out.*` (OUT00–OUT08).
    Out(u8),
    /// `first_stage_model.*`.
    Vae,
    /// Anything else (marker keys, EMA copies, unknown).
    Other,
}

/// The 20 SDXL block ids of lora-block-weight / supermerger, in order.
pub const SDXL_BLOCK_IDS: [&str; 20] = [
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00",
    "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08",
];

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockId::Base => write!(f, "BASE"),
            BlockId::TimeEmbed => write!(f, "TIME_EMBED"),
            BlockId::LabelEmb => write!(f, "LABEL_EMB"),
            BlockId::In(n) => write!(f, "IN{n:02}"),
            BlockId::Mid => write!(f, "M00"),
            BlockId::Out(n) => write!(f, "OUT{n:02}"),
            BlockId::Vae => write!(f, "VAE"),
            BlockId::Other => write!(f, "OTHER"),
        }
    }
}

impl BlockId {
    /// Parse `BASE`, `IN00`…`IN08`, `M00`, `OUT00`…`OUT08`, `VAE`,
    /// `TIME_EMBED`, `LABEL_EMB` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        let u = s.trim().to_ascii_uppercase();
        let num = |rest: &str| rest.parse::<u8>().ok().filter(|n| *n <= 8);
        match u.as_str() {
            "BASE" => Some(BlockId::Base),
            "M00" => Some(BlockId::Mid),
            "VAE" => Some(BlockId::Vae),
            "TIME_EMBED" => Some(BlockId::TimeEmbed),
            "LABEL_EMB" => Some(BlockId::LabelEmb),
            _ => {
                if let Some(r) = u.strip_prefix("OUT") {
                    num(r).map(BlockId::Out)
                } else if let Some(r) = u.strip_prefix("IN") {
                    num(r).map(BlockId::In)
                } else {
                    None
                }
            }
        }
    }

    /// The block of a checkpoint key (LDM names).
    pub fn of_key(key: &str) -> Self {
        if key.starts_with("conditioner.embedders.") {
            return BlockId::Base;
        }
        if key
            .strip_prefix(VAE_PREFIX)
            .is_some_and(|r| r.starts_with('.'))
        {
            return BlockId::Vae;
        }
        let Some(rest) = key
            .strip_prefix(UNET_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
        else {
            return BlockId::Other;
        };
        let index = |r: &str| r.split('.').next().and_then(|n| n.parse::<u8>().ok());
        if rest.starts_with("time_embed.") {
            BlockId::TimeEmbed
        } else if rest.starts_with("label_emb.") {
            BlockId::LabelEmb
        } else if rest.starts_with("middle_block.") {
            BlockId::Mid
        } else if rest.starts_with("out.") {
            BlockId::Out(8)
        } else if let Some(r) = rest.strip_prefix("input_blocks.") {
            index(r).map_or(BlockId::Other, BlockId::In)
        } else if let Some(r) = rest.strip_prefix("output_blocks.") {
            index(r).map_or(BlockId::Other, BlockId::Out)
        } else {
            BlockId::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_mbw_blocks() {
        let k = |s: &str| BlockId::of_key(s).to_string();
        assert_eq!(k("model.diffusion_model.input_blocks.0.0.weight"), "IN00");
        assert_eq!(
            k("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"),
            "IN08"
        );
        assert_eq!(
            k("model.diffusion_model.middle_block.2.out_layers.3.bias"),
            "M00"
        );
        assert_eq!(
            k("model.diffusion_model.output_blocks.5.2.conv.weight"),
            "OUT05"
        );
        assert_eq!(k("model.diffusion_model.out.2.weight"), "OUT08");
        assert_eq!(k("model.diffusion_model.time_embed.0.weight"), "TIME_EMBED");
        assert_eq!(k("model.diffusion_model.label_emb.0.2.bias"), "LABEL_EMB");
        assert_eq!(k("conditioner.embedders.1.model.ln_final.weight"), "BASE");
        assert_eq!(k("first_stage_model.decoder.conv_out.weight"), "VAE");
        assert_eq!(k("v_pred"), "OTHER");
        assert_eq!(k("first_stage_modelx.a"), "OTHER");
    }

    #[test]
    fn every_listed_id_parses_and_round_trips() {
        for id in SDXL_BLOCK_IDS {
            let b = BlockId::parse(id).unwrap();
            assert_eq!(b.to_string(), id);
        }
        assert_eq!(BlockId::parse("in09"), None);
        assert_eq!(BlockId::parse("vae"), Some(BlockId::Vae));
    }
}
