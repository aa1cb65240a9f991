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

use super::checkpoint::{record_shapes, shape_ok, unet_expected_keys, vae_expected_keys};
use super::clip::{
    Activation, ClipTextConfig, ClipTextModel, Naming, BIGG_MODEL_PREFIX, CLIP_L_MODEL_PREFIX,
};
use super::config::{MiddleBlock, UNetConfig, VaeConfig, SIZE_COND_COUNT, SIZE_EMBED_DIM};

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

/// `(in, out)` channels of a ResBlock at `p` (keys `{p}in_layers.…`), or
/// `None` when there is none.
fn res_block(s: &Sub, p: &str, ted: usize) -> Result<Option<(usize, usize)>, String> {
    if !s.has(&format!("{p}in_layers.0.weight")) {
        return Ok(None);
    }
    let conv = s.need(&format!("{p}in_layers.2.weight"), 4)?;
    let (out, inp) = (conv[0], conv[1]);
    let emb = s.need(&format!("{p}emb_layers.1.weight"), 2)?;
    if emb[1] != ted {
        return Err(format!(
            "{}{p}emb_layers.1.weight is {emb:?}: its input must be the time embedding width {ted} (4 × model_channels)",
            s.prefix
        ));
    }
    Ok(Some((inp, out)))
}

/// One SpatialTransformer found at `p`.
struct St {
    width: usize,
    depth: usize,
    context: usize,
    linear: bool,
}

