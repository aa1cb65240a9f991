//! Infer every model config of an SDXL-family single-file checkpoint from
//! its keys and shapes alone, with the file's metadata for what shapes
//! cannot tell.
//!
//! Why: users hold more than the base shape (distilled SSD-1B / Vega with
//! other transformer depths block by block, UNet-only saves, toy models); a
//! list of named configs cannot know them all. Learned from ComfyUI's
//! `comfy/model_detection.py` (`detect_unet_config`: walk `input_blocks`,
//! split levels at `0.op`, read widths from `out_layers.3`, count
//! `transformer_blocks` per block, pair output blocks, classify the middle
//! block), and better in three ways: every inconsistency is an error naming
//! the key and the rule it breaks (ComfyUI fails later with a shape error or
//! silently builds another model); the inferred config is then checked key by
//! key against the module constructors (nothing left over, nothing missing);
//! and what shapes cannot tell comes from a stated source.
//!
//! Shapes cannot tell GroupNorm groups, head width (UNet), heads and MLP
//! activation (CLIP) or the VAE scale factor. They come, in order, from
//! 1. our own metadata (`eps2v.unet_config`, `eps2v.vae_config`,
//!    `eps2v.text_config`: the JSON of the config, written by
//!    [`config_metadata`] into every checkpoint eps2v saves), when it
//!    describes the same network as the shapes;
//! 2. a named config with exactly these shapes (`sdxl_base`, `tiny`, …);
//! 3. the sgm / ComfyUI defaults: 32 groups, 64-channel heads, CLIP head
//!    width 64, quick-GELU CLIP-L and GELU bigG, VAE scale 0.13025.
//!
//! [`HiddenSource`] records which, and `eps2v ckpt info` shows it.
//! Every function here is pure over a key → shape map (no tensor data).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::checkpoint::{shape_ok, vae_expected_keys};
use super::clip::ClipTextConfig;
use super::config::{UNetConfig, VaeConfig};

/// Metadata key holding our saved UNet config (JSON).
pub const META_UNET_CONFIG: &str = "eps2v.unet_config";
/// Metadata key holding our saved VAE config (JSON).
pub const META_VAE_CONFIG: &str = "eps2v.vae_config";
/// Metadata key holding our saved text-encoder configs (JSON `{"clip_l", "clip_g"}`).
pub const META_TEXT_CONFIG: &str = "eps2v.text_config";

/// sgm's GroupNorm group count (`normalization` / `Normalize`).
pub const DEFAULT_GROUPS: usize = 32;
/// sgm's SDXL head width (`num_head_channels`); also CLIP's head width.
pub const DEFAULT_HEAD_CHANNELS: usize = 64;
/// The SDXL VAE latent scale factor.
pub const DEFAULT_VAE_SCALE: f64 = 0.13025;

/// Key → shape (PyTorch layout) of every tensor of a file.
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

/// Where the values that shapes cannot tell came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "name")]
pub enum HiddenSource {
    /// Our `eps2v.*_config` metadata.
    Metadata,
    /// The named config with exactly these shapes.
    Named(&'static str),
    /// sgm / ComfyUI defaults.
    Defaults,
}

impl HiddenSource {
    /// One phrase for summaries.
    pub fn describe(&self, what: &str) -> String {
        match self {
            HiddenSource::Metadata => format!("{what} from the file's eps2v metadata"),
            HiddenSource::Named(n) => format!("{what} of the named config {n} (same shapes)"),
            HiddenSource::Defaults => format!("{what}: sgm/ComfyUI defaults"),
        }
    }
}

/// An inferred config and how its hidden values were chosen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inferred<T> {
    /// The config.
    pub config: T,
    /// Name of the named config equal to it (`sdxl_base`, `tiny`…), if any.
    pub name: Option<&'static str>,
    /// Source of the values shapes cannot tell.
    pub hidden: HiddenSource,
    /// Things worth telling (ignored metadata…).
    pub warnings: Vec<String>,
}

/// Inferred CLIP-L and bigG configs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TextPair {
    /// Text encoder 1 (`conditioner.embedders.0`, HF CLIP names).
    pub clip_l: ClipTextConfig,
    /// Text encoder 2 (`conditioner.embedders.1`, open_clip names).
    pub clip_g: ClipTextConfig,
}

