//! `eps2v ckpt info|check` and `eps2v sample` on checkpoints whose configs
//! must be inferred: the sgm-written golden checkpoint (no eps2v metadata)
//! is described, checked and sampled from with no config given; bad files
//! (truncated, SD 1.x / 2.x, the refiner, a LoRA, inconsistent transformer
//! blocks) are described by `info` and refused by `check` with a specific
//! reason and exit code 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use eps2v::models::sdxl::checkpoint::{save_tensors, Checkpoint, SaveOptions};
use eps2v::models::sdxl::UNetConfig;
use eps2v::pipeline::tiny::{write_random_model, TinyOptions};
use eps2v::pipeline::TextConfigs;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eps2v"))
        .args(args)
        .output()
        .unwrap()
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/infer/model.safetensors")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// A file holding `keys` (tiny zero tensors).
fn keys_file(dir: &Path, name: &str, keys: &[(&str, &[usize])]) -> PathBuf {
    let p = dir.join(name);
    let t: Vec<(String, Tensor)> = keys
        .iter()
        .map(|(k, s)| (k.to_string(), zeros(s)))
        .collect();
    save_tensors(&p, &t, &SaveOptions::default()).unwrap();
    p
}

#[test]
fn golden_checkpoint_is_described_checked_and_sampled_with_no_config() {
    let g = golden();
    let g = g.to_str().unwrap();
    let o = run(&["ckpt", "info", g, "--no-hash"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("family      sdxl"), "{t}");
    assert!(
        t.contains("unet        custom (inferred from shapes; GroupNorm groups and head width: sgm/ComfyUI defaults)"),
        "{t}"
    );
    assert!(
        t.contains("transformer depth in [0, 0, 1] out [1, 0, 0, 0, 0]"),
        "{t}"
    );
    assert!(t.contains("proj_in 1×1 conv"), "{t}");
    assert!(t.contains("ch_mult [1, 1, 1] (factor 4)"), "{t}");
    let o = run(&["--json", "ckpt", "check", g]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["unet"]["status"], "inferred");
    assert_eq!(v["unet"]["hidden"]["kind"], "defaults");
    assert_eq!(
        v["unet"]["config"]["num_res_blocks"],
        serde_json::json!([2, 1])
    );
    assert_eq!(v["text"]["config"]["clip_g"]["projection_dim"], 32);

    let out = tempfile::tempdir().unwrap();
    let o = run(&[
        "--json",
        "sample",
        "--model",
        g,
        "--prompt",
        "a red circle",
        "--size",
        "32x48",
        "--steps",
        "2",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = PathBuf::from(r["files"][0].as_str().unwrap());
    let img = image::open(&f).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 48));
}

#[test]
fn bad_files_are_described_by_info_and_refused_by_check_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let te: &[usize] = &[128, 32];
    let conv: &[usize] = &[32, 4, 3, 3];
    let cases: Vec<(PathBuf, &str, &str, &str)> = vec![
        (
            keys_file(
                d,
                "sd15.safetensors",
                &[
                    (
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                        &[8],
                    ),
                    ("model.diffusion_model.input_blocks.0.0.weight", conv),
                    ("model.diffusion_model.time_embed.0.weight", te),
                ],
            ),
            "family      sd1",
            "no model.diffusion_model.label_emb.0.0.weight",
            "found 1.5-style keys cond_stage_model.transformer.*",
        ),
        (
            keys_file(
                d,
                "sd2.safetensors",
                &[
                    ("cond_stage_model.model.ln_final.weight", &[8]),
                    ("model.diffusion_model.input_blocks.0.0.weight", conv),
                ],
            ),
            "family      sd2",
            "unet        cannot infer: missing model.diffusion_model.time_embed.0.weight",
            "Stable Diffusion 2.x",
        ),
        (
            keys_file(
                d,
                "refiner.safetensors",
                &[
                    ("conditioner.embedders.0.model.ln_final.weight", &[8]),
                    ("model.diffusion_model.label_emb.0.0.weight", &[128, 1568]),
                ],
            ),
            "family      sdxl-refiner",
            "text        cannot infer: CLIP-L: missing",
            "SDXL refiner",
        ),
        (
            keys_file(
                d,
                "lora.safetensors",
                &[(
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                    &[4, 8],
                )],
            ),
            "family      lora",
            "component",
            "a LoRA",
        ),
    ];
    for (p, info_needle, info_reason, check_needle) in cases {
        let p = p.to_str().unwrap();
        let o = run(&["ckpt", "info", p, "--no-hash"]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{p}: {t}");
        assert!(
            t.contains(info_needle) && t.contains(info_reason),
            "{p}: {t}"
        );
        // No UNet, no prediction to speak of.
        assert_eq!(
            t.contains("prediction  n/a (no model.diffusion_model.* UNet in this file)"),
            p.ends_with("lora.safetensors"),
            "{p}: {t}"
        );
        let o = run(&["ckpt", "check", p]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{p}: {t}");
        assert!(
            t.contains("not an SDXL checkpoint") && t.contains(check_needle),
            "{p}: {t}"
        );
    }

    // Truncated in the tensor data or in the header: info cannot read it either.
    let bytes = std::fs::read(golden()).unwrap();
    let cut = d.join("cut.safetensors");
    for (len, needle) in [
        (bytes.len() / 2, "file is truncated: tensor "),
        (100, "file is truncated: the header declares"),
    ] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        for cmd in ["info", "check"] {
            let o = run(&["ckpt", cmd, cut.to_str().unwrap()]);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(2), "{t}");
            assert!(t.contains(needle) && t.contains("cut.safetensors"), "{t}");
        }
    }
}

