use super::*;
use crate::train::config::LatentMode;

#[test]
fn captions_train_as_written_not_as_prompt_syntax() {
    use crate::models::sdxl::prompt::tokenize_prompt_with;
    use crate::models::sdxl::tokenizer::ClipTokenizer;
    let tok = ClipTokenizer::new().unwrap();
    // Brackets, weights and BREAK are the caption's words: all
    // multipliers 1, and the tokens of the literal text (which the A1111
    // parser would drop or turn into weights, or fail on).
    for caption in ["1girl, saber (fate), [red] eyes", "(v:1.2.3), x BREAK y"] {
        let tp = caption_tokens(&tok, caption, 3).unwrap();
        assert!(tp
            .chunks
            .iter()
            .all(|c| c.multipliers.iter().all(|&m| m == 1.0)));
        let ids: Vec<u32> = tp.chunks[0].tokens.clone();
        let literal = tok.encode(caption).unwrap();
        assert_eq!(&ids[1..1 + literal.len()], &literal[..], "{caption}");
        if let Ok(parsed) = tokenize_prompt_with(&tok, caption, true) {
            assert_ne!(parsed.chunks[0].tokens, ids, "{caption}");
        }
    }
    // Long captions keep at most max_chunks chunks.
    let long = vec!["red circle"; 200].join(", ");
    assert_eq!(caption_tokens(&tok, &long, 2).unwrap().chunks.len(), 2);
}

/// Caption dropout: a dropped row is zeros (`zero`) or the encoded
/// dropout text (`empty`, `"…"`), never its caption; every row is
/// padded with the empty chunk to the batch's longest caption.
#[test]
fn dropped_captions_take_the_dropout_conditioning_padded_to_the_batch() {
    let d = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    // Entries on disk, as `build` leaves them: (77·k, ctx) and (p).
    let mut text = HashMap::new();
    for (caption, v, chunks) in [("short", 1f32, 1), ("long", 2.0, 2), ("", 5.0, 1)] {
        let rel = entry_path("text", &key_of(&[caption.as_bytes(), b"test"]));
        let context = Tensor::full(v, (77 * chunks, 3), &d).unwrap();
        let pooled = Tensor::full(v, 2, &d).unwrap();
        write_entry(
            dir.path(),
            &rel,
            &[("context", &context), ("pooled", &pooled)],
        )
        .unwrap();
        assert!(entry_ok(dir.path(), &rel, &["context", "pooled"]));
        text.insert(caption.to_string(), rel);
    }
    let mut caches = Caches {
        root: dir.path().to_path_buf(),
        device: d.clone(),
        latents: HashMap::new(),
        text,
        empty_chunk: Tensor::full(9f32, (1, 77, 3), &d).unwrap(),
        empty_pooled: Tensor::full(5f32, (1, 2), &d).unwrap(),
        uncond: None,
    };
    // (row, token) → value of the context, and the pooled row.
    let rows = |c: &Caches, dropped: &[bool]| {
        let (ctx, pooled) = c.batch_cond(&["short", "long"], dropped).unwrap();
        let ctx: Vec<Vec<f32>> = (0..2)
            .map(|i| {
                let r = ctx.get(i).unwrap();
                [0usize, 76, 77, 153]
                    .iter()
                    .map(|&t| r.get(t).unwrap().get(0).unwrap().to_scalar().unwrap())
                    .collect()
            })
            .collect();
        (ctx, pooled.to_vec2::<f32>().unwrap())
    };
    let (ctx, pooled) = rows(&caches, &[false, false]);
    assert_eq!(ctx, [vec![1., 1., 9., 9.], vec![2., 2., 2., 2.]]);
    assert_eq!(pooled, [vec![1., 1.], vec![2., 2.]]);
    let (ctx, pooled) = rows(&caches, &[true, false]);
    assert_eq!(ctx, [vec![0., 0., 0., 0.], vec![2., 2., 2., 2.]]);
    assert_eq!(pooled, [vec![0., 0.], vec![2., 2.]]);
    caches.uncond = Some(caches.cond("").unwrap());
    let (ctx, pooled) = rows(&caches, &[true, false]);
    assert_eq!(ctx, [vec![5., 5., 9., 9.], vec![2., 2., 2., 2.]]);
    assert_eq!(pooled, [vec![5., 5.], vec![2., 2.]]);
}

