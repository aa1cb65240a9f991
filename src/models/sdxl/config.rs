//! Hyper-parameters of the SDXL UNet and VAE, with named constructors.
//!
//! `sdxl_base()` / `sdxl()` reproduce Stability's `configs/inference/sd_xl_base.yaml`
//! (reference/sdxl.md §1.2 and §5); `tiny()` keeps the same block layout
//! (three UNet levels, attention at levels 1 and 2, `label_emb` with the six
//! 256-d size embeddings; four VAE levels, mid attention, factor 8) at small
//! widths for tests and the toy world. GroupNorm group counts are config
//! fields because the tiny widths cannot use 32 groups everywhere.
//!
//! The UNet config describes the file layout block by block, as ComfyUI's
//! `comfy/model_detection.py` does, because distilled SDXL variants differ
//! block by block: `transformer_depth` has one entry per input-side ResBlock
//! (`input_blocks.N` with a ResBlock, in order) and `transformer_depth_output`
//! one per output block (`output_blocks.0…`, in index order — ComfyUI keeps
//! that list reversed), 0 meaning "no SpatialTransformer"; `num_res_blocks` is
//! per level; the middle block may be full (ResBlock, transformer, ResBlock),
//! lack its transformer (sgm `disable_middle_transformer`), be one ResBlock
//! (SSD-1B, Vega: ComfyUI's `transformer_depth_middle = -1`) or be absent
//! (KOALA-700M, `-2`). [`UNetConfig::from_levels`] builds the per-block lists
//! from sgm's per-level arguments.
//!
//! Configs are (de)serialised with serde: our own saves write them into the
//! safetensors metadata (`eps2v.unet_config`, `eps2v.vae_config`, see
//! [`super::infer`]) so that what shapes cannot tell (GroupNorm groups, head
//! width) survives a save.

use serde::{Deserialize, Serialize};

/// Dimension of each of the six size/crop embeddings of SDXL micro-conditioning.
pub const SIZE_EMBED_DIM: usize = 256;

/// Number of size/crop scalars (orig h, w, crop top, left, target h, w).
pub const SIZE_COND_COUNT: usize = 6;

/// The UNet's `middle_block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MiddleBlock {
    /// ResBlock, SpatialTransformer of `depth` blocks, ResBlock
    /// (`middle_block.0/1/2`, sgm; SDXL: depth 10).
    Transformer {
        /// Transformer blocks in `middle_block.1`.
        depth: usize,
    },
    /// ResBlock, (identity), ResBlock: `middle_block.0` and `.2` (sgm
    /// `disable_middle_transformer=True`).
    NoTransformer,
    /// One ResBlock, `middle_block.0` (SSD-1B, Segmind Vega; ComfyUI
    /// `transformer_depth_middle = -1`).
    ResBlockOnly,
    /// No middle block at all (KOALA-700M; ComfyUI `-2`).
    Absent,
}

/// UNet hyper-parameters (sgm `UNetModel` arguments, per block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4 for SDXL).
    pub in_channels: usize,
    /// Latent channels out (4 for SDXL).
    pub out_channels: usize,
    /// Base width; level `i` has `model_channels * channel_mult[i]` channels.
    pub model_channels: usize,
    /// Width multiplier per level (SDXL: `[1, 2, 4]`).
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the encoder side; the decoder side has one more
    /// per level (SDXL: `[2, 2, 2]`).
    pub num_res_blocks: Vec<usize>,
    /// Transformer depth of every input-side ResBlock, in `input_blocks`
    /// order (level by level, `num_res_blocks[level]` entries each); 0 means
    /// no SpatialTransformer (SDXL: `[0, 0, 2, 2, 10, 10]`).
    pub transformer_depth: Vec<usize>,
    /// Transformer depth of every output block, in `output_blocks` index
    /// order (deepest level first, `num_res_blocks[level] + 1` entries per
    /// level); 0 means none (SDXL: `[10, 10, 10, 2, 2, 2, 0, 0, 0]`).
    pub transformer_depth_output: Vec<usize>,
    /// The middle block (SDXL: a transformer of depth 10).
    pub middle: MiddleBlock,
    /// Channels per attention head (SDXL: 64); heads = channels / this.
    /// Shapes cannot tell it: sgm's 64 unless the file's metadata says otherwise.
    pub num_head_channels: usize,
    /// Width of the text context (SDXL: 768 + 1280 = 2048).
    pub context_dim: usize,
    /// Width of the pooled text embedding that starts `y` (SDXL: 1280).
    pub pooled_dim: usize,
    /// GroupNorm groups in ResBlocks, transformers and the output norm
    /// (SDXL: 32). Shapes cannot tell it: sgm's 32 unless the metadata says
    /// otherwise.
    pub num_groups: usize,
    /// `proj_in` / `proj_out` are Linear `[c, c]` (SDXL, `use_linear_in_transformer`)
    /// rather than 1×1 convolutions `[c, c, 1, 1]` (SD 1.x style).
    pub use_linear_in_transformer: bool,
}