/// A transformer block count that differs between attn1 and attn2.
#[test]
fn inconsistent_transformer_blocks_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.safetensors");
    let cfg = UNetConfig::from_levels(32, vec![1, 2, 4], 2, &[0, 2, 1], 1, 16, 64, 32, 8);
    let vae = eps2v::models::sdxl::VaeConfig::tiny();
    write_random_model(
        &src,
        &cfg,
        &vae,
        &TextConfigs::tiny(),
        TinyOptions::default(),
    )
    .unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let gone = "model.diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.";
    let tensors: Vec<(String, Tensor)> = ck
        .entries()
        .keys()
        .filter(|k| !k.starts_with(gone))
        .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let bad = dir.path().join("bad.safetensors");
    let opts = SaveOptions {
        metadata: ck.metadata().clone(),
        ..Default::default()
    };
    save_tensors(&bad, &tensors, &opts).unwrap();
    let bad = bad.to_str().unwrap();
    let want = "model.diffusion_model.output_blocks.3.1.transformer_blocks.*: inconsistent transformer block count: 2 blocks but attn2 in 1 (model.diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_k.weight is missing)";
    let o = run(&["ckpt", "check", bad]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("cannot infer the UNet config") && t.contains(want),
        "{t}"
    );
    let o = run(&["ckpt", "info", bad, "--no-hash"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("unet        cannot infer: ") && t.contains(want),
        "{t}"
    );
    let out = tempfile::tempdir().unwrap();
    let o = run(&[
        "sample",
        "--model",
        bad,
        "--prompt",
        "x",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains(want), "{t}");
}

/// The golden model's tensors as f32, `fp8` (if given) written as
/// F8_E4M3 zeros and `drop` left out: a safetensors file written by hand
/// (the writer has no fp8).
fn golden_variant(dir: &Path, name: &str, fp8: Option<&str>, drop: &str) -> PathBuf {
    let ck = Checkpoint::open(golden()).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (k, e) in ck.entries() {
        if k.starts_with(drop) {
            continue;
        }
        let start = data.len();
        let dtype = if Some(k.as_str()) == fp8 {
            data.extend(std::iter::repeat_n(0u8, e.shape.iter().product::<usize>()));
            "F8_E4M3"
        } else {
            let t = ck.tensor(k, DType::F32, &Device::Cpu).unwrap();
            for v in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                data.extend(v.to_le_bytes());
            }
            "F32"
        };
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype, "shape": e.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// `check` refuses fp8 weights (the finite scan cannot read them and the
/// model commands refuse them) and says when the file has no VAE.
#[test]
fn check_refuses_fp8_weights_and_says_when_the_vae_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let key = "model.diffusion_model.out.2.weight";
    let fp8 = golden_variant(dir.path(), "fp8.safetensors", Some(key), "-");
    let o = run(&["ckpt", "check", fp8.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("{key} is stored as F8_E4M3")), "{t}");
    let no_vae = golden_variant(dir.path(), "novae.safetensors", None, "first_stage_model.");
    let o = run(&["ckpt", "check", no_vae.to_str().unwrap()]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("check       no VAE in this file"), "{t}");
    // The same in --json, where `check` says what it checked.
    let o = run(&["--json", "ckpt", "check", no_vae.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["check"]["ok"], true, "{v}");
    assert!(
        v["check"]["notes"][0]
            .as_str()
            .unwrap()
            .starts_with("no VAE"),
        "{v}"
    );
    let o = run(&["ckpt", "check", golden().to_str().unwrap()]);
    assert!(!text(&o).contains("no VAE"), "{}", text(&o));
}
