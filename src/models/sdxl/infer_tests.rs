//! Tests of config inference: the SDXL base and SSD-1B key lists (computed
//! from sgm and public per-block depths, not from our modules), round trips
//! of a spread of configs through their key lists, and one specific error
//! per kind of bad file.

use std::collections::BTreeMap;

use super::*;
use crate::models::sdxl::checkpoint::{record_shapes, unet_expected_keys};
use crate::models::sdxl::clip::{
    Activation, ClipTextModel, BIGG_MODEL_PREFIX, CLIP_L_MODEL_PREFIX,
};
use crate::models::sdxl::MiddleBlock;
use crate::models::sdxl::{UNET_PREFIX, VAE_PREFIX};

fn fixture_shapes(name: &str) -> ShapeMap {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            let dims = s
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            (k.to_string(), dims)
        })
        .collect()
}

fn unet_prefix() -> String {
    format!("{UNET_PREFIX}.")
}

fn no_meta() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// The UNet keys of `cfg` as a shape map (what our own save writes).
fn unet_shapes(cfg: &UNetConfig) -> ShapeMap {
    unet_expected_keys(cfg).unwrap().into_iter().collect()
}

fn infer_unet_err(shapes: &ShapeMap) -> String {
    infer_unet(shapes, &unet_prefix(), &no_meta()).unwrap_err()
}

#[test]
fn sdxl_base_key_list_infers_every_sdxl_config_exactly() {
    let shapes = fixture_shapes("sdxl_keys_shapes.tsv");
    let u = infer_unet(&shapes, &unet_prefix(), &no_meta()).unwrap();
    assert_eq!(u.config, UNetConfig::sdxl_base());
    assert_eq!(u.name, Some("sdxl_base"));
    assert_eq!(u.hidden, HiddenSource::Named("sdxl_base"));
    let v = infer_vae(&shapes, &format!("{VAE_PREFIX}."), &no_meta()).unwrap();
    assert_eq!(v.config, VaeConfig::sdxl());
    assert_eq!(v.name, Some("sdxl"));
    let t = infer_text(&shapes, &no_meta()).unwrap();
    assert_eq!(t.config.clip_l, ClipTextConfig::clip_l());
    assert_eq!(t.config.clip_g, ClipTextConfig::open_clip_bigg());
    assert_eq!(t.name, Some("sdxl"));
    check_compatible(&u.config, Some(&t.config), Some(&v.config)).unwrap();
}

/// Without the named match the sgm defaults give the same SDXL values.
#[test]
fn sgm_defaults_are_sdxl_values() {
    let mut shapes = fixture_shapes("sdxl_keys_shapes.tsv");
    // One more input channel (an inpainting UNet): no named config matches.
    for (k, s) in shapes.iter_mut() {
        if k == "model.diffusion_model.input_blocks.0.0.weight" {
            s[1] = 9;
        }
    }
    let u = infer_unet(&shapes, &unet_prefix(), &no_meta()).unwrap();
    assert_eq!(u.hidden, HiddenSource::Defaults);
    assert_eq!(u.name, None);
    assert_eq!(
        u.config,
        UNetConfig {
            in_channels: 9,
            ..UNetConfig::sdxl_base()
        }
    );
}

#[test]
fn ssd_1b_key_list_infers_its_per_block_depths() {
    let shapes = fixture_shapes("ssd_1b_keys_shapes.tsv");
    let u = infer_unet(&shapes, &unet_prefix(), &no_meta()).unwrap();
    let c = &u.config;
    assert_eq!(c.transformer_depth, vec![0, 0, 2, 2, 4, 4]);
    assert_eq!(c.transformer_depth_output, vec![4, 4, 10, 2, 1, 1, 0, 0, 0]);
    assert_eq!(c.middle, MiddleBlock::ResBlockOnly);
    assert_eq!(
        (c.model_channels, &c.channel_mult, &c.num_res_blocks),
        (320, &vec![1, 2, 4], &vec![2, 2, 2])
    );
    assert_eq!((c.context_dim, c.pooled_dim), (2048, 1280));
    assert_eq!(*c, UNetConfig::ssd_1b());
    assert_eq!(u.name, Some("ssd_1b"));
    let params: usize = unet_shapes(c)
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 1_331_334_404);
}

