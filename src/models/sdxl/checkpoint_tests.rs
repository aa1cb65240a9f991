//! Tests of the checkpoint reader, validation, markers and save.

use super::*;

fn golden_unet_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/sdxl/unet_weights.safetensors")
}

/// The golden UNet config (see models/sdxl/tests.rs).
fn cfg() -> UNetConfig {
    UNetConfig {
        model_channels: 8,
        num_head_channels: 8,
        context_dim: 16,
        pooled_dim: 8,
        num_groups: 4,
        ..UNetConfig::tiny()
    }
}

fn golden_tensors() -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = candle_core::safetensors::load(golden_unet_path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> PathBuf {
    let p = dir.join(name);
    save_tensors(&p, tensors, &SaveOptions::default()).unwrap();
    p
}

fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Model(_) | Error::Candle(_)), "{e:?}");
    assert_eq!(e.exit_code(), 2);
    e.to_string()
}

#[test]
fn valid_golden_file_passes_checks() {
    let ckpt = Checkpoint::open(golden_unet_path()).unwrap();
    assert_eq!(ckpt.family(), Family::SdxlUnet);
    ckpt.check_sdxl(&cfg(), None).unwrap();
    ckpt.check_finite("").unwrap();
    let p = ckpt.prediction();
    assert_eq!((p.prediction, p.ztsnr), (Prediction::Epsilon, false));
    assert!(p.source.contains("modelspec"), "{}", p.source);
}

#[test]
fn truncated_file_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(golden_unet_path()).unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(
        e.contains("truncated") && e.contains("cut.safetensors"),
        "{e}"
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn bad_headers_give_clear_errors_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    // Crafted huge header length: refused before any read of that size.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(
        e.contains("bad safetensors header") && e.contains("limit"),
        "{e}"
    );
    // Header length beyond the end of the file.
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("truncated"), "{e}");
    // Invalid JSON.
    let mut b = 8u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{not js}");
    std::fs::write(&p, &b).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("bad safetensors header: invalid JSON"), "{e}");
    // Byte ranges that do not match dtype × shape: a plain mismatch, and a
    // shape whose byte count overflows with a reversed range (both sizes
    // unknown must not pass as equal: the range would panic a read later).
    for h in [
        br#"{"a":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,4]}}"#.as_slice(),
        br#"{"a":{"dtype":"F32","shape":[18446744073709551615,8],"data_offsets":[4,0]}}"#,
    ] {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&[0; 4]);
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains("wrong size") && e.contains("tensor a"), "{e}");
    }
    // Regression: ranges were checked one by one, so aliased ones passed
    // (a 4-byte file could claim any number of tensors on the same bytes),
    // as did gaps, trailing bytes and non-string metadata.
    for (h, data, want) in [
        (
            br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.as_slice(),
            4,
            "overlapping",
        ),
        (
            br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "a gap",
        ),
        (
            br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            6,
            "2 bytes after the last tensor",
        ),
        (
            br#"{"__metadata__":{"eps2v.ztsnr":true},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
            "__metadata__.eps2v.ztsnr is not a string",
        ),
    ] {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&p, &b).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains(want) && e.contains("bad.safetensors"), "{want}: {e}");
    }
    // Zero-size tensors (markers) sit anywhere in the tiling.
    let h = br#"{"v_pred":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(h);
    b.extend_from_slice(&[0; 4]);
    std::fs::write(&p, &b).unwrap();
    Checkpoint::open(&p).unwrap();
}

/// Regression: the refiner's UNet without its text encoders passed as an
/// SDXL UNet (its adm is 2560, not 2816).
#[test]
fn a_refiner_unet_alone_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let label = "model.diffusion_model.label_emb.0.0.weight";
    for (adm, family) in [(2560, Family::SdxlRefiner), (2816, Family::SdxlUnet)] {
        let t = Tensor::zeros((2, adm), DType::F32, &Device::Cpu).unwrap();
        let p = write(
            dir.path(),
            &format!("{adm}.safetensors"),
            &[(label.into(), t)],
        );
        assert_eq!(Checkpoint::open(&p).unwrap().family(), family);
    }
}

#[test]
fn sd15_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let p = write(
        dir.path(),
        "sd15.safetensors",
        &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                t.clone(),
            ),
            ("model.diffusion_model.input_blocks.0.0.weight".into(), t),
        ],
    );
    let ckpt = Checkpoint::open(&p).unwrap();
    assert_eq!(ckpt.family(), Family::Sd1);
    let e = err_of(ckpt.check_sdxl(&UNetConfig::sdxl_base(), Some(&VaeConfig::sdxl())));
    assert!(
        e.contains("not an SDXL checkpoint") && e.contains("1.5-style"),
        "{e}"
    );
}