/// The SpatialTransformer at `p` (keys `{p}proj_in…`), if any.
fn transformer(s: &Sub, p: &str) -> Result<Option<St>, String> {
    // An upsampler (`{p}conv.*`) can sit where a transformer would.
    let only_upsampler = s
        .map
        .range(p..)
        .take_while(|(k, _)| k.starts_with(p))
        .all(|(k, _)| k[p.len()..].starts_with("conv."));
    if only_upsampler {
        return Ok(None);
    }
    let pre = s.prefix;
    let proj = s.get(&format!("{p}proj_in.weight")).ok_or_else(|| {
        format!("{pre}{p}* is neither a SpatialTransformer (no {pre}{p}proj_in.weight) nor a layer sgm puts there")
    })?;
    let linear = match proj.len() {
        2 => true,
        4 if proj[2..] == [1, 1] => false,
        _ => {
            return Err(format!(
                "{pre}{p}proj_in.weight has shape {proj:?}: expected a Linear [c, c] or a 1×1 conv [c, c, 1, 1]"
            ))
        }
    };
    let tb = format!("{p}transformer_blocks.");
    let depth = s.indices(&tb)?;
    if depth == 0 {
        return Err(format!(
            "{pre}{p} is a SpatialTransformer without transformer_blocks; eps2v does not build empty transformers"
        ));
    }
    // Every block must have every part: a block count that differs between
    // parts means a damaged or hand-edited file.
    let parts = [
        ("attn1", "attn1.to_q.weight"),
        ("attn2", "attn2.to_k.weight"),
        ("ff", "ff.net.0.proj.weight"),
        ("norm1", "norm1.weight"),
        ("norm2", "norm2.weight"),
        ("norm3", "norm3.weight"),
    ];
    for (name, key) in parts {
        let have: Vec<usize> = (0..depth)
            .filter(|i| s.has(&format!("{tb}{i}.{key}")))
            .collect();
        if have.len() != depth {
            let missing = (0..depth).find(|i| !have.contains(i)).unwrap_or(0);
            return Err(format!(
                "{pre}{tb}*: inconsistent transformer block count: {depth} blocks but {name} in {} ({pre}{tb}{missing}.{key} is missing)",
                have.len()
            ));
        }
    }
    let k = s.need(&format!("{tb}0.attn2.to_k.weight"), 2)?;
    Ok(Some(St {
        width: proj[0],
        depth,
        context: k[1],
        linear,
    }))
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
// UNet.

/// Infer the UNet config of the tensors under `prefix` (`model.diffusion_model.`).
/// `Err` says which key or shape breaks which rule.
pub fn infer_unet(
    shapes: &ShapeMap,
    prefix: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<Inferred<UNetConfig>, String> {
    let s = Sub::new(shapes, prefix);
    if s.map.is_empty() {
        return Err(format!("no UNet (no {prefix}* keys)"));
    }
    let conv_in = s.need("input_blocks.0.0.weight", 4)?;
    let (mc, in_channels) = (conv_in[0], conv_in[1]);
    let te = s.need("time_embed.0.weight", 2)?;
    let ted = 4 * mc;
    if te[..] != [ted, mc] {
        return Err(format!(
            "{prefix}time_embed.0.weight is {te:?}; sgm's UNet has [4·model_channels, model_channels] = [{ted}, {mc}] (model_channels {mc} from input_blocks.0.0.weight)"
        ));
    }
    let Some(label) = s.get("label_emb.0.0.weight") else {
        return Err(format!(
            "no {prefix}label_emb.0.0.weight: this UNet takes no vector conditioning, so it is not SDXL-family (SD 1.x / 2.x UNets have none)"
        ));
    };
    let sizes = SIZE_COND_COUNT * SIZE_EMBED_DIM;
    if label.len() != 2 || label[0] != ted || label[1] <= sizes {
        return Err(format!(
            "{prefix}label_emb.0.0.weight is {label:?}; SDXL's is [{ted}, pooled + {sizes}] (pooled text width plus six 256-d size embeddings)"
        ));
    }
    let pooled_dim = label[1] - sizes;

    // Input side: ResBlocks (+ transformer) grouped into levels by the `0.op` downsamplers.
    let n_in = s.indices("input_blocks.")?;
    let mut mult = Vec::new();
    let mut nrb = Vec::new();
    let mut depth_in = Vec::new();
    let mut sts = Vec::new();
    let (mut ch, mut level_width, mut level_blocks) = (mc, None::<usize>, 0usize);
    let mut chans = vec![mc];
    for n in 1..n_in {
        let p = format!("input_blocks.{n}.");
        if let Some(op) = s.get(&format!("{p}0.op.weight")) {
            let Some(w) = level_width.filter(|_| level_blocks > 0) else {
                return Err(format!(
                    "{prefix}{p}0.op downsamples a level that has no ResBlock"
                ));
            };
            if op[..] != [w, w, 3, 3] {
                return Err(format!(
                    "{prefix}{p}0.op.weight is {op:?}, expected [{w}, {w}, 3, 3]"
                ));
            }
            mult.push(w / mc);
            nrb.push(level_blocks);
            (level_width, level_blocks) = (None, 0);
            chans.push(w);
            continue;
        }
        let Some((inp, out)) = res_block(&s, &format!("{p}0."), ted)? else {
            return Err(format!(
                "{prefix}{p}* is neither a ResBlock ({p}0.in_layers.*) nor a downsampler ({p}0.op.*)"
            ));
        };
        if inp != ch {
            return Err(format!(
                "{prefix}{p}0.in_layers.2.weight takes {inp} channels but the block before gives {ch}"
            ));
        }
        if out % mc != 0 {
            return Err(format!(
                "{prefix}{p}0 has width {out}, not a multiple of model_channels {mc}"
            ));
        }
        if let Some(w) = level_width.filter(|w| *w != out) {
            return Err(format!(
                "{prefix}{p}0 changes the width from {w} to {out} without a downsampler in between"
            ));
        }
        level_width = Some(out);
        level_blocks += 1;
        ch = out;
        let st = transformer(&s, &format!("{p}1."))?;
        if s.any_under(&format!("{p}2.")) {
            return Err(format!(
                "{prefix}{p}2.* is unexpected: an input block holds a ResBlock and at most a transformer"
            ));
        }
        depth_in.push(st.as_ref().map_or(0, |t| t.depth));
        if let Some(t) = st {
            if t.width != ch {
                return Err(format!(
                    "{prefix}{p}1.proj_in.weight has width {}, the ResBlock before gives {ch}",
                    t.width
                ));
            }
            sts.push((format!("{p}1"), t));
        }
        chans.push(ch);
    }
    match level_width.filter(|_| level_blocks > 0) {
        Some(w) => {
            mult.push(w / mc);
            nrb.push(level_blocks);
        }
        None => {
            return Err(format!(
                "{prefix}input_blocks: the last level has no ResBlock (found {n_in} input blocks)"
            ))
        }
    }
    let levels = mult.len();

    // Middle block.
    let m_st = transformer(&s, "middle_block.1.")?;
    let m0 = res_block(&s, "middle_block.0.", ted)?;
    let m2 = res_block(&s, "middle_block.2.", ted)?;
    let layer = |k: &&str| {
        k.strip_prefix("middle_block.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
    };
    if let Some(k) = s.map.keys().find(|k| layer(k).is_some_and(|n| n > 2)) {
        return Err(format!(
            "{prefix}{k} is unexpected: sgm's middle block has at most 3 layers"
        ));
    }
    for (i, r) in [(0, m0), (2, m2)] {
        if let Some((a, b)) = r.filter(|&(a, b)| a != ch || b != ch) {
            return Err(format!(
                "{prefix}middle_block.{i} is {a} → {b} channels; the middle block keeps the last level's {ch}"
            ));
        }
    }
    let middle = match (m0.is_some(), &m_st, m2.is_some()) {
        (true, Some(t), true) => MiddleBlock::Transformer { depth: t.depth },
        (true, None, true) => MiddleBlock::NoTransformer,
        (true, None, false) => MiddleBlock::ResBlockOnly,
        (false, None, false) => MiddleBlock::Absent,
        (a, t, b) => {
            return Err(format!(
                "{prefix}middle_block has a ResBlock at 0: {a}, a transformer at 1: {}, a ResBlock at 2: {b}; sgm/ComfyUI build (yes, yes, yes), (yes, no, yes), (yes, no, no) or none",
                t.is_some()
            ))
        }
    };
    if let Some(t) = m_st {
        sts.push(("middle_block.1".into(), t));
    }

    // Output side: num_res_blocks + 1 blocks per level, deepest level first.
    let n_out = s.indices("output_blocks.")?;
    let want: usize = nrb.iter().map(|n| n + 1).sum();
    if n_out != want {
        return Err(format!(
            "{prefix}output_blocks has {n_out} blocks but the input side ({levels} levels with {nrb:?} ResBlocks) needs {want} (num_res_blocks + 1 per level)"
        ));
    }
    let mut depth_out = Vec::new();
    let mut k = 0;
    for level in (0..levels).rev() {
        let w = mult[level] * mc;
        for i in 0..=nrb[level] {
            let p = format!("output_blocks.{k}.");
            let skip = chans.pop().unwrap_or(0);
            let Some((inp, out)) = res_block(&s, &format!("{p}0."), ted)? else {
                return Err(format!("missing {prefix}{p}0.in_layers.0.weight (every output block starts with a ResBlock)"));
            };
            if inp != ch + skip || out != w {
                return Err(format!(
                    "{prefix}{p}0 is {inp} → {out} channels; level {level} needs {} (current {ch} + skip {skip}) → {w}",
                    ch + skip
                ));
            }
            ch = out;
            let st = transformer(&s, &format!("{p}1."))?;
            let up_at = if st.is_some() { 2 } else { 1 };
            let up_wanted = level > 0 && i == nrb[level];
            let has_up = s.has(&format!("{p}{up_at}.conv.weight"));
            if up_wanted != has_up {
                return Err(if up_wanted {
                    format!("missing {prefix}{p}{up_at}.conv.weight: the last block of level {level} upsamples")
                } else {
                    format!("{prefix}{p}{up_at}.conv.weight is unexpected: only the last block of a level above 0 upsamples")
                });
            }
            let extra = up_at + usize::from(has_up);
            if s.any_under(&format!("{p}{extra}.")) {
                return Err(format!("{prefix}{p}{extra}.* is unexpected"));
            }
            depth_out.push(st.as_ref().map_or(0, |t| t.depth));
            if let Some(t) = st {
                if t.width != ch {
                    return Err(format!(
                        "{prefix}{p}1.proj_in.weight has width {}, the ResBlock before gives {ch}",
                        t.width
                    ));
                }
                sts.push((format!("{p}1"), t));
            }
            k += 1;
        }
    }
    let out2 = s.need("out.2.weight", 4)?;
    let out_channels = out2[0];

    // Attention-wide values: every transformer must agree.
    let Some((first, t0)) = sts.first() else {
        return Err(format!(
            "{prefix}: no SpatialTransformer anywhere, so the text context width cannot be read; not an SDXL-family UNet"
        ));
    };
    for (name, t) in &sts {
        if t.context != t0.context {
            return Err(format!(
                "{prefix}{name} attends to a {}-wide context but {prefix}{first} to {}; one model has one context width",
                t.context, t0.context
            ));
        }
        if t.linear != t0.linear {
            return Err(format!(
                "{prefix}{name}.proj_in is a {} but {prefix}{first}.proj_in a {}; sgm uses one kind per model",
                if t.linear { "Linear" } else { "1×1 conv" },
                if t0.linear { "Linear" } else { "1×1 conv" }
            ));
        }
    }
    let mut cfg = UNetConfig {
        in_channels,
        out_channels,
        model_channels: mc,
        channel_mult: mult,
        num_res_blocks: nrb,
        transformer_depth: depth_in,
        transformer_depth_output: depth_out,
        middle,
        num_head_channels: DEFAULT_HEAD_CHANNELS,
        context_dim: t0.context,
        pooled_dim,
        num_groups: DEFAULT_GROUPS,
        use_linear_in_transformer: t0.linear,
    };

    let mut warnings = Vec::new();
    let (hidden_cfg, hidden) = pick_hidden(
        metadata,
        META_UNET_CONFIG,
        &cfg,
        UNetConfig::same_shapes,
        UNetConfig::named(),
        &mut warnings,
    );
    if let Some(h) = hidden_cfg {
        cfg.num_groups = h.num_groups;
        cfg.num_head_channels = h.num_head_channels;
    } else {
        check_default_unet_hidden(&cfg, &sts)?;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    check_keys(
        &unet_expected_keys(&cfg).map_err(|e| e.to_string())?,
        shapes,
        prefix,
        "UNet config",
    )?;
    Ok(Inferred {
        name: cfg.known_name(),
        config: cfg,
        hidden,
        warnings,
    })
}

/// The defaults must fit the widths, or the file needs our metadata.
fn check_default_unet_hidden(cfg: &UNetConfig, sts: &[(String, St)]) -> Result<(), String> {
    for (level, &m) in cfg.channel_mult.iter().enumerate() {
        let w = m * cfg.model_channels;
        if w % DEFAULT_GROUPS != 0 {
            return Err(format!(
                "the GroupNorm group count cannot be read from shapes and sgm's default {DEFAULT_GROUPS} does not divide level {level}'s width {w}; a file with other groups needs the {META_UNET_CONFIG} metadata eps2v writes"
            ));
        }
    }
    if let Some((name, t)) = sts
        .iter()
        .find(|(_, t)| t.width % DEFAULT_HEAD_CHANNELS != 0)
    {
        return Err(format!(
            "the attention head width cannot be read from shapes and sgm's default {DEFAULT_HEAD_CHANNELS} does not divide {name}'s width {}; a file with other heads needs the {META_UNET_CONFIG} metadata eps2v writes",
            t.width
        ));
    }
    Ok(())
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

// ---------------------------------------------------------------------------
// Text encoders.

/// Infer one CLIP text transformer under `prefix` (with the dot) in `naming`.
fn infer_clip(shapes: &ShapeMap, prefix: &str, naming: Naming) -> Result<ClipTextConfig, String> {
    let s = Sub::new(shapes, prefix);
    let (tok, pos, blocks, fc) = match naming {
        Naming::HfClip => (
            "embeddings.token_embedding.weight",
            "embeddings.position_embedding.weight",
            "encoder.layers.",
            "mlp.fc1.weight",
        ),
        Naming::OpenClip => (
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.",
            "mlp.c_fc.weight",
        ),
    };
    let tok = s.need(tok, 2)?;
    let (vocab_size, width) = (tok[0], tok[1]);
    let pos = s.need(pos, 2)?;
    let layers = s.indices(blocks)?;
    if layers < 2 {
        return Err(format!(
            "{prefix}{blocks}* has {layers} layer(s); SDXL uses the penultimate layer, so at least 2 are needed"
        ));
    }
    let fc = s.need(&format!("{blocks}0.{fc}"), 2)?;
    let projection_dim = match naming {
        Naming::HfClip => None,
        Naming::OpenClip => Some(s.need("text_projection", 2)?[1]),
    };
    let base = match naming {
        Naming::HfClip => ClipTextConfig::clip_l(),
        Naming::OpenClip => ClipTextConfig::open_clip_bigg(),
    };
    Ok(ClipTextConfig {
        vocab_size,
        width,
        layers,
        heads: 0,
        intermediate: fc[0],
        max_positions: pos[0],
        projection_dim,
        ..base
    })
}

/// Infer the two SDXL text encoders (CLIP-L at `conditioner.embedders.0`,
/// OpenCLIP bigG at `conditioner.embedders.1`).
pub fn infer_text(
    shapes: &ShapeMap,
    metadata: &BTreeMap<String, String>,
) -> Result<Inferred<TextPair>, String> {
    let pl = format!("{CLIP_L_MODEL_PREFIX}.");
    let pg = format!("{BIGG_MODEL_PREFIX}.");
    let mut pair = TextPair {
        clip_l: infer_clip(shapes, &pl, Naming::HfClip).map_err(|e| format!("CLIP-L: {e}"))?,
        clip_g: infer_clip(shapes, &pg, Naming::OpenClip).map_err(|e| format!("bigG: {e}"))?,
    };
    let mut warnings = Vec::new();
    let named: Vec<(&'static str, TextPair)> = ClipTextConfig::named()
        .into_iter()
        .filter(|(_, c)| c.naming == Naming::HfClip)
        .flat_map(|(nl, l)| {
            ClipTextConfig::named()
                .into_iter()
                .filter(|(_, g)| g.naming == Naming::OpenClip)
                .map(move |(ng, g)| {
                    let name = if nl == "clip_l" && ng == "open_clip_bigg" {
                        "sdxl"
                    } else if ng.contains("tiny") && nl.contains("tiny") {
                        "tiny"
                    } else {
                        "mixed"
                    };
                    (
                        name,
                        TextPair {
                            clip_l: l.clone(),
                            clip_g: g,
                        },
                    )
                })
        })
        .collect();
    let (hidden_cfg, hidden) = pick_hidden(
        metadata,
        META_TEXT_CONFIG,
        &pair,
        |a, b| a.clip_l.same_shapes(&b.clip_l) && a.clip_g.same_shapes(&b.clip_g),
        named,
        &mut warnings,
    );
    match hidden_cfg {
        Some(h) => pair = h,
        None => {
            for (name, c) in [("CLIP-L", &mut pair.clip_l), ("bigG", &mut pair.clip_g)] {
                if c.width % DEFAULT_HEAD_CHANNELS != 0 {
                    return Err(format!(
                        "{name}: the head count cannot be read from shapes and CLIP's {DEFAULT_HEAD_CHANNELS}-wide heads do not divide the width {}; a file with other heads needs the {META_TEXT_CONFIG} metadata eps2v writes",
                        c.width
                    ));
                }
                c.heads = c.width / DEFAULT_HEAD_CHANNELS;
                c.activation = match c.naming {
                    Naming::HfClip => Activation::QuickGelu,
                    Naming::OpenClip => Activation::GeluErf,
                };
            }
        }
    }
    for (name, prefix, c) in [
        ("CLIP-L", CLIP_L_MODEL_PREFIX, &pair.clip_l),
        ("bigG", BIGG_MODEL_PREFIX, &pair.clip_g),
    ] {
        c.check().map_err(|e| format!("{name}: {e}"))?;
        let keys =
            record_shapes(|vb| ClipTextModel::new(vb.pp(prefix), c)).map_err(|e| e.to_string())?;
        check_keys(
            &keys,
            shapes,
            &format!("{prefix}."),
            &format!("{name} config"),
        )
        .map_err(|e| format!("{name}: {e}"))?;
    }
    let name = match (pair.clip_l.known_name(), pair.clip_g.known_name()) {
        (Some("clip_l"), Some("open_clip_bigg")) => Some("sdxl"),
        (Some("clip_l_tiny"), Some("open_clip_bigg_tiny32")) => Some("tiny"),
        _ => None,
    };
    Ok(Inferred {
        config: pair,
        name,
        hidden,
        warnings,
    })
}

#[cfg(test)]
#[path = "infer_tests.rs"]
mod tests;
