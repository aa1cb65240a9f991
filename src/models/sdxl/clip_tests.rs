use super::*;
use std::collections::HashMap;

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// Load a golden file from fixtures/golden/text, expanding the sparse
/// token embedding (`__rows.<key>` + rows) to its full 49408 rows.
fn load_golden(name: &str) -> HashMap<String, Tensor> {
    let path = format!("{}/fixtures/golden/text/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut ts = candle_core::safetensors::load(&path, &Device::Cpu).expect("golden file");
    let sparse: Vec<String> = ts
        .keys()
        .filter_map(|k| k.strip_prefix("__rows.").map(String::from))
        .collect();
    for key in sparse {
        let rows = ts[&format!("__rows.{key}")].to_vec1::<i64>().expect("rows");
        let vals = ts[&key].to_vec2::<f32>().expect("values");
        let w = vals[0].len();
        let mut full = vec![0f32; VOCAB_SIZE * w];
        for (r, v) in rows.iter().zip(&vals) {
            let r = *r as usize;
            full[r * w..(r + 1) * w].copy_from_slice(v);
        }
        ts.insert(
            key,
            Tensor::from_vec(full, (VOCAB_SIZE, w), &Device::Cpu).expect("full"),
        );
    }
    ts
}

fn golden_cfg_l() -> ClipTextConfig {
    ClipTextConfig {
        intermediate: 72,
        ..ClipTextConfig::clip_l_tiny()
    }
}

fn golden_cfg_g() -> ClipTextConfig {
    ClipTextConfig {
        projection_dim: Some(24),
        ..ClipTextConfig::open_clip_bigg_tiny()
    }
}

/// Golden: transformers `CLIPTextModel(...).hidden_states[-2]` on a tiny
/// quick-GELU config (fixtures/scripts/gen_text_goldens.py).
#[test]
fn clip_l_penultimate_matches_transformers() -> Result<()> {
    let ts = load_golden("clip_l_tiny.safetensors");
    let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &Device::Cpu);
    let m = ClipTextModel::new(vb.pp(CLIP_L_MODEL_PREFIX), &golden_cfg_l())?;
    let out = m.forward(&ts["__input_ids"])?;
    assert!(out.pooled.is_none());
    let err = max_abs(&out.penultimate, &ts["__penultimate"]);
    eprintln!("clip-l penultimate max abs err {err:e}");
    assert!(err <= 1e-4, "clip-l max abs err {err}");
    Ok(())
}

/// Golden: open_clip `TextTransformer` (exact GELU, fused in_proj, bare
/// text_projection): penultimate state and pooled output.
#[test]
fn bigg_penultimate_and_pooled_match_open_clip() -> Result<()> {
    let ts = load_golden("bigg_tiny.safetensors");
    let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &Device::Cpu);
    let m = ClipTextModel::new(vb.pp(BIGG_MODEL_PREFIX), &golden_cfg_g())?;
    let out = m.forward(&ts["__input_ids"])?;
    let err = max_abs(&out.penultimate, &ts["__penultimate"]);
    eprintln!("bigG penultimate max abs err {err:e}");
    assert!(err <= 1e-4, "bigG penultimate max abs err {err}");
    let pooled = out.pooled.expect("pooled");
    let err = max_abs(&pooled, &ts["__pooled"]);
    eprintln!("bigG pooled max abs err {err:e}");
    assert!(err <= 1e-4, "bigG pooled max abs err {err}");
    Ok(())
}