/// A spread of configs: keys of the config (what our save writes, with our
/// metadata) infer back to the same config.
#[test]
fn configs_round_trip_through_their_key_lists() {
    let tiny = UNetConfig::tiny();
    let mut spread = vec![
        UNetConfig::sdxl_base(),
        UNetConfig::ssd_1b(),
        UNetConfig::segmind_vega(),
        tiny.clone(),
        // Other channel multipliers, four levels.
        UNetConfig::from_levels(32, vec![1, 1, 2, 4], 1, &[0, 1, 2, 1], 2, 16, 48, 24, 8),
        // ResBlocks per level differ; no attention at the middle level.
        UNetConfig {
            num_res_blocks: vec![1, 3, 2],
            transformer_depth: vec![0, 1, 2, 1, 3, 0],
            transformer_depth_output: vec![1, 0, 2, 0, 0, 0, 0, 1, 0],
            ..tiny.clone()
        },
        // No middle transformer (sgm disable_middle_transformer), conv proj_in.
        UNetConfig {
            middle: MiddleBlock::NoTransformer,
            use_linear_in_transformer: false,
            ..tiny.clone()
        },
        // No middle block at all (KOALA-700M style), inpainting input.
        UNetConfig {
            middle: MiddleBlock::Absent,
            in_channels: 9,
            ..tiny.clone()
        },
        // Non-32 groups and 8-channel heads: only the metadata can tell.
        UNetConfig {
            num_groups: 4,
            num_head_channels: 8,
            ..UNetConfig::from_levels(16, vec![1, 2], 2, &[1, 1], 1, 16, 32, 8, 4)
        },
    ];
    // Zero attention at a whole level (level 1 of tiny).
    let mut zero = tiny.clone();
    zero.transformer_depth[2..4].copy_from_slice(&[0, 0]);
    zero.transformer_depth_output[3..6].copy_from_slice(&[0, 0, 0]);
    spread.push(zero);
    for cfg in spread {
        let shapes = unet_shapes(&cfg);
        let meta = config_metadata(Some(&cfg), None, None);
        let got =
            infer_unet(&shapes, &unet_prefix(), &meta).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        assert_eq!(got.config, cfg);
        assert_eq!(got.hidden, HiddenSource::Metadata);
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }
}

#[test]
fn vae_configs_round_trip_through_their_key_lists() {
    for cfg in [
        VaeConfig::sdxl(),
        VaeConfig::tiny(),
        VaeConfig {
            ch: 32,
            ch_mult: vec![1, 1, 2],
            num_res_blocks: 1,
            scale_factor: 0.5,
            z_channels: 16,
            embed_dim: 16,
            ..VaeConfig::sdxl()
        },
    ] {
        for prefix in [VAE_PREFIX, ""] {
            let shapes: ShapeMap = vae_expected_keys(&cfg, prefix)
                .unwrap()
                .into_iter()
                .collect();
            let dotted = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}.")
            };
            let meta = config_metadata(None, Some(&cfg), None);
            let got = infer_vae(&shapes, &dotted, &meta).unwrap();
            assert_eq!(got.config, cfg);
        }
    }
}