impl TextPair {
    /// Context width (`clip_l.width + clip_g.width`) and pooled width
    /// (bigG projection) the UNet must take.
    pub fn unet_dims(&self) -> (usize, usize) {
        (
            self.clip_l.width + self.clip_g.width,
            self.clip_g.projection_dim.unwrap_or(0),
        )
    }
}

/// Do the parts of one model fit together? The text encoders must give the
/// UNet's context and pooled widths, the VAE its latent channels.
pub fn check_compatible(
    unet: &UNetConfig,
    text: Option<&TextPair>,
    vae: Option<&VaeConfig>,
) -> Result<(), String> {
    if let Some(t) = text {
        let (ctx, pooled) = t.unet_dims();
        if ctx != unet.context_dim || pooled != unet.pooled_dim {
            return Err(format!(
                "the text encoders give context {ctx} ({} + {}) / pooled {pooled} but the UNet takes {} / {}; the checkpoint mixes parts of different models",
                t.clip_l.width, t.clip_g.width, unet.context_dim, unet.pooled_dim
            ));
        }
    }
    if unet.in_channels != unet.out_channels {
        return Err(format!(
            "the UNet takes {} input channels but predicts {}: an inpainting or instruct-pix2pix model (extra image channels), which eps2v does not sample or train",
            unet.in_channels, unet.out_channels
        ));
    }
    if let Some(v) = vae {
        if v.embed_dim != unet.in_channels || v.embed_dim != unet.out_channels {
            return Err(format!(
                "the VAE has {} latent channels but the UNet takes {} and gives {}; the checkpoint mixes parts of different models",
                v.embed_dim, unet.in_channels, unet.out_channels
            ));
        }
    }
    Ok(())
}

/// Metadata entries that record `unet`, `vae` and `text` in a checkpoint we
/// save (merge them into `SaveOptions::metadata`), so that a later load
/// knows the GroupNorm groups, head widths and VAE scale shapes cannot tell.
pub fn config_metadata(
    unet: Option<&UNetConfig>,
    vae: Option<&VaeConfig>,
    text: Option<(&ClipTextConfig, &ClipTextConfig)>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    // Serialising plain config structs cannot fail.
    if let Some(Ok(s)) = unet.map(serde_json::to_string) {
        m.insert(META_UNET_CONFIG.to_string(), s);
    }
    if let Some(Ok(s)) = vae.map(serde_json::to_string) {
        m.insert(META_VAE_CONFIG.to_string(), s);
    }
    if let Some((l, g)) = text {
        let pair = TextPair {
            clip_l: l.clone(),
            clip_g: g.clone(),
        };
        if let Ok(s) = serde_json::to_string(&pair) {
            m.insert(META_TEXT_CONFIG.to_string(), s);
        }
    }
    m
}

// ---------------------------------------------------------------------------
// Key helpers.

/// Keys under `prefix` (with the prefix stripped).
struct Sub<'a> {
    prefix: &'a str,
    map: BTreeMap<&'a str, &'a [usize]>,
}

impl<'a> Sub<'a> {
    fn new(shapes: &'a ShapeMap, prefix: &'a str) -> Self {
        let map = shapes
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (&k[prefix.len()..], v.as_slice()))
            .collect();
        Self { prefix, map }
    }

    fn get(&self, key: &str) -> Option<&'a [usize]> {
        self.map.get(key).copied()
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Shape of `key`, which must have `rank` dimensions.
    fn need(&self, key: &str, rank: usize) -> Result<&'a [usize], String> {
        match self.get(key) {
            None => Err(format!("missing {}{key}", self.prefix)),
            Some(s) if s.len() != rank => Err(format!(
                "{}{key} has shape {s:?}, expected {rank} dimensions",
                self.prefix
            )),
            Some(s) => Ok(s),
        }
    }

    fn any_under(&self, p: &str) -> bool {
        self.map
            .range(p..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(p))
    }

    /// Indices `N` of keys `{p}N.…`, which must run 0..n without gaps.
    fn indices(&self, p: &str) -> Result<usize, String> {
        let mut set = BTreeSet::new();
        for k in self.map.range(p..).map(|(k, _)| *k) {
            let Some(rest) = k.strip_prefix(p) else { break };
            if let Some(n) = rest.split('.').next().and_then(|n| n.parse::<usize>().ok()) {
                set.insert(n);
            }
        }
        let n = set.len();
        if let Some((i, _)) = set.iter().enumerate().find(|(i, n)| *i != **n) {
            return Err(format!(
                "{}{p}{i}.* is missing but {}{p}{}.* exists (block numbers must run without gaps)",
                self.prefix,
                self.prefix,
                set.iter().nth(i).copied().unwrap_or(i)
            ));
        }
        Ok(n)
    }
}