/// Golden: SDXL conditioning built as A1111 does (sd_hijack_clip
/// `tokenize_line` chunks, transformers CLIP-L `hidden_states[-2]` and
/// open_clip bigG per chunk, `EmphasisOriginal` per encoder, pooled from
/// the first chunk) on the tiny golden weights of both encoders.
#[test]
fn sdxl_encoder_matches_a1111_pipeline() -> Result<()> {
    let mut ts = load_golden("clip_l_tiny.safetensors");
    ts.extend(load_golden("bigg_tiny.safetensors"));
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let enc = SdxlTextEncoder::new(vb, &golden_cfg_l(), &golden_cfg_g())?;
    let want = load_golden("sdxl_text_e2e.safetensors");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/golden/text/sdxl_text_e2e.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?)?;
    let prompts: Vec<String> = serde_json::from_value(v["prompts"].clone())?;
    assert_eq!(prompts.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        let got = enc.encode(&[p.as_str()])?;
        let wc = &want[&format!("context.{i}")];
        assert_eq!(got.context.dims(), wc.dims(), "{p:?}");
        let err = max_abs(&got.context, wc);
        eprintln!("e2e {i}: context max abs err {err:e}");
        assert!(err <= 1e-4, "{p:?}: context max abs err {err}");
        let err = max_abs(&got.pooled, &want[&format!("pooled.{i}")]);
        eprintln!("e2e {i}: pooled max abs err {err:e}");
        assert!(err <= 1e-4, "{p:?}: pooled max abs err {err}");
    }
    Ok(())
}

fn random_encoder() -> Result<(candle_nn::VarMap, SdxlTextEncoder)> {
    let vm = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let enc = SdxlTextEncoder::new(
        vb,
        &ClipTextConfig::clip_l_tiny(),
        &ClipTextConfig::open_clip_bigg_tiny(),
    )?;
    // VarMap creates zero-filled vars; give them random values and
    // rebuild so the model holds the same Vars.
    {
        let data = vm
            .data()
            .lock()
            .map_err(|_| Error::Other("varmap lock".into()))?;
        for var in data.values() {
            var.set(&Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu)?)?;
        }
    }
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let enc2 = SdxlTextEncoder::new(
        vb,
        &ClipTextConfig::clip_l_tiny(),
        &ClipTextConfig::open_clip_bigg_tiny(),
    )?;
    drop(enc);
    Ok((vm, enc2))
}