#[test]
fn other_families_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    for (key, family) in [
        ("lora_unet_down_blocks_0_attentions_0.alpha", Family::Lora),
        ("cond_stage_model.model.ln_final.weight", Family::Sd2),
        ("down_blocks.0.resnets.0.conv1.weight", Family::Diffusers),
        ("something.else", Family::Unknown),
    ] {
        let p = write(dir.path(), "f.safetensors", &[(key.into(), t.clone())]);
        assert_eq!(Checkpoint::open(&p).unwrap().family(), family, "{key}");
    }
    // A diffusers folder.
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let e = err_of(Checkpoint::open(dir.path()));
    assert!(e.contains("diffusers model folder"), "{e}");
    // A missing file: what to give, and where a relative path is looked for.
    let e = err_of(Checkpoint::open("no/such/model.safetensors"));
    assert!(
        e.starts_with("no/such/model.safetensors: no such file; give the path of a single-file .safetensors checkpoint (relative paths are from the current folder, "),
        "{e}"
    );
    let e = err_of(Checkpoint::open(dir.path().join("gone.safetensors")));
    assert!(e.ends_with("gone.safetensors: no such file; give the path of a single-file .safetensors checkpoint"), "{e}");
}

#[test]
fn missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = golden_tensors();
    ts.retain(|(k, _)| k != "model.diffusion_model.out.2.weight");
    let p = write(dir.path(), "m.safetensors", &ts);
    let ckpt = Checkpoint::open(&p).unwrap();
    let e = err_of(ckpt.check_sdxl(&cfg(), None));
    assert!(
        e.contains("missing 1 key (model.diffusion_model.out.2.weight)"),
        "{e}"
    );
    let e = err_of(ckpt.load_unet(&cfg(), DType::F32, &Device::Cpu));
    assert!(e.contains("missing 1 key"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = golden_tensors();
    for (k, t) in ts.iter_mut() {
        if k == "model.diffusion_model.time_embed.0.weight" {
            *t = t.t().unwrap().contiguous().unwrap();
        }
    }
    let p = write(dir.path(), "s.safetensors", &ts);
    let e = err_of(Checkpoint::open(&p).unwrap().check_sdxl(&cfg(), None));
    assert!(
        e.contains("1 tensor with the wrong shape")
            && e.contains("time_embed.0.weight expected [32, 8] found [8, 32]"),
        "{e}"
    );
}

#[test]
fn nan_weights_are_refused_on_check_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = golden_tensors();
    for (k, t) in ts.iter_mut() {
        if k == "model.diffusion_model.middle_block.1.proj_in.weight" {
            let mut v = t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
            v[3] = half::f16::NAN;
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    let p = write(dir.path(), "n.safetensors", &ts);
    let ckpt = Checkpoint::open(&p).unwrap();
    ckpt.check_sdxl(&cfg(), None).unwrap();
    let e = err_of(ckpt.check_finite(""));
    assert!(
        e.contains("middle_block.1.proj_in.weight contains NaN") && e.contains("element 3"),
        "{e}"
    );
    let e = err_of(ckpt.load_unet(&cfg(), DType::F32, &Device::Cpu));
    assert!(e.contains("contains NaN"), "{e}");
}

#[test]
fn pickle_and_fp8_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.ckpt");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("convert to safetensors"), "{e}");
    let p = dir.path().join("renamed.safetensors");
    std::fs::write(&p, b"PK\x03\x04 some zip archive").unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("convert to safetensors"), "{e}");

    let h = br#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(h);
    b.extend_from_slice(&[0x38, 0x40]);
    let p = dir.path().join("fp8.safetensors");
    std::fs::write(&p, &b).unwrap();
    let ckpt = Checkpoint::open(&p).unwrap();
    let e = err_of(ckpt.tensor("w", DType::F32, &Device::Cpu));
    assert!(e.contains("F8_E4M3") && e.contains("fp8"), "{e}");
}