/// An entry reads back with the bits it was written with (training
/// reads every batch from disk), and a missing or foreign file is no
/// entry.
#[test]
fn entries_read_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let z =
        (crate::nn::kernels::test_util::rand(&[4, 5, 6], 3, DType::F32).unwrap() * 7.3).unwrap();
    let rel = entry_path("latents", &key_of(&[b"z"]));
    assert!(!entry_ok(dir.path(), &rel, &["latent"]));
    write_entry(dir.path(), &rel, &[("latent", &z)]).unwrap();
    assert!(entry_ok(dir.path(), &rel, &["latent"]));
    assert!(!entry_ok(dir.path(), &rel, &["context"]));
    let back = read_entry(dir.path(), &rel, &["latent"], &Device::Cpu).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    assert_eq!(back[0].dims(), z.dims());
    assert_eq!(bits(&back[0]), bits(&z));
    // Data lost under a valid header (a host crash before the unsynced
    // data reached the disk): found when read, and the file removed so
    // that the next build recomputes it.
    let path = dir.path().join(&rel);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 8..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        entry_ok(dir.path(), &rel, &["latent"]),
        "the header is fine"
    );
    let e = read_entry(dir.path(), &rel, &["latent"], &Device::Cpu).unwrap_err();
    assert!(e.starts_with("corrupt"), "{e}");
    assert!(!path.exists());
    std::fs::write(dir.path().join(&rel), b"not safetensors").unwrap();
    assert!(!entry_ok(dir.path(), &rel, &["latent"]));
}

/// f32 keys are the plain hash of their parts (those of the caches
/// written before `--precision`); half precision gets keys of its own.
#[test]
fn only_half_precision_changes_a_cache_key() {
    let parts: [&[u8]; 3] = [b"latent", b"abc", b"1024x1024"];
    let plain = key_of(&parts);
    assert_eq!(keyed(&parts, DType::F32), plain);
    let bf16 = keyed(&parts, DType::BF16);
    let f16 = keyed(&parts, DType::F16);
    assert!(bf16 != plain && f16 != plain && bf16 != f16);
    assert_eq!(bf16, key_of(&[b"latent", b"abc", b"1024x1024", b"bf16"]));
}

/// The latent cache key is what it was when the entries on users' disks
/// were written: sha256 over each part's little-endian u64 length and
/// bytes — "latent", the item's sha256, "WxH RWxRH top,left", the VAE
/// hash, the mode — computed here without the cache code.
#[test]
fn the_latent_key_format_is_pinned() {
    let it = TrainItem {
        item_id: 1,
        sha256: "ab".repeat(32),
        caption: "ignored".into(),
        bucket: (64, 32),
        image_path: "buckets/x.png".into(),
        size: crate::models::sdxl::SizeCond {
            original: (40.0, 90.0),
            crop_top_left: (0.0, 3.0),
            target: (32.0, 64.0),
        },
        resized: (70, 32),
    };
    let mut h = Sha256::new();
    for part in [
        "latent".to_string(),
        "ab".repeat(32),
        "64x32 70x32 0,3".into(),
        "vaehash".into(),
        "mean".into(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let want = hex::encode(h.finalize());
    assert_eq!(latent_key(&it, "vaehash", "mean", DType::F32), want);
    // The caption is not part of it; the mirrored image and half
    // precision are.
    let other = TrainItem {
        caption: "another".into(),
        ..it.clone()
    };
    assert_eq!(latent_key(&other, "vaehash", "mean", DType::F32), want);
    assert_ne!(latent_key(&it, "vaehash", "mean flipped", DType::F32), want);
    assert_eq!(latent_mode(LatentMode::Mean, 7, false), "mean");
    assert_eq!(
        latent_mode(LatentMode::Sample, 7, false),
        "sample:7:content"
    );
    assert_eq!(
        latent_mode(LatentMode::Sample, 7, true),
        "sample:7:content flipped"
    );
    assert_ne!(latent_key(&it, "vaehash", "mean", DType::BF16), want);
}