#[test]
fn sdxl_context_shapes_chunks_and_uncond() -> Result<()> {
    let (_vm, enc) = random_encoder()?;
    let long = "1girl, solo, long hair, ".repeat(15); // 8 tokens each: 120 → 2 chunks
    let (c, u) = enc.encode_pair(&[long.as_str()], &["lowres"])?;
    assert_eq!(c.context.dims(), &[1, 77 * 2, 32 + 40]);
    // The negative keeps its own length (no empty chunks added).
    assert_eq!(u.context.dims(), &[1, 77, 32 + 40]);
    assert_eq!(c.pooled.dims(), &[1, 40]);
    assert_eq!(c.chunks()?, 2);
    let z = c.zeros_like()?;
    assert_eq!(z.context.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    // A multi-chunk batch equals its prompts encoded one by one.
    let batch = enc.encode(&[long.as_str(), "a (cat:1.2)"])?;
    let one = enc.encode(&[long.as_str()])?;
    let two = enc.encode_tokenized(&enc.tokenize(&["a (cat:1.2)"], 2)?)?;
    assert!(max_abs(&batch.context.narrow(0, 0, 1)?, &one.context) < 1e-5);
    assert!(max_abs(&batch.context.narrow(0, 1, 1)?, &two.context) < 1e-5);
    assert!(max_abs(&batch.pooled.narrow(0, 1, 1)?, &two.pooled) < 1e-5);
    // A batch: pooled of prompt 0 equals the single-prompt pooled.
    let single = enc.encode(&["a photo of a cat"])?;
    let batch = enc.encode(&["a photo of a cat", "(masterpiece:1.3), cat"])?;
    let d = max_abs(&single.pooled, &batch.pooled.narrow(0, 0, 1)?);
    assert!(d < 1e-5, "{d}");
    Ok(())
}

#[test]
fn emphasis_original_restores_the_mean() -> Result<()> {
    let (_vm, enc) = random_encoder()?;
    let plain = enc.encode(&["a cat, a dog"])?;
    let weighted = enc.encode(&["a (cat:1.5), a dog"])?;
    // same tokens, so the means match and the values differ
    let m = |t: &Tensor| {
        t.narrow(2, 0, 32)
            .and_then(|x| x.mean_all())
            .and_then(|x| x.to_scalar::<f32>())
    };
    assert!((m(&plain.context)? - m(&weighted.context)?).abs() < 1e-5);
    assert!(max_abs(&plain.context, &weighted.context) > 1e-3);
    // pooled has no emphasis (A1111 takes it from the unweighted output)
    assert!(max_abs(&plain.pooled, &weighted.pooled) < 1e-6);
    // "Ignore": same ids as the plain prompt, weights dropped
    let mut enc = enc;
    enc.emphasis = Emphasis::Ignore;
    let ignored = enc.encode(&["a (cat), a dog"])?;
    let plain2 = enc.encode(&["a cat, a dog"])?;
    assert!(max_abs(&ignored.context, &plain2.context) < 1e-6);
    // "No norm": the weighted token's CLIP-L row is exactly 1.5× the plain one
    enc.emphasis = Emphasis::NoNorm;
    let nonorm = enc.encode(&["a (cat:1.5), a dog"])?;
    let row = |t: &Tensor| t.narrow(1, 2, 1).and_then(|x| x.narrow(2, 0, 32));
    let d = max_abs(&(row(&plain.context)? * 1.5)?, &row(&nonorm.context)?);
    assert!(d < 1e-5, "{d}");
    Ok(())
}

/// Every trainable text-encoder weight gets a non-zero gradient (catches
/// the candle no-backward fast paths of reference §8.3). The last CLIP-L
/// block and its final LN are not used by SDXL, so they get none.
#[test]
fn every_used_weight_gets_a_gradient() -> Result<()> {
    let (vm, enc) = random_encoder()?;
    let c = enc.encode(&["a (cat:1.2), [dog], 1girl"])?;
    let r1 = Tensor::randn(0f32, 1.0, c.context.shape(), &Device::Cpu)?;
    let r2 = Tensor::randn(0f32, 1.0, c.pooled.shape(), &Device::Cpu)?;
    let loss = ((c.context * r1)?.sum_all()? + (c.pooled * r2)?.sum_all()?)?;
    let grads = loss.backward()?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Other("varmap lock".into()))?;
    let last_l = format!("{CLIP_L_MODEL_PREFIX}.encoder.layers.2.");
    let final_l = format!("{CLIP_L_MODEL_PREFIX}.final_layer_norm.");
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let unused = name.starts_with(&last_l) || name.starts_with(&final_l);
        let g = grads.get(var.as_tensor());
        let nonzero = match g {
            Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            None => false,
        };
        if nonzero == unused {
            missing.push(format!("{name} (unused {unused}, grad {nonzero})"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
    assert_eq!(data.len(), (4 + 3 * 16) + (2 + 3 * 12 + 3));
    Ok(())
}

/// A backend that hands out broadcast zeros (no memory) and records the
/// requested names and shapes.
struct ShapeOnly(std::sync::Mutex<Vec<(String, Vec<usize>)>>);

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("lock")
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only backend: no tensor {name}")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The full configs request exactly the SDXL text-encoder keys and
/// shapes of fixtures/golden/text/sdxl_text_keys_shapes.tsv (from
/// fixtures/scripts/gen_keys_shapes.py; minus `logit_scale`,
/// which SDXL never uses).
#[test]
fn full_configs_request_sdxl_keys() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/golden/text/sdxl_text_keys_shapes.tsv"
    );
    let tsv = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut want: Vec<(String, Vec<usize>)> = tsv
        .lines()
        .filter(|l| l.starts_with("conditioner.") && !l.contains("logit_scale"))
        .map(|l| {
            let (k, s) = l.split_once('\t').expect("tab");
            let dims = s
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().expect("dim"))
                .collect();
            (k.to_string(), dims)
        })
        .collect();
    let backend = std::sync::Arc::new(ShapeOnly(Default::default()));
    struct Shared(std::sync::Arc<ShapeOnly>);
    impl candle_nn::var_builder::SimpleBackend for Shared {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu);
    SdxlTextEncoder::new(
        vb,
        &ClipTextConfig::clip_l(),
        &ClipTextConfig::open_clip_bigg(),
    )?;
    let mut got = backend.0.lock().expect("lock").clone();
    got.sort();
    want.sort();
    assert_eq!(got.len(), 196 + 389);
    assert_eq!(got, want);
    Ok(())
}