/// Choose the hidden values: metadata (when it describes the same shapes),
/// then a named config with the same shapes, then defaults.
fn pick_hidden<T: Clone + Serialize + serde::de::DeserializeOwned>(
    metadata: &BTreeMap<String, String>,
    key: &str,
    inferred: &T,
    same: impl Fn(&T, &T) -> bool,
    named: Vec<(&'static str, T)>,
    warnings: &mut Vec<String>,
) -> (Option<T>, HiddenSource) {
    if let Some(text) = metadata.get(key) {
        match serde_json::from_str::<T>(text) {
            Ok(m) if same(inferred, &m) => return (Some(m), HiddenSource::Metadata),
            Ok(_) => warnings.push(format!(
                "metadata {key} describes a different network than the file's tensors; ignored (was the file edited by another tool?)"
            )),
            Err(e) => warnings.push(format!(
                "metadata {key} is not a config this version reads ({e}); ignored"
            )),
        }
    }
    if let Some((n, c)) = named.into_iter().find(|(_, c)| same(inferred, c)) {
        return (Some(c), HiddenSource::Named(n));
    }
    (None, HiddenSource::Defaults)
}

/// Compare the keys a config requests with the file's keys under `prefix`
/// (`unexpected` ignores the keys loaders skip and the marker keys).
fn check_keys(
    expected: &[(String, Vec<usize>)],
    shapes: &ShapeMap,
    prefix: &str,
    what: &str,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut wanted = BTreeSet::new();
    for (k, s) in expected {
        wanted.insert(k.as_str());
        match shapes.get(k) {
            None if super::checkpoint::is_ignored_key(k) => {}
            None => problems.push(format!("missing {k}")),
            Some(f) if !shape_ok(k, s, f) => {
                problems.push(format!("{k} is {f:?}, the {what} needs {s:?}"))
            }
            Some(_) => {}
        }
    }
    for k in shapes
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, _)| k)
    {
        if !wanted.contains(k.as_str()) && !super::checkpoint::is_ignored_key(k) {
            problems.push(format!("unexpected {k}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(4);
    Err(format!(
        "the inferred {what} does not account for every tensor: {}{}",
        problems.join("; "),
        if n > 4 {
            format!("; … {} more", n - 4)
        } else {
            String::new()
        }
    ))
}

// ---------------------------------------------------------------------------
// VAE.

/// Infer the VAE config of the tensors under `prefix` (`first_stage_model.`
/// or "" for a standalone VAE file).
pub fn infer_vae(
    shapes: &ShapeMap,
    prefix: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<Inferred<VaeConfig>, String> {
    let s = Sub::new(shapes, prefix);
    let conv_in = s.need("encoder.conv_in.weight", 4)?;
    let (ch, in_channels) = (conv_in[0], conv_in[1]);
    if ch == 0 || in_channels == 0 {
        return Err(format!(
            "{prefix}encoder.conv_in.weight is {conv_in:?}: a VAE has channels"
        ));
    }
    let levels = s.indices("encoder.down.")?;
    if levels == 0 {
        return Err(format!("no {prefix}encoder.down.0.* levels"));
    }
    let mut ch_mult = Vec::new();
    let mut nrb = None;
    let mut width = ch;
    for i in 0..levels {
        let p = format!("encoder.down.{i}.");
        if s.any_under(&format!("{p}attn.")) {
            return Err(format!(
                "{prefix}{p}attn.* (attention inside encoder levels, ddconfig attn_resolutions) is not supported; SDXL's VAE has attention only in the middle block"
            ));
        }
        let n = s.indices(&format!("{p}block."))?;
        match nrb {
            None => nrb = Some(n),
            Some(m) if m != n => {
                return Err(format!(
                    "{prefix}{p}block has {n} ResnetBlocks but encoder.down.0 has {m}; the VAE needs the same count at every level"
                ))
            }
            Some(_) => {}
        }
        if n == 0 {
            return Err(format!("{prefix}{p}block.* is empty"));
        }
        let conv2 = s.need(&format!("{p}block.{}.conv2.weight", n - 1), 4)?;
        width = conv2[0];
        if width % ch != 0 {
            return Err(format!(
                "{prefix}{p} has width {width}, not a multiple of the base width {ch}"
            ));
        }
        ch_mult.push(width / ch);
        let down = s.has(&format!("{p}downsample.conv.weight"));
        if down != (i + 1 < levels) {
            return Err(if down {
                format!("{prefix}{p}downsample.conv.weight is unexpected: the last level does not downsample")
            } else {
                format!("missing {prefix}{p}downsample.conv.weight: every level but the last downsamples")
            });
        }
    }
    let nrb = nrb.unwrap_or(0);
    let ups = s.indices("decoder.up.")?;
    if ups != levels {
        return Err(format!(
            "{prefix}decoder.up has {ups} levels but the encoder has {levels}"
        ));
    }
    for i in 0..levels {
        let n = s.indices(&format!("decoder.up.{i}.block."))?;
        if n != nrb + 1 {
            return Err(format!(
                "{prefix}decoder.up.{i}.block has {n} ResnetBlocks; with {nrb} per encoder level the decoder has {}",
                nrb + 1
            ));
        }
    }
    let conv_out = s.need("encoder.conv_out.weight", 4)?;
    if conv_out[0] % 2 != 0 || conv_out[1] != width {
        return Err(format!(
            "{prefix}encoder.conv_out.weight is {conv_out:?}; expected [2·z_channels, {width}, 3, 3] (mean and log-variance)"
        ));
    }
    let z_channels = conv_out[0] / 2;
    let quant = s.need("quant_conv.weight", 4)?;
    if quant[0] % 2 != 0 {
        return Err(format!(
            "{prefix}quant_conv.weight is {quant:?}; expected [2·embed_dim, 2·z_channels, 1, 1]"
        ));
    }
    let mut cfg = VaeConfig {
        in_channels,
        ch,
        ch_mult,
        num_res_blocks: nrb,
        z_channels,
        embed_dim: quant[0] / 2,
        num_groups: DEFAULT_GROUPS,
        scale_factor: DEFAULT_VAE_SCALE,
    };
    let mut warnings = Vec::new();
    let (hidden_cfg, hidden) = pick_hidden(
        metadata,
        META_VAE_CONFIG,
        &cfg,
        VaeConfig::same_shapes,
        VaeConfig::named(),
        &mut warnings,
    );
    if let Some(h) = hidden_cfg {
        cfg.num_groups = h.num_groups;
        cfg.scale_factor = h.scale_factor;
    } else if let Some(w) = cfg
        .ch_mult
        .iter()
        .map(|m| m * ch)
        .find(|w| w % DEFAULT_GROUPS != 0)
    {
        return Err(format!(
            "the GroupNorm group count cannot be read from shapes and sgm's default {DEFAULT_GROUPS} does not divide the width {w}; a file with other groups needs the {META_VAE_CONFIG} metadata eps2v writes"
        ));
    }
    cfg.validate().map_err(|e| e.to_string())?;
    let root = prefix.trim_end_matches('.');
    check_keys(
        &vae_expected_keys(&cfg, root).map_err(|e| e.to_string())?,
        shapes,
        prefix,
        "VAE config",
    )?;
    Ok(Inferred {
        name: cfg.known_name(),
        config: cfg,
        hidden,
        warnings,
    })
}

#[path = "infer_unet.rs"]
mod unet;
pub use unet::infer_unet;

#[path = "infer_text.rs"]
mod text;
pub use text::infer_text;

#[cfg(test)]
#[path = "infer_tests.rs"]
mod tests;
