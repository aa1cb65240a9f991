use super::*;
use crate::models::sdxl::checkpoint::save_tensors;
use candle_core::Device;

fn ckpt(dir: &Path, name: &str, unet: &[f32], te: f32, v: bool) -> PathBuf {
    let p = dir.join(name);
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
    let tensors = vec![
        (
            format!("{UNET_PREFIX}.input_blocks.0.0.weight"),
            t(&unet[0..2]),
        ),
        (format!("{UNET_PREFIX}.middle_block.0.x"), t(&unet[2..4])),
        (format!("{UNET_PREFIX}.out.2.weight"), t(&unet[4..6])),
        (
            "conditioner.embedders.0.transformer.w".to_string(),
            t(&[te, te]),
        ),
        ("first_stage_model.w".to_string(), t(&[te * 10.0])),
    ];
    let mut metadata = BTreeMap::new();
    metadata.insert(
        META_PREDICTION_TYPE.into(),
        if v { "v" } else { "epsilon" }.into(),
    );
    save_tensors(
        &p,
        &tensors,
        &SaveOptions {
            dtype: Some(DType::F32),
            v_pred: v,
            ztsnr: v,
            metadata,
        },
    )
    .unwrap();
    p
}

fn read(p: &Path, key: &str) -> Vec<f32> {
    Checkpoint::open(p)
        .unwrap()
        .tensor(key, DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn cfg(a: &Path, b: &Path) -> MergeConfig {
    MergeConfig {
        a: a.into(),
        b: b.into(),
        c: None,
        alpha: 0.25,
        blocks: BlockAlphas::default(),
        te: Side::A,
        vae: Side::A,
        markers: Some(Side::A),
        dtype: None,
    }
}

#[test]
fn weighted_sum_add_difference_and_block_alphas_element_wise() {
    let d = tempfile::tempdir().unwrap();
    let a = ckpt(
        d.path(),
        "a.safetensors",
        &[1., 2., 3., 4., 5., 6.],
        1.0,
        false,
    );
    let b = ckpt(
        d.path(),
        "b.safetensors",
        &[5., 6., 7., 8., 9., 10.],
        2.0,
        true,
    );
    let c = ckpt(
        d.path(),
        "c.safetensors",
        &[1., 1., 1., 1., 1., 1.],
        3.0,
        false,
    );
    let k_in = format!("{UNET_PREFIX}.input_blocks.0.0.weight");
    let k_mid = format!("{UNET_PREFIX}.middle_block.0.x");
    let k_out = format!("{UNET_PREFIX}.out.2.weight");
    // (1 − 0.25)·A + 0.25·B
    let out = d.path().join("m.safetensors");
    let r = merge(&cfg(&a, &b), &out).unwrap();
    assert_eq!(read(&out, &k_in), vec![2.0, 3.0]);
    assert_eq!(read(&out, &k_out), vec![6.0, 7.0]);
    assert_eq!((r.blended, r.copied, r.v_pred), (3, 2, false));
    assert_eq!(
        read(&out, "conditioner.embedders.0.transformer.w"),
        vec![1.0, 1.0]
    );
    // Per-block: M00 = 1 (all B), OUT08 (= out.*) = 0 (all A).
    let mut c2 = cfg(&a, &b);
    c2.blocks = BlockAlphas::parse("M00=1, OUT00-OUT08=0").unwrap();
    c2.te = Side::B;
    c2.vae = Side::B;
    c2.markers = Some(Side::B);
    let r = merge(&c2, &out).unwrap();
    assert_eq!(read(&out, &k_mid), vec![7.0, 8.0]);
    assert_eq!(read(&out, &k_out), vec![5.0, 6.0]);
    assert_eq!(read(&out, &k_in), vec![2.0, 3.0]);
    assert_eq!(read(&out, "first_stage_model.w"), vec![20.0]);
    assert!(r.v_pred && r.ztsnr);
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.prediction().prediction.name(), "v");
    // A + 0.5·(B − C)
    let mut c3 = cfg(&a, &b);
    c3.c = Some(c.clone());
    c3.alpha = 0.5;
    merge(&c3, &out).unwrap();
    assert_eq!(read(&out, &k_in), vec![3.0, 4.5]);
    assert_eq!(read(&out, &k_out), vec![9.0, 10.5]);
}

#[test]
fn markers_must_be_chosen_when_predictions_differ_and_weights_must_be_float() {
    let d = tempfile::tempdir().unwrap();
    let u = [1., 2., 3., 4., 5., 6.];
    let eps = ckpt(d.path(), "eps.safetensors", &u, 1.0, false);
    let eps2 = ckpt(d.path(), "eps2.safetensors", &u, 2.0, false);
    let v = ckpt(d.path(), "v.safetensors", &u, 3.0, true);
    let out = d.path().join("m.safetensors");
    let unmarked = |a: &Path, b: &Path| MergeConfig {
        markers: None,
        ..cfg(a, b)
    };
    // Alike: A's markers, no question asked.
    let r = merge(&unmarked(&eps, &eps2), &out).unwrap();
    assert!(!r.v_pred && r.warnings.is_empty(), "{r:?}");
    // eps + v without --markers: refused, naming both, and nothing written.
    std::fs::remove_file(&out).unwrap();
    let e = merge(&unmarked(&eps, &v), &out).unwrap_err().to_string();
    assert!(
        e.contains("is epsilon but B") && e.contains("is v + ZTSNR") && e.contains("--markers"),
        "{e}"
    );
    assert!(!out.exists());
    // The add-difference transplant (eps + (v − eps base)) points at B.
    let mut diff = unmarked(&eps2, &v);
    diff.c = Some(eps.clone());
    let e = merge(&diff, &out).unwrap_err().to_string();
    assert!(e.contains("--markers b"), "{e}");
    diff.markers = Some(Side::B);
    assert!(merge(&diff, &out).unwrap().v_pred);
    // --te b from a B without text encoders.
    let bare = d.path().join("bare.safetensors");
    let t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
    save_tensors(
        &bare,
        &[
            (format!("{UNET_PREFIX}.input_blocks.0.0.weight"), t(2)),
            (format!("{UNET_PREFIX}.middle_block.0.x"), t(2)),
            (format!("{UNET_PREFIX}.out.2.weight"), t(2)),
        ],
        &SaveOptions::default(),
    )
    .unwrap();
    let mut te_b = cfg(&eps, &bare);
    te_b.te = Side::B;
    let e = merge(&te_b, &out).unwrap_err().to_string();
    assert!(
        e.contains("--te b") && e.contains("no text encoders"),
        "{e}"
    );
    // A UNet stored in a dtype merge cannot blend (fp8 and the like) is
    // an error naming it, not a file without that tensor; an integer
    // buffer such as position_ids is left out and listed.
    let odd = d.path().join("odd.safetensors");
    let ids = Tensor::from_slice(&[0u8, 1], 2, &Device::Cpu).unwrap();
    save_tensors(
        &odd,
        &[
            (
                format!("{UNET_PREFIX}.input_blocks.0.0.weight"),
                ids.clone(),
            ),
            (format!("{UNET_PREFIX}.middle_block.0.x"), t(2)),
            (format!("{UNET_PREFIX}.out.2.weight"), t(2)),
            (
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
                    .to_string(),
                ids,
            ),
        ],
        &SaveOptions::default(),
    )
    .unwrap();
    let e = merge(&cfg(&odd, &eps), &out).unwrap_err().to_string();
    assert!(e.contains("input_blocks.0.0.weight as U8"), "{e}");
    let r = merge(&cfg(&eps, &odd), &out);
    assert!(r.unwrap_err().to_string().contains("as U8"));
    // From A's side: the TE's position_ids left out, and said.
    let mut ok = cfg(&eps, &eps2);
    ok.a = eps2.clone();
    let r = merge(&ok, &out).unwrap();
    assert!(r.skipped.is_empty());
}

/// Regression: the blend was rounded to A's stored dtype before the
/// save's own conversion (an f16 A merged into an f32 file kept f16
/// precision, and f16 overflow went unchecked); EDM's prediction keys
/// were copied from A whatever `--markers` said; A's `model_ema.*`
/// was copied unmerged; a component A lacks went missing unsaid.
#[test]
fn blends_round_once_and_the_prediction_keys_follow_the_markers() {
    let d = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &cpu).unwrap();
    let unet = |x: f32| {
        vec![
            (format!("{UNET_PREFIX}.input_blocks.0.0.weight"), t(&[x, x])),
            (format!("{UNET_PREFIX}.middle_block.0.x"), t(&[x, x])),
            (format!("{UNET_PREFIX}.out.2.weight"), t(&[x, x])),
        ]
    };
    let save = |name: &str, tensors: &[(String, Tensor)], dtype: DType, v: bool| {
        let p = d.path().join(name);
        let opts = SaveOptions {
            dtype: Some(dtype),
            v_pred: v,
            ztsnr: v,
            ..Default::default()
        };
        save_tensors(&p, tensors, &opts).unwrap();
        p
    };
    // A: f16, UNet only, with an EMA copy; B: f32 EDM-v with a VAE.
    let mut a_t = unet(1.0);
    a_t.push((
        format!("model_ema.{}", "diffusion_modelinput_blocks00weight"),
        t(&[9.0]),
    ));
    let a = save("a.safetensors", &a_t, DType::F16, false);
    let mut b_t = unet(1.0 + 1.0 / 1024.0);
    b_t.push(("edm_vpred.sigma_max".into(), t(&[120.0])));
    b_t.push(("edm_vpred.sigma_min".into(), t(&[0.002])));
    b_t.push(("first_stage_model.w".into(), t(&[3.0])));
    let b = save("b.safetensors", &b_t, DType::F32, false);
    let out = d.path().join("m.safetensors");
    let mut c = cfg(&a, &b);
    c.alpha = 0.5;
    c.dtype = Some(DType::F32);
    c.markers = Some(Side::B);
    let r = merge(&c, &out).unwrap();
    // 1 + 1/2048 needs 11 mantissa bits: f16 (10) would round it away.
    let k_in = format!("{UNET_PREFIX}.input_blocks.0.0.weight");
    assert_eq!(read(&out, &k_in), vec![1.0 + 1.0 / 2048.0; 2]);
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.contains("edm_vpred.sigma_max") && ck.contains("edm_vpred.sigma_min"));
    assert!(!ck.entries().keys().any(|k| k.starts_with("model_ema.")));
    assert!(r.skipped.iter().any(|k| k.starts_with("model_ema.")));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("no VAE") && w.contains("--vae b")),
        "{:?}",
        r.warnings
    );
    // The other way round: A's EDM keys go when B (plain eps) marks.
    let mut c2 = cfg(&b, &a);
    c2.markers = Some(Side::B);
    merge(&c2, &out).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert!(!ck.entries().keys().any(|k| k.starts_with("edm_")));
    assert!(ck.contains("first_stage_model.w"));
    // A blend past f16's range into an f16 file is refused, naming the key.
    let big = save("big.safetensors", &unet(60000.0), DType::F16, false);
    let zero = save("zero.safetensors", &unet(0.0), DType::F16, false);
    let mut c3 = cfg(&big, &big);
    c3.c = Some(zero.clone());
    c3.alpha = 1.0;
    let e = merge(&c3, &out).unwrap_err().to_string();
    assert!(
        e.contains("does not fit in f16") && e.contains(&k_in),
        "{e}"
    );
    // A NaN in an input is refused before anything is written, whatever
    // the output dtype (it used to be called an f16 overflow, and to be
    // written as bf16).
    let _ = std::fs::remove_file(&out);
    let nan = save("nan.safetensors", &unet(f32::NAN), DType::F32, false);
    for dtype in [DType::F16, DType::BF16] {
        let mut c4 = cfg(&nan, &zero);
        c4.dtype = Some(dtype);
        let e = merge(&c4, &out).unwrap_err().to_string();
        assert!(
            e.contains("nan.safetensors") && e.contains("contains NaN"),
            "{e}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    assert!(BlockAlphas::parse("IN09=1").is_err());
    assert!(BlockAlphas::parse("OUT01")
        .unwrap_err()
        .to_string()
        .contains("BLOCK=ALPHA"));
    assert!(BlockAlphas::parse("VAE=1")
        .unwrap_err()
        .to_string()
        .contains("--vae"));
    assert!(BlockAlphas::parse("IN00-IN03=1,IN02=0").is_err());
    for bad in ["OUT00-OUT08=nan", "M00=inf", "IN01=-infinity"] {
        let e = BlockAlphas::parse(bad).unwrap_err().to_string();
        assert!(e.contains("finite"), "{bad}: {e}");
    }
    let d = tempfile::tempdir().unwrap();
    let a = ckpt(
        d.path(),
        "a.safetensors",
        &[1., 2., 3., 4., 5., 6.],
        1.0,
        false,
    );
    let p = d.path().join("odd.safetensors");
    save_tensors(
        &p,
        &[(
            format!("{UNET_PREFIX}.input_blocks.0.0.weight"),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        )],
        &SaveOptions::default(),
    )
    .unwrap();
    let e = merge(&cfg(&a, &p), &d.path().join("x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("different architectures"), "{e}");
    assert!(!d.path().join("x.safetensors").exists());
    assert_eq!(
        sweep_path(Path::new("/t/m.safetensors"), 0.25),
        PathBuf::from("/t/m-a0.25.safetensors")
    );
    // Regression: --out naming an input (or a hard link to it) replaced it.
    let b = ckpt(d.path(), "b.safetensors", &[0.; 6], 0.0, false);
    let before = std::fs::read(&b).unwrap();
    let link = d.path().join("link.safetensors");
    std::fs::hard_link(&b, &link).unwrap();
    for out in [&b, &d.path().join("./b.safetensors"), &link] {
        let e = merge(&cfg(&a, &b), out).unwrap_err().to_string();
        assert!(e.contains("that is model B"), "{e}");
    }
    let e = merge(&cfg(&a, &b), &a).unwrap_err().to_string();
    assert!(e.contains("that is model A"), "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), before);
}

/// Regression: a merge whose markers' side is v by its metadata only (a
/// kohya v model: `modelspec.prediction_type = v`, no `v_pred` key) was
/// written without the key, so UIs sampled it as eps; and A's own file
/// hash and training metadata were carried into the merge.
#[test]
fn a_merge_is_marked_as_its_prediction_and_drops_a_only_metadata() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("kohya_v.safetensors");
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
    let metadata = BTreeMap::from([
        (META_PREDICTION_TYPE.to_string(), "v".to_string()),
        (
            "modelspec.hash_sha256".to_string(),
            "0xdeadbeef".to_string(),
        ),
        ("ss_v_parameterization".to_string(), "True".to_string()),
        ("sshs_model_hash".to_string(), "0xfeed".to_string()),
        ("modelspec.title".to_string(), "A".to_string()),
    ]);
    save_tensors(
        &a,
        &[(format!("{UNET_PREFIX}.out.2.weight"), t(&[1., 2.]))],
        &SaveOptions {
            dtype: Some(DType::F32),
            metadata,
            ..Default::default()
        },
    )
    .unwrap();
    let b = d.path().join("b.safetensors");
    save_tensors(
        &b,
        &[
            (format!("{UNET_PREFIX}.out.2.weight"), t(&[3., 4.])),
            (format!("{UNET_PREFIX}.only_in_b"), t(&[5.])),
        ],
        &SaveOptions {
            dtype: Some(DType::F32),
            v_pred: true,
            ..Default::default()
        },
    )
    .unwrap();
    let out = d.path().join("m.safetensors");
    let r = merge(&cfg(&a, &b), &out).unwrap();
    assert!(r.v_pred && !r.ztsnr, "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("1 UNet key(s) of B are not in A")),
        "{:?}",
        r.warnings
    );
    let m = Checkpoint::open(&out).unwrap();
    assert!(m.contains(MARKER_V_PRED));
    let p = m.prediction();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let meta = m.metadata();
    assert_eq!(meta.get("modelspec.title").map(String::as_str), Some("A"));
    for gone in [
        "modelspec.hash_sha256",
        "ss_v_parameterization",
        "sshs_model_hash",
    ] {
        assert!(!meta.contains_key(gone), "{gone}");
    }
    // A sweep whose outputs include an input is refused before its first
    // merge is written (each merge refused only its own, in turn).
    let sw = d.path().join("sw.safetensors");
    std::fs::copy(&b, sweep_path(&sw, 0.5)).unwrap();
    let e = sweep(
        &cfg(&a, &sweep_path(&sw, 0.5)),
        &[0.25, 0.5],
        &sw,
        &SweepEval {
            reference: None,
            prompts: vec!["x".into()],
            seeds: vec![0],
            steps: 1,
            cfg: 1.0,
            width: 64,
            height: 64,
            load: Default::default(),
            score_a: false,
        },
        &Ctx::quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("α = 0.5 output") && e.contains("is model B"),
        "{e}"
    );
    assert!(!sweep_path(&sw, 0.25).exists());
}

/// An EDM side keeps its `v_pred` key (ComfyUI writes it beside
/// `edm_vpred.*`) and an eps side's stray ZTSNR metadata is not carried.
#[test]
fn edm_and_stray_ztsnr_markers_are_carried_as_read() {
    let d = tempfile::tempdir().unwrap();
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
    let unet = |x: f32| (format!("{UNET_PREFIX}.out.2.weight"), t(&[x, x]));
    let edm = d.path().join("edm.safetensors");
    save_tensors(
        &edm,
        &[unet(1.0), ("edm_vpred.sigma_max".to_string(), t(&[120.0]))],
        &SaveOptions {
            dtype: Some(DType::F32),
            v_pred: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = d.path().join("b.safetensors");
    save_tensors(&b, &[unet(2.0)], &SaveOptions::default()).unwrap();
    let out = d.path().join("m.safetensors");
    let r = merge(&cfg(&edm, &b), &out).unwrap();
    assert!(r.v_pred, "{r:?}");
    let m = Checkpoint::open(&out).unwrap();
    assert!(m.contains(MARKER_V_PRED) && m.contains("edm_vpred.sigma_max"));
    // eps with `eps2v.ztsnr = true` in its metadata: an eps merge, no ZTSNR.
    let stray = d.path().join("stray.safetensors");
    save_tensors(
        &stray,
        &[unet(3.0)],
        &SaveOptions {
            metadata: BTreeMap::from([(META_ZTSNR.to_string(), "true".to_string())]),
            ..Default::default()
        },
    )
    .unwrap();
    let out2 = d.path().join("m2.safetensors");
    let mut c = cfg(&stray, &b);
    c.markers = None;
    let r = merge(&c, &out2).unwrap();
    assert!(!r.v_pred && !r.ztsnr, "{r:?}");
    let p = Checkpoint::open(&out2).unwrap().prediction();
    assert!(!p.ztsnr, "{p:?}");
}

/// `eps2v merge` refuses a model A that is no whole SDXL checkpoint (it
/// wrote SD 1.x "merges" and files missing tensors with exit 0).
#[test]
fn model_a_must_be_a_whole_sdxl_checkpoint() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/model.safetensors");
    check_model_a(&toy).unwrap();
    let d = tempfile::tempdir().unwrap();
    let fake = ckpt(d.path(), "a.safetensors", &[1.; 6], 1.0, false);
    let e = check_model_a(&fake).unwrap_err().to_string();
    assert!(e.contains("cannot infer the UNet config"), "{e}");
    let sd15 = d.path().join("sd15.safetensors");
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    save_tensors(
        &sd15,
        &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                t.clone(),
            ),
            (format!("{UNET_PREFIX}.input_blocks.0.0.weight"), t),
        ],
        &SaveOptions::default(),
    )
    .unwrap();
    let e = check_model_a(&sd15).unwrap_err().to_string();
    assert!(e.contains("Stable Diffusion 1.x"), "{e}");
    // The toy with one UNet tensor gone is named by the missing key.
    let ck = Checkpoint::open(&toy).unwrap();
    let gone = "model.diffusion_model.out.2.bias";
    let kept: Vec<(String, Tensor)> = ck
        .entries()
        .keys()
        .filter(|k| *k != gone)
        .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let broken = d.path().join("broken.safetensors");
    save_tensors(&broken, &kept, &SaveOptions::default()).unwrap();
    let e = check_model_a(&broken).unwrap_err().to_string();
    assert!(e.contains(gone), "{e}");
}