#[test]
fn save_round_trips_markers_dtype_and_replacements() {
    let dir = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(golden_unet_path()).unwrap();
    let key = "model.diffusion_model.out.2.bias";
    let new_bias = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
    let replacements = HashMap::from([(key.to_string(), new_bias.clone())]);
    let opts = SaveOptions {
        dtype: Some(DType::BF16),
        v_pred: true,
        ztsnr: true,
        metadata: BTreeMap::from([(META_PREDICTION_TYPE.to_string(), "v".to_string())]),
    };
    let out = dir.path().join("v.safetensors");
    src.save_with(&out, &replacements, &opts).unwrap();
    let v = Checkpoint::open(&out).unwrap();
    let p = v.prediction();
    assert_eq!((p.prediction, p.ztsnr), (Prediction::V, true));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(v.entries().len(), src.entries().len() + 2);
    assert!(v
        .entries()
        .values()
        .filter(|e| e.numel() > 0)
        .all(|e| e.dtype == "BF16"));
    assert_eq!(v.metadata()["modelspec.architecture"], "eps2v-golden-sdxl");
    let got = v.tensor(key, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(got.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    v.check_sdxl(&cfg(), None).unwrap();
    // No temp file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // Back to epsilon: markers off, f32.
    let out2 = dir.path().join("eps.safetensors");
    let opts = SaveOptions {
        dtype: Some(DType::F32),
        metadata: BTreeMap::from([(META_PREDICTION_TYPE.to_string(), "epsilon".to_string())]),
        ..Default::default()
    };
    v.save_with(&out2, &HashMap::new(), &opts).unwrap();
    let e = Checkpoint::open(&out2).unwrap();
    assert_eq!(e.prediction().prediction, Prediction::Epsilon);
    assert!(e.prediction().warnings.is_empty());
    // A value that is neither is said, and not used.
    let odd = dir.path().join("odd.safetensors");
    let opts = SaveOptions {
        metadata: BTreeMap::from([(META_PREDICTION_TYPE.to_string(), "garbage".to_string())]),
        ..Default::default()
    };
    e.save_with(&odd, &HashMap::new(), &opts).unwrap();
    let p = Checkpoint::open(&odd).unwrap().prediction();
    assert_eq!(p.prediction, Prediction::Epsilon);
    assert!(
        p.warnings.len() == 1 && p.warnings[0].contains("\"garbage\" is neither"),
        "{:?}",
        p.warnings
    );
    assert!(!e.contains(MARKER_V_PRED) && !e.contains(MARKER_ZTSNR));
    assert_eq!(e.entry(key).unwrap().dtype, "F32");
    // Wrong replacement shape is refused.
    let bad = HashMap::from([(
        key.to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    )]);
    let err = err_of(src.save_with(
        dir.path().join("x.safetensors"),
        &bad,
        &SaveOptions::default(),
    ));
    assert!(err.contains("replacement") && err.contains("[3]"), "{err}");
    // A base with EDM's keys (CosXL): they go, or ComfyUI would read them
    // before `v_pred` and sample the export as EDM.
    let edm = dir.path().join("edm.safetensors");
    let one = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    save_tensors(
        &edm,
        &[
            (key.to_string(), new_bias.clone()),
            ("edm_vpred.sigma_max".to_string(), one.clone()),
            ("edm_mean".to_string(), one),
        ],
        &SaveOptions::default(),
    )
    .unwrap();
    let out3 = dir.path().join("from-edm.safetensors");
    let opts = SaveOptions {
        v_pred: true,
        ztsnr: true,
        ..Default::default()
    };
    Checkpoint::open(&edm)
        .unwrap()
        .save_with(&out3, &HashMap::new(), &opts)
        .unwrap();
    let x = Checkpoint::open(&out3).unwrap();
    assert!(x.contains(MARKER_V_PRED) && x.contains(MARKER_ZTSNR) && x.contains(key));
    assert!(!x.entries().keys().any(|k| k.starts_with("edm")));
}

#[test]
fn text_encoder_reference_keys_are_complete() {
    let keys = sdxl_text_encoder_keys();
    assert_eq!(keys.len(), 586);
    let params: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(params, 123_060_480 + 694_659_841);
}

#[test]
fn autov2_is_first_ten_hex_of_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("abc");
    std::fs::write(&p, b"abc").unwrap();
    let sha = sha256_file(&p).unwrap();
    assert_eq!(
        sha,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(autov2(&sha), "ba7816bf8f");
    // Remembered per file version, not per path: a file replaced by
    // rename (as every eps2v write is) or grown in place hashes anew.
    assert_eq!(sha256_file(&p).unwrap(), sha);
    let tmp = dir.path().join("abd");
    std::fs::write(&tmp, b"abd").unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "a52d159f262b2c6ddb724a61840befc36eb30c88877a4030b65cbe86298449c9"
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"e"))
        .unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "7b892b4a649355685c6abe7727ecc6a519227042b0c7c59c6fb68633ee49de0c"
    );
}

#[test]
fn info_counts_components() {
    let ckpt = Checkpoint::open(golden_unet_path()).unwrap();
    let info = ckpt.info(true).unwrap();
    assert_eq!(info.components.len(), 1);
    let unet = &info.components[0];
    assert_eq!(unet.name, "unet");
    assert_eq!(unet.tensors, 500);
    assert_eq!(unet.parameters, 437_588);
    assert_eq!(info.dtypes["F16"], 500);
    assert_eq!(info.autov2.as_deref().map(str::len), Some(10));
}