impl UNetConfig {
    /// Build the per-block lists from sgm's per-level arguments: every
    /// ResBlock of level `i` (both sides) gets a transformer of
    /// `level_depth[i]` blocks (0: none); `middle_depth` as in sgm.
    #[allow(clippy::too_many_arguments)]
    pub fn from_levels(
        model_channels: usize,
        channel_mult: Vec<usize>,
        num_res_blocks: usize,
        level_depth: &[usize],
        middle_depth: usize,
        num_head_channels: usize,
        context_dim: usize,
        pooled_dim: usize,
        num_groups: usize,
    ) -> Self {
        let levels = channel_mult.len();
        let nrb = vec![num_res_blocks; levels];
        let depth = |l: usize| level_depth.get(l).copied().unwrap_or(0);
        let transformer_depth = (0..levels)
            .flat_map(|l| std::iter::repeat_n(depth(l), nrb[l]))
            .collect();
        let transformer_depth_output = (0..levels)
            .rev()
            .flat_map(|l| std::iter::repeat_n(depth(l), nrb[l] + 1))
            .collect();
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels,
            channel_mult,
            num_res_blocks: nrb,
            transformer_depth,
            transformer_depth_output,
            middle: MiddleBlock::Transformer {
                depth: middle_depth,
            },
            num_head_channels,
            context_dim,
            pooled_dim,
            num_groups,
            use_linear_in_transformer: true,
        }
    }

    /// The SDXL 1.0 base UNet (2,567,463,684 parameters).
    pub fn sdxl_base() -> Self {
        Self::from_levels(320, vec![1, 2, 4], 2, &[0, 2, 10], 10, 64, 2048, 1280, 32)
    }

    /// Segmind SSD-1B: the SDXL base with transformer blocks removed block by
    /// block and a middle block of one ResBlock (ComfyUI
    /// `model_detection.py` `SSD_1B`: input `[0, 0, 2, 2, 4, 4]`, output
    /// `[4, 4, 10, 2, 1, 1, 0, 0, 0]` in `output_blocks` order, middle −1).
    pub fn ssd_1b() -> Self {
        Self {
            transformer_depth: vec![0, 0, 2, 2, 4, 4],
            transformer_depth_output: vec![4, 4, 10, 2, 1, 1, 0, 0, 0],
            middle: MiddleBlock::ResBlockOnly,
            ..Self::sdxl_base()
        }
    }

    /// Segmind Vega: input `[0, 0, 1, 1, 2, 2]`, output
    /// `[2, 2, 2, 1, 1, 1, 0, 0, 0]`, middle one ResBlock (ComfyUI
    /// `Segmind_Vega`).
    pub fn segmind_vega() -> Self {
        Self {
            transformer_depth: vec![0, 0, 1, 1, 2, 2],
            transformer_depth_output: vec![2, 2, 2, 1, 1, 1, 0, 0, 0],
            middle: MiddleBlock::ResBlockOnly,
            ..Self::sdxl_base()
        }
    }

    /// A tiny UNet with the SDXL block layout (same key structure, small widths).
    pub fn tiny() -> Self {
        Self::from_levels(32, vec![1, 2, 4], 2, &[0, 1, 1], 1, 16, 64, 32, 8)
    }

    /// The toy-world base model (DESIGN.md §4): the SDXL block layout
    /// (three levels, two ResBlocks each, transformers at levels 1 and 2,
    /// middle transformer, `label_emb` with the six size embeddings) at
    /// widths 48 / 48 / 96, 16-channel heads, 8 GroupNorm groups; context
    /// 48 and pooled 32 from [`crate::pipeline::TextConfigs::toy`]; 8 latent
    /// channels ([`VaeConfig::toy`]). Sized for the toy buckets (8×8 to 12×8
    /// latents): a training step at batch 8 takes tens of milliseconds on
    /// two CPU cores (`--bench toy`, README).
    pub fn toy() -> Self {
        Self {
            in_channels: VaeConfig::TOY_LATENT_CHANNELS,
            out_channels: VaeConfig::TOY_LATENT_CHANNELS,
            ..Self::from_levels(48, vec![1, 1, 2], 2, &[0, 1, 1], 1, 16, 48, 32, 8)
        }
    }

    /// The named configs, in the order `known_name` tries them.
    pub fn named() -> Vec<(&'static str, Self)> {
        vec![
            ("sdxl_base", Self::sdxl_base()),
            ("ssd_1b", Self::ssd_1b()),
            ("segmind_vega", Self::segmind_vega()),
            ("tiny", Self::tiny()),
            ("toy", Self::toy()),
        ]
    }

    /// Name of the named config equal to this one, if any.
    pub fn known_name(&self) -> Option<&'static str> {
        Self::named()
            .into_iter()
            .find(|(_, c)| c == self)
            .map(|(n, _)| n)
    }

    /// Is `other` the same network apart from what shapes cannot tell
    /// (GroupNorm groups and head width)?
    pub fn same_shapes(&self, other: &Self) -> bool {
        Self {
            num_groups: other.num_groups,
            num_head_channels: other.num_head_channels,
            ..self.clone()
        } == *other
    }

    /// One line for summaries (`ckpt info`).
    pub fn summary(&self) -> String {
        let middle = match self.middle {
            MiddleBlock::Transformer { depth } => format!("transformer depth {depth}"),
            MiddleBlock::NoTransformer => "two ResBlocks, no transformer".into(),
            MiddleBlock::ResBlockOnly => "one ResBlock".into(),
            MiddleBlock::Absent => "none".into(),
        };
        format!(
            "model_channels {}, channel_mult {:?}, res blocks {:?}, transformer depth in {:?} out {:?}, middle {middle}, {}-channel heads, context {}, pooled {}, {} groups, proj_in {}, {} → {} channels",
            self.model_channels,
            self.channel_mult,
            self.num_res_blocks,
            self.transformer_depth,
            self.transformer_depth_output,
            self.num_head_channels,
            self.context_dim,
            self.pooled_dim,
            self.num_groups,
            if self.use_linear_in_transformer { "linear" } else { "1×1 conv" },
            self.in_channels,
            self.out_channels
        )
    }

    /// Width of the time / label embedding (4 × model_channels).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Width of the vector conditioning `y` (pooled + 6 × 256).
    pub fn adm_in_channels(&self) -> usize {
        self.pooled_dim + SIZE_COND_COUNT * SIZE_EMBED_DIM
    }

    /// Width of level `level`.
    pub fn level_width(&self, level: usize) -> usize {
        self.model_channels * self.channel_mult[level]
    }

    /// Transformer depth of ResBlock `i` of input level `level` (0: none).
    pub fn input_depth(&self, level: usize, i: usize) -> usize {
        let start: usize = self.num_res_blocks[..level].iter().sum();
        self.transformer_depth.get(start + i).copied().unwrap_or(0)
    }

    /// Transformer depth of output block `i` (0..=num_res_blocks) of level `level`.
    pub fn output_depth(&self, level: usize, i: usize) -> usize {
        let start: usize = self.num_res_blocks[level + 1..].iter().map(|n| n + 1).sum();
        self.transformer_depth_output
            .get(start + i)
            .copied()
            .unwrap_or(0)
    }

    /// Check the invariants the module constructors rely on.
    pub fn validate(&self) -> crate::Result<()> {
        let levels = self.channel_mult.len();
        let bad = |msg: String| Err(crate::Error::config(format!("unet config: {msg}")));
        if levels == 0 || self.num_res_blocks.len() != levels {
            return bad(format!(
                "channel_mult ({levels} levels) and num_res_blocks ({} entries) need the same non-zero length",
                self.num_res_blocks.len()
            ));
        }
        if self.num_res_blocks.contains(&0) {
            return bad("every level needs at least one ResBlock (num_res_blocks > 0)".into());
        }
        let n_in: usize = self.num_res_blocks.iter().sum();
        let n_out: usize = self.num_res_blocks.iter().map(|n| n + 1).sum();
        if self.transformer_depth.len() != n_in || self.transformer_depth_output.len() != n_out {
            return bad(format!(
                "transformer_depth needs one entry per input ResBlock ({n_in}, has {}) and transformer_depth_output one per output block ({n_out}, has {})",
                self.transformer_depth.len(),
                self.transformer_depth_output.len()
            ));
        }
        if self.num_head_channels == 0 || self.num_groups == 0 || self.model_channels == 0 {
            return bad("model_channels, num_head_channels and num_groups must be > 0".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return bad("in_channels and out_channels must be > 0".into());
        }
        if self.middle == (MiddleBlock::Transformer { depth: 0 }) {
            return bad("a middle transformer needs depth > 0 (use no_transformer)".into());
        }
        for (level, &m) in self.channel_mult.iter().enumerate() {
            let c = m * self.model_channels;
            if c == 0 || c % self.num_groups != 0 {
                return bad(format!(
                    "level {level} width {c} must be a positive multiple of num_groups {}",
                    self.num_groups
                ));
            }
            let attn = (0..self.num_res_blocks[level]).any(|i| self.input_depth(level, i) > 0)
                || (0..=self.num_res_blocks[level]).any(|i| self.output_depth(level, i) > 0)
                || (level + 1 == levels && matches!(self.middle, MiddleBlock::Transformer { .. }));
            if attn && c % self.num_head_channels != 0 {
                return bad(format!(
                    "level {level} width {c} has attention, so it must be a multiple of num_head_channels {}",
                    self.num_head_channels
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

    /// Latent channels of the toy world (SDXL: 4). Toy scenes are 64 to
    /// 96 pixels, so a factor-8 latent is 8×8 to 12×8 and a small shape
    /// covers about 2×2 latent pixels: with 4 channels the shape's kind
    /// does not survive the round trip (tagger on round trips: shapes 36 %,
    /// README, Toy world); twice the channels keep the factor, the layout
    /// and the UNet's cost.
    pub const TOY_LATENT_CHANNELS: usize = 8;

    /// The toy-world VAE (DESIGN.md §4): the SDXL layout (four levels,
    /// factor 8, mid attention) at widths 16 / 32 / 64 / 64 with one
    /// ResnetBlock per encoder level (two per decoder level), 8 groups,
    /// [`Self::TOY_LATENT_CHANNELS`] latent channels.
    pub fn toy() -> Self {
        Self {
            num_res_blocks: 1,
            z_channels: Self::TOY_LATENT_CHANNELS,
            embed_dim: Self::TOY_LATENT_CHANNELS,
            ..Self::tiny()
        }
    }

    /// The named configs, in the order `known_name` tries them.
    pub fn named() -> Vec<(&'static str, Self)> {
        vec![
            ("sdxl", Self::sdxl()),
            ("tiny", Self::tiny()),
            ("toy", Self::toy()),
        ]
    }

    /// Name of the named config equal to this one, if any.
    pub fn known_name(&self) -> Option<&'static str> {
        Self::named()
            .into_iter()
            .find(|(_, c)| c == self)
            .map(|(n, _)| n)
    }

    /// Is `other` the same network apart from what shapes cannot tell
    /// (GroupNorm groups and the latent scale factor)?
    pub fn same_shapes(&self, other: &Self) -> bool {
        Self {
            num_groups: other.num_groups,
            scale_factor: other.scale_factor,
            ..self.clone()
        } == *other
    }

    /// One line for summaries (`ckpt info`).
    pub fn summary(&self) -> String {
        format!(
            "ch {}, ch_mult {:?} (factor {}), res blocks {}, z {}, embed {}, {} groups, scale {}",
            self.ch,
            self.ch_mult,
            self.downsample_factor(),
            self.num_res_blocks,
            self.z_channels,
            self.embed_dim,
            self.num_groups,
            self.scale_factor
        )
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
        if self.z_channels == 0 || self.embed_dim == 0 || self.in_channels == 0 {
            return Err(crate::Error::config(
                "vae config: in_channels, z_channels and embed_dim must be > 0",
            ));
        }
        if !(self.scale_factor.is_finite() && self.scale_factor > 0.0) {
            return Err(crate::Error::config(format!(
                "vae config: scale_factor {} must be a positive number",
                self.scale_factor
            )));
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
        for (name, c) in UNetConfig::named() {
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.known_name(), Some(name));
        }
        VaeConfig::sdxl().validate().unwrap();
        VaeConfig::tiny().validate().unwrap();
        assert_eq!(UNetConfig::sdxl_base().adm_in_channels(), 2816);
        assert_eq!(VaeConfig::sdxl().downsample_factor(), 8);
    }

    #[test]
    fn sdxl_base_per_block_lists_follow_the_yaml() {
        let c = UNetConfig::sdxl_base();
        assert_eq!(c.num_res_blocks, vec![2, 2, 2]);
        assert_eq!(c.transformer_depth, vec![0, 0, 2, 2, 10, 10]);
        assert_eq!(
            c.transformer_depth_output,
            vec![10, 10, 10, 2, 2, 2, 0, 0, 0]
        );
        assert_eq!(c.input_depth(1, 1), 2);
        assert_eq!(c.output_depth(2, 2), 10);
        assert_eq!(c.output_depth(1, 0), 2);
        assert_eq!(c.output_depth(0, 2), 0);
        let s = UNetConfig::ssd_1b();
        assert_eq!(s.output_depth(2, 2), 10);
        assert_eq!(s.output_depth(1, 1), 1);
        assert!(s.same_shapes(&UNetConfig {
            num_groups: 8,
            ..s.clone()
        }));
        assert!(!s.same_shapes(&UNetConfig::sdxl_base()));
    }

    #[test]
    fn bad_configs_are_rejected() {
        let mut c = UNetConfig::tiny();
        c.num_groups = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("num_groups 5"), "{e}");
        let mut c = UNetConfig::tiny();
        c.transformer_depth.pop();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("one entry per input ResBlock"), "{e}");
        // Only widths with attention must be multiples of the head width.
        let mut c = UNetConfig::tiny();
        c.num_head_channels = 64;
        c.validate().unwrap(); // 32 has no attention; 64 and 128 do
        c.transformer_depth[2] = 0;
        c.transformer_depth[3] = 0;
        c.transformer_depth_output[3..6].copy_from_slice(&[0, 0, 0]);
        c.num_head_channels = 128;
        c.validate().unwrap();
        c.transformer_depth_output[4] = 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("level 1 width 64 has attention"), "{e}");
    }

    #[test]
    fn configs_round_trip_through_json() {
        for (_, c) in UNetConfig::named() {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<UNetConfig>(&s).unwrap(), c);
        }
        let s = serde_json::to_string(&UNetConfig::ssd_1b()).unwrap();
        assert!(s.contains(r#""middle":"res_block_only""#), "{s}");
        let v = serde_json::to_string(&VaeConfig::tiny()).unwrap();
        assert_eq!(
            serde_json::from_str::<VaeConfig>(&v).unwrap(),
            VaeConfig::tiny()
        );
    }
}
