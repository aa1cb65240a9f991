use super::*;

/// A killed export (its temporary sibling left behind) leaves the
/// previous export intact; the next export sweeps the leftover and
/// replaces the old export whole.
#[test]
fn staged_export_replaces_whole_and_sweeps_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("kohya");
    fs::create_dir_all(out.join("1_old")).unwrap();
    fs::write(out.join("meta_lat.json"), b"{}").unwrap();
    // A run killed before its commit: its temp dir stays, `out` is untouched.
    let killed = d.path().join(".kohya.tmp-999999");
    fs::create_dir_all(killed.join("1_half")).unwrap();
    let st = Staged::new(&out).unwrap();
    assert!(!killed.exists(), "leftover not swept");
    assert!(out.join("1_old").is_dir());
    fs::create_dir_all(st.tmp.join("1_new")).unwrap();
    st.commit().unwrap();
    assert!(out.join("1_new").is_dir() && !out.join("1_old").exists());
    let names: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["kohya"]);
}

/// A kill between a folder export's two renames leaves the old export
/// aside; the next export puts it back first. A file export replaces
/// its file in one rename.
#[test]
fn a_folder_set_aside_is_restored_and_files_are_replaced_in_one_rename() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("kohya");
    fs::create_dir_all(d.path().join(".kohya.old-export/1_old")).unwrap();
    let st = Staged::new(&out).unwrap();
    assert!(out.join("1_old").is_dir() && !d.path().join(".kohya.old-export").exists());
    st.discard();
    // Regression: the set-aside name replaced the last extension, so
    // `set.v1`'s was `set.v2`'s too, and a folder of the user's named
    // `set.old-export` was taken for one (and deleted by the commit).
    let sub = d.path().join("sub");
    let mine = sub.join("set.old-export");
    fs::create_dir_all(mine.join("keep")).unwrap();
    fs::create_dir_all(sub.join(".set.v1.old-export/1_v1")).unwrap();
    let st = Staged::new(&sub.join("set.v2")).unwrap();
    assert!(!sub.join("set.v2").exists());
    fs::create_dir_all(st.tmp.join("1_v2")).unwrap();
    st.commit().unwrap();
    assert!(sub.join("set.v2/1_v2").is_dir());
    assert!(sub.join(".set.v1.old-export/1_v1").is_dir());
    assert!(mine.join("keep").is_dir());
    fs::remove_dir_all(&sub).unwrap();
    let file = d.path().join("manifest.parquet");
    fs::write(&file, b"old").unwrap();
    let st = Staged::new(&file).unwrap();
    fs::write(&st.tmp, b"new").unwrap();
    st.commit().unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"new");
    let names: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn kohya_gets_no_tags_besides_a_policy_caption() {
    let row = |source: &str| ExportRow {
        caption: Some("1girl, very long hair".into()),
        caption_source: Some(source.into()),
        tags: Some("1girl, long hair, simple background".into()),
        ..Default::default()
    };
    let policy = row("policy");
    let k = kohya_entry(policy.caption.as_deref(), kohya_tags(&policy));
    assert_eq!(
        (k.text.as_str(), k.tags.as_str()),
        ("1girl, very long hair", "")
    );
    let sidecar = row("sidecar_txt");
    let k = kohya_entry(sidecar.caption.as_deref(), kohya_tags(&sidecar));
    assert_eq!(
        k.text,
        "1girl, very long hair, long hair, simple background"
    );
}

#[test]
fn kohya_text_never_repeats_caption_and_tags() {
    let e = kohya_entry(
        Some("1girl, solo, red circle"),
        Some("1girl, red circle, solo"),
    );
    assert_eq!(e.caption, "1girl, solo, red circle");
    assert_eq!(e.tags, "");
    assert_eq!(e.text, "1girl, solo, red circle");
    let e = kohya_entry(
        Some("a photo of a cat"),
        Some("cat, a photo of a cat, indoors, cat"),
    );
    assert_eq!(e.tags, "cat, indoors");
    assert_eq!(e.text, "a photo of a cat, cat, indoors");
    let e = kohya_entry(None, Some("smile, solo"));
    assert_eq!((e.caption.as_str(), e.text.as_str()), ("", "smile, solo"));
    let e = kohya_entry(Some("  \n "), None);
    assert_eq!(e.text, "");
    assert_eq!(
        one_line("line one\n\n  line two,\nthree"),
        "line one, line two, three"
    );
    // Regressions: spellings of one tag (a sidecar's underscores, the
    // tagger's spaces) were both written; a lone `\r` stayed, where
    // kohya's `readlines()` cut the caption.
    let e = kohya_entry(
        Some("1girl, long_hair, Blue_Eyes"),
        Some("long hair, blue eyes, solo, Solo"),
    );
    assert_eq!(e.text, "1girl, long_hair, Blue_Eyes, solo");
    assert_eq!(one_line("1girl, solo\rred hair"), "1girl, solo, red hair");
}

#[test]
fn caption_priority_prefers_policy_then_tagger_then_sidecars() {
    assert!(caption_rank("policy") < caption_rank("tagger"));
    assert!(caption_rank("tagger") < caption_rank("sidecar_txt"));
    assert!(caption_rank("a1111_prompt") < caption_rank("zzz"));
}