#[test]
fn saving_as_f16_what_f16_cannot_hold_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let t = Tensor::new(&[1.0f32, 70000.0], &Device::Cpu).unwrap();
    let opts = SaveOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let e = err_of(save_tensors(
        &p,
        &[("model.diffusion_model.x".into(), t.clone())],
        &opts,
    ));
    assert!(
        e.contains("model.diffusion_model.x does not fit in f16")
            && e.contains("element 1 is 70000")
            && e.contains("bf16"),
        "{e}"
    );
    assert!(!p.exists());
    // A NaN is not an overflow: no dtype saves it, and the error says so.
    let nan = Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap();
    let e = err_of(save_tensors(
        &p,
        &[("model.diffusion_model.x".into(), nan)],
        &opts,
    ));
    assert!(
        e.contains("model.diffusion_model.x holds NaN (element 1)") && !e.contains("bf16"),
        "{e}"
    );
    assert!(!p.exists());
    // bf16 holds it; f16 holds 65504.
    let bf = SaveOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    save_tensors(&p, &[("x".into(), t)], &bf).unwrap();
    let edge = Tensor::new(&[65504.0f32, -65504.0], &Device::Cpu).unwrap();
    save_tensors(&p, &[("x".into(), edge)], &opts).unwrap();
}

/// Families from mixed or damaged key sets: a stray LoRA key beside a full
/// model, SDXL text encoders beside a UNet without `label_emb`, LyCORIS;
/// an unrecognised file says what its keys suggest.
#[test]
fn mixed_and_damaged_key_sets_get_the_right_family() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let unet = "model.diffusion_model.input_blocks.0.0.weight";
    let label = "model.diffusion_model.label_emb.0.0.weight";
    let te = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight";
    let case = |keys: &[&str]| {
        let ts: Vec<(String, Tensor)> = keys.iter().map(|k| (k.to_string(), t.clone())).collect();
        let p = write(dir.path(), "f.safetensors", &ts);
        Checkpoint::open(&p).unwrap()
    };
    assert_eq!(
        case(&[unet, label, te, "lora_te1_foo.alpha"]).family(),
        Family::Sdxl
    );
    assert_eq!(case(&[unet, te]).family(), Family::Sdxl);
    assert_eq!(case(&["lycoris_foo.lokr_w1"]).family(), Family::Lora);
    assert_eq!(case(&["lora_unet_foo.alpha"]).family(), Family::Lora);
    // A PEFT LoRA named after the LDM UNet's keys is still a LoRA.
    assert_eq!(
        case(&["model.diffusion_model.input_blocks.4.1.proj_in.lora_A.weight"]).family(),
        Family::Lora
    );
    for (keys, hint) in [
        (&["model.diffusion_model.joint_blocks.0.x"][..], "SD3"),
        (&["double_blocks.0.img_attn.qkv.weight"][..], "Flux"),
        (
            &["input_blocks.0.0.weight"][..],
            "without the `model.diffusion_model.` prefix",
        ),
        (&[unet][..], "without SDXL's label_emb"),
    ] {
        let ck = case(keys);
        assert_eq!(ck.family(), Family::Unknown, "{keys:?}");
        assert!(
            ck.describe_family().contains(hint),
            "{}",
            ck.describe_family()
        );
    }
    assert_eq!(
        case(&["something.else"]).describe_family(),
        "an unrecognised set of keys"
    );
}

/// Files that are not safetensors say what they are and what to do.
#[test]
fn non_safetensors_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (content, want) in [
        (
            &b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 6938078334\n"[..],
            "Git LFS pointer",
        ),
        (
            &b"<!DOCTYPE html><html><body>Sign in</body></html>"[..],
            "HTML/XML page",
        ),
        (
            &b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00"[..],
            "GGUF file",
        ),
        (
            &b"  {\"_class_name\": \"UNet2DConditionModel\"}"[..],
            "JSON text",
        ),
    ] {
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, content).unwrap();
        let e = err_of(Checkpoint::open(&p));
        assert!(e.contains(want), "{want}: {e}");
    }
    // A truncated real file whose header length starts with the byte of
    // `{` (0x17B) is truncated, not JSON.
    let p = dir.path().join("m.safetensors");
    let mut b = 0x17Bu64.to_le_bytes().to_vec();
    b.extend_from_slice(br#"{"a":{"dtype":"F32","shape":[1],"#);
    std::fs::write(&p, &b).unwrap();
    let e = err_of(Checkpoint::open(&p));
    assert!(e.contains("file is truncated"), "{e}");
    #[cfg(unix)]
    {
        let link = dir.path().join("link.safetensors");
        std::os::unix::fs::symlink(dir.path().join("nowhere.safetensors"), &link).unwrap();
        let e = err_of(Checkpoint::open(&link));
        assert!(
            e.contains("a broken link (to ") && e.contains("nowhere.safetensors"),
            "{e}"
        );
        let fifo = dir.path().join("fifo.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = err_of(Checkpoint::open(&fifo));
        assert!(e.contains("not a regular file"), "{e}");
    }
}