/// What shapes cannot tell: without metadata a tiny-width model that
/// matches no named config is refused with the reason; a named config with
/// the same shapes lends its values; metadata of another network is ignored
/// with a warning.
#[test]
fn hidden_values_come_from_metadata_named_or_defaults() {
    let odd = UNetConfig {
        num_groups: 4,
        num_head_channels: 8,
        ..UNetConfig::from_levels(16, vec![1, 2], 2, &[1, 1], 1, 16, 32, 8, 4)
    };
    let e = infer_unet_err(&unet_shapes(&odd));
    assert!(
        e.contains("GroupNorm group count cannot be read from shapes")
            && e.contains("width 16")
            && e.contains(META_UNET_CONFIG),
        "{e}"
    );
    // Widths that 32 groups divide, heads that 64 does not.
    let heads = UNetConfig::from_levels(32, vec![1, 2], 1, &[1, 1], 1, 16, 32, 8, 32);
    let e = infer_unet_err(&unet_shapes(&heads));
    assert!(
        e.contains("head width cannot be read") && e.contains("input_blocks.1.1's width 32"),
        "{e}"
    );
    // The tiny shapes borrow tiny's groups (8) and heads (16).
    let t = infer_unet(
        &unet_shapes(&UNetConfig::tiny()),
        &unet_prefix(),
        &no_meta(),
    )
    .unwrap();
    assert_eq!(t.config, UNetConfig::tiny());
    assert_eq!(t.hidden, HiddenSource::Named("tiny"));
    // Metadata of another network: ignored, said so.
    let meta = config_metadata(Some(&UNetConfig::sdxl_base()), None, None);
    let t = infer_unet(&unet_shapes(&UNetConfig::tiny()), &unet_prefix(), &meta).unwrap();
    assert_eq!(t.hidden, HiddenSource::Named("tiny"));
    assert!(
        t.warnings[0].contains("different network"),
        "{:?}",
        t.warnings
    );
    let mut meta = BTreeMap::new();
    meta.insert(META_UNET_CONFIG.to_string(), "{not json".to_string());
    let t = infer_unet(&unet_shapes(&UNetConfig::tiny()), &unet_prefix(), &meta).unwrap();
    assert!(t.warnings[0].contains("not a config"), "{:?}", t.warnings);
}

fn tiny_shapes() -> ShapeMap {
    unet_shapes(&UNetConfig::from_levels(
        32,
        vec![1, 2, 4],
        2,
        &[0, 2, 1],
        1,
        16,
        64,
        32,
        8,
    ))
}

fn without(mut s: ShapeMap, pat: &str) -> ShapeMap {
    s.retain(|k, _| !k.contains(pat));
    s
}

#[test]
fn inconsistent_unet_files_get_specific_errors() {
    let p = "model.diffusion_model.";
    // A transformer block count that differs between attn1 and attn2.
    let s = without(
        tiny_shapes(),
        "input_blocks.4.1.transformer_blocks.1.attn2.",
    );
    let e = infer_unet_err(&s);
    assert!(
        e.contains("inconsistent transformer block count: 2 blocks but attn2 in 1")
            && e.contains(&format!(
                "{p}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight is missing"
            )),
        "{e}"
    );
    // Regression: a crafted file with zero channels divided by zero.
    let mut s = tiny_shapes();
    for (k, v) in s.iter_mut() {
        if k.ends_with("input_blocks.0.0.weight") {
            v[0] = 0;
        }
    }
    let e = infer_unet_err(&s);
    assert!(e.contains("input_blocks.0.0.weight is [0,"), "{e}");
    // A gap in the block numbering.
    let s = without(tiny_shapes(), "output_blocks.4.");
    let e = infer_unet_err(&s);
    assert!(e.contains("output_blocks.4.* is missing but"), "{e}");
    // A missing upsampler.
    let s = without(tiny_shapes(), "output_blocks.5.2.conv");
    let e = infer_unet_err(&s);
    assert!(
        e.contains("missing model.diffusion_model.output_blocks.5.2.conv.weight")
            && e.contains("level 1 upsamples"),
        "{e}"
    );
    // A context width that differs between two transformers.
    let mut s = tiny_shapes();
    for (k, v) in s.iter_mut() {
        if k.contains("output_blocks.0.1.transformer_blocks.0.attn2.to_k") {
            v[1] = 77;
        }
    }
    let e = infer_unet_err(&s);
    assert!(
        e.contains("output_blocks.0.1 attends to a 77-wide context but")
            && e.contains("input_blocks.4.1 to 64"),
        "{e}"
    );
    // A stray key the inferred config does not request.
    let mut s = tiny_shapes();
    s.insert(format!("{p}input_blocks.1.0.extra.weight"), vec![3]);
    let e = infer_unet_err(&s);
    assert!(
        e.contains("does not account for every tensor")
            && e.contains("unexpected model.diffusion_model.input_blocks.1.0.extra.weight"),
        "{e}"
    );
    // A shape that breaks the chain of widths.
    let mut s = tiny_shapes();
    for (k, v) in s.iter_mut() {
        if k.ends_with("input_blocks.2.0.in_layers.2.weight") {
            v[1] = 16;
        }
    }
    let e = infer_unet_err(&s);
    assert!(
        e.contains(
            "input_blocks.2.0.in_layers.2.weight takes 16 channels but the block before gives 32"
        ),
        "{e}"
    );
}

