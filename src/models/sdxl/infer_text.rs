//! Text-encoder config inference: CLIP-L under HF `CLIPTextModel` names
//! and OpenCLIP bigG under open_clip names (width, layers, MLP, vocabulary,
//! positions, projection from shapes; heads and activation from our
//! metadata, a named config with the same shapes, or CLIP's 64-wide heads
//! with quick-GELU / GELU).

use std::collections::BTreeMap;

use super::{
    check_keys, pick_hidden, Inferred, ShapeMap, Sub, TextPair, DEFAULT_HEAD_CHANNELS,
    META_TEXT_CONFIG,
};
use crate::models::sdxl::checkpoint::record_shapes;
use crate::models::sdxl::clip::{
    Activation, ClipTextConfig, ClipTextModel, Naming, BIGG_MODEL_PREFIX, CLIP_L_MODEL_PREFIX,
};

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
                    } else if ng.contains("toy") && nl.contains("toy") {
                        "toy"
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
        (Some("clip_l_toy"), Some("open_clip_bigg_toy")) => Some("toy"),
        _ => None,
    };
    Ok(Inferred {
        config: pair,
        name,
        hidden,
        warnings,
    })
}
