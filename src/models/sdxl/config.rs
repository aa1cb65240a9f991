//! Hyper-parameters of the SDXL UNet and VAE, with named constructors.
//!
//! `sdxl_base()` / `sdxl()` reproduce Stability's `configs/inference/sd_xl_base.yaml`
//! (reference/sdxl.md §1.2 and §5); `tiny()` keeps the same block layout
//! (three UNet levels, attention at levels 1 and 2, `label_emb` with the six
//! 256-d size embeddings; four VAE levels, mid attention, factor 8) at small
//! widths for tests and the toy world. GroupNorm group counts are config
//! fields because the tiny widths cannot use 32 groups everywhere.

use serde::{Deserialize, Serialize};

/// Dimension of each of the six size/crop embeddings of SDXL micro-conditioning.
pub const SIZE_EMBED_DIM: usize = 256;

/// Number of size/crop scalars (orig h, w, crop top, left, target h, w).
pub const SIZE_COND_COUNT: usize = 6;

/// UNet hyper-parameters (sgm `UNetModel` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4 for SDXL).
    pub in_channels: usize,
    /// Latent channels out (4 for SDXL).
    pub out_channels: usize,
    /// Base width; level `i` has `model_channels * channel_mult[i]` channels.
    pub model_channels: usize,
    /// Width multiplier per level (SDXL: `[1, 2, 4]`).
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the encoder side (decoder side has one more).
    pub num_res_blocks: usize,
    /// Transformer depth per level; 0 means no SpatialTransformer at that
    /// level (SDXL: `[0, 2, 10]`, the yaml's level-0 entry is unused).
    pub transformer_depth: Vec<usize>,
    /// Transformer depth of the middle block (SDXL: 10).
    pub transformer_depth_middle: usize,
    /// Channels per attention head (SDXL: 64); heads = channels / this.
    pub num_head_channels: usize,
    /// Width of the text context (SDXL: 768 + 1280 = 2048).
    pub context_dim: usize,
    /// Width of the pooled text embedding that starts `y` (SDXL: 1280).
    pub pooled_dim: usize,
    /// GroupNorm groups in ResBlocks, transformers and the output norm (SDXL: 32).
    pub num_groups: usize,
}

impl UNetConfig {
    /// The SDXL 1.0 base UNet (2,567,463,684 parameters).
    pub fn sdxl_base() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            transformer_depth: vec![0, 2, 10],
            transformer_depth_middle: 10,
            num_head_channels: 64,
            context_dim: 2048,
            pooled_dim: 1280,
            num_groups: 32,
        }
    }

    /// A tiny UNet with the SDXL block layout (same key structure, small widths).
    pub fn tiny() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 32,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            transformer_depth: vec![0, 1, 1],
            transformer_depth_middle: 1,
            num_head_channels: 16,
            context_dim: 64,
            pooled_dim: 32,
            num_groups: 8,
        }
    }

    /// Width of the time / label embedding (4 × model_channels).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Width of the vector conditioning `y` (pooled + 6 × 256).
    pub fn adm_in_channels(&self) -> usize {
        self.pooled_dim + SIZE_COND_COUNT * SIZE_EMBED_DIM
    }

    /// Check the invariants the module constructors rely on.
    pub fn validate(&self) -> crate::Result<()> {
        let levels = self.channel_mult.len();
        let bad = |msg: String| Err(crate::Error::config(format!("unet config: {msg}")));
        if levels == 0 || self.transformer_depth.len() != levels {
            return bad(format!(
                "channel_mult ({}) and transformer_depth ({}) need the same non-zero length",
                levels,
                self.transformer_depth.len()
            ));
        }
        if self.num_head_channels == 0 || self.num_groups == 0 || self.num_res_blocks == 0 {
            return bad("num_head_channels, num_groups and num_res_blocks must be > 0".into());
        }
        for &m in &self.channel_mult {
            let c = m * self.model_channels;
            if c == 0 || c % self.num_groups != 0 || c % self.num_head_channels != 0 {
                return bad(format!(
                    "level width {c} must be a positive multiple of num_groups {} and num_head_channels {}",
                    self.num_groups, self.num_head_channels
                ));
            }
        }
        Ok(())
    }
}

/// VAE hyper-parameters (sgm `AutoencoderKL` ddconfig).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels (3).
    pub in_channels: usize,
    /// Base width (SDXL: 128).
    pub ch: usize,
    /// Width multiplier per level (SDXL: `[1, 2, 4, 4]`); levels − 1 downsamples.
    pub ch_mult: Vec<usize>,
    /// ResnetBlocks per encoder level (decoder has one more).
    pub num_res_blocks: usize,
    /// Latent channels (4).
    pub z_channels: usize,
    /// Channels of the quantised latent (4).
    pub embed_dim: usize,
    /// GroupNorm groups (SDXL: 32); every GroupNorm uses eps 1e-6.
    pub num_groups: usize,
    /// Latent scale factor applied before the UNet (SDXL: 0.13025).
    pub scale_factor: f64,
}

impl VaeConfig {
    /// The SDXL VAE (83,653,863 parameters).
    pub fn sdxl() -> Self {
        Self {
            in_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 4,
            embed_dim: 4,
            num_groups: 32,
            scale_factor: 0.13025,
        }
    }

    /// A tiny VAE with the SDXL layout (four levels, factor 8, mid attention).
    pub fn tiny() -> Self {
        Self {
            in_channels: 3,
            ch: 16,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 4,
            embed_dim: 4,
            num_groups: 8,
            scale_factor: 0.13025,
        }
    }

    /// Spatial down-sampling factor (2^(levels − 1)).
    pub fn downsample_factor(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Check the invariants the module constructors rely on.
    pub fn validate(&self) -> crate::Result<()> {
        if self.ch_mult.is_empty() || self.num_groups == 0 || self.num_res_blocks == 0 {
            return Err(crate::Error::config(
                "vae config: ch_mult must be non-empty, num_groups and num_res_blocks > 0",
            ));
        }
        for &m in &self.ch_mult {
            let c = m * self.ch;
            if c == 0 || c % self.num_groups != 0 {
                return Err(crate::Error::config(format!(
                    "vae config: level width {c} must be a positive multiple of num_groups {}",
                    self.num_groups
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_are_valid() {
        UNetConfig::sdxl_base().validate().unwrap();
        UNetConfig::tiny().validate().unwrap();
        VaeConfig::sdxl().validate().unwrap();
        VaeConfig::tiny().validate().unwrap();
        assert_eq!(UNetConfig::sdxl_base().adm_in_channels(), 2816);
        assert_eq!(VaeConfig::sdxl().downsample_factor(), 8);
    }

    #[test]
    fn bad_groups_are_rejected() {
        let mut c = UNetConfig::tiny();
        c.num_groups = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("num_groups 5"), "{e}");
    }
}