#[test]
fn other_families_are_named_by_their_missing_parts() {
    let p = "model.diffusion_model.";
    // SD 1.x / 2.x UNets have no label_emb.
    let s = without(tiny_shapes(), "label_emb");
    let e = infer_unet_err(&s);
    assert!(
        e.contains("no model.diffusion_model.label_emb.0.0.weight")
            && e.contains("not SDXL-family"),
        "{e}"
    );
    // A UNet-less file.
    let mut s = ShapeMap::new();
    s.insert("lora_unet_down_blocks_0.alpha".into(), vec![]);
    assert!(infer_unet_err(&s).contains("no UNet"));
    // The refiner's text side has no CLIP-L.
    let mut s = ShapeMap::new();
    s.insert(
        "conditioner.embedders.0.model.token_embedding.weight".into(),
        vec![49408, 1280],
    );
    let e = infer_text(&s, &no_meta()).unwrap_err();
    assert!(
        e.contains("CLIP-L: missing conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"),
        "{e}"
    );
    // A label_emb without the six size embeddings.
    let mut s = tiny_shapes();
    s.insert(format!("{p}label_emb.0.0.weight"), vec![128, 1000]);
    let e = infer_unet_err(&s);
    assert!(e.contains("six 256-d size embeddings"), "{e}");
}

#[test]
fn text_configs_infer_and_round_trip() {
    // Heads and activation from metadata: a CLIP-L-named encoder with GELU
    // and 2 heads at width 48.
    let l = ClipTextConfig {
        width: 48,
        heads: 2,
        layers: 2,
        intermediate: 96,
        activation: Activation::GeluErf,
        ..ClipTextConfig::clip_l()
    };
    let g = ClipTextConfig {
        width: 24,
        heads: 3,
        layers: 3,
        intermediate: 40,
        projection_dim: Some(16),
        max_positions: 80,
        ..ClipTextConfig::open_clip_bigg()
    };
    let mut shapes: ShapeMap =
        record_shapes(|vb| ClipTextModel::new(vb.pp(CLIP_L_MODEL_PREFIX), &l))
            .unwrap()
            .into_iter()
            .collect();
    shapes.extend(record_shapes(|vb| ClipTextModel::new(vb.pp(BIGG_MODEL_PREFIX), &g)).unwrap());
    let meta = config_metadata(None, None, Some((&l, &g)));
    let t = infer_text(&shapes, &meta).unwrap();
    assert_eq!((t.config.clip_l.clone(), t.config.clip_g.clone()), (l, g));
    assert_eq!(t.hidden, HiddenSource::Metadata);
    assert_eq!(t.config.unet_dims(), (72, 16));
    // Without metadata the 64-wide CLIP heads do not divide 48.
    let e = infer_text(&shapes, &no_meta()).unwrap_err();
    assert!(e.contains("CLIP-L: the head count cannot be read"), "{e}");
    // A missing bigG layer part is named.
    let s = without(shapes, "transformer.resblocks.1.mlp.c_proj.bias");
    let e = infer_text(&s, &meta).unwrap_err();
    assert!(
        e.contains("bigG:")
            && e.contains(
                "missing conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias"
            ),
        "{e}"
    );
}

#[test]
fn parts_that_do_not_fit_are_refused() {
    let u = UNetConfig::tiny();
    let t = TextPair {
        clip_l: ClipTextConfig::clip_l_tiny(),
        clip_g: ClipTextConfig::open_clip_bigg_tiny(),
    };
    let e = check_compatible(&u, Some(&t), None).unwrap_err();
    assert!(
        e.contains("context 72 (32 + 40) / pooled 40") && e.contains("64 / 32"),
        "{e}"
    );
    let v = VaeConfig {
        z_channels: 16,
        embed_dim: 16,
        ..VaeConfig::tiny()
    };
    let e = check_compatible(&u, None, Some(&v)).unwrap_err();
    assert!(e.contains("16 latent channels"), "{e}");
    let inpaint = UNetConfig {
        in_channels: 9,
        ..u.clone()
    };
    let e = check_compatible(&inpaint, None, None).unwrap_err();
    assert!(
        e.contains("takes 9 input channels but predicts 4") && e.contains("inpainting"),
        "{e}"
    );
}
