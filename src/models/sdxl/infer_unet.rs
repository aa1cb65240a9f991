//! UNet config inference: walk `input_blocks` (levels split at the `0.op`
//! downsamplers, widths from the ResBlocks, transformer depth per block),
//! classify the middle block, pair every output block with its level and
//! check its channels, skip width and upsampler; every transformer must
//! agree on context width and projection kind. See [`super`] for the rules
//! on what shapes cannot tell.

use super::{
    check_keys, pick_hidden, Inferred, ShapeMap, Sub, DEFAULT_GROUPS, DEFAULT_HEAD_CHANNELS,
    META_UNET_CONFIG,
};
use crate::models::sdxl::checkpoint::unet_expected_keys;
use crate::models::sdxl::config::{MiddleBlock, UNetConfig, SIZE_COND_COUNT, SIZE_EMBED_DIM};
use std::collections::BTreeMap;

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
    if mc == 0 || in_channels == 0 || mc > 1 << 20 {
        return Err(format!(
            "{prefix}input_blocks.0.0.weight is {conv_in:?}: no UNet has that many channels"
        ));
    }
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
