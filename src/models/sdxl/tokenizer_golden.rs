use super::*;

/// Golden: open_clip 3.3.0 `_tokenizer.encode` / `tokenize` on every
/// prompt of fixtures/scripts/gen_text_goldens.py (equivalent reference
/// code: `open_clip.tokenizer.SimpleTokenizer`).
#[test]
fn ids_equal_open_clip() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/golden/text/tokenizer_open_clip.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?)?;
    let t = ClipTokenizer::new()?;
    let rows = v["prompts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    assert!(rows.len() >= 200, "{} prompts", rows.len());
    let mut bad = Vec::new();
    for row in rows {
        let prompt = row["prompt"].as_str().unwrap_or_default();
        let want: Vec<u32> = serde_json::from_value(row["encode"].clone())?;
        let want_row: Vec<u32> = serde_json::from_value(row["tokenize"].clone())?;
        let got = t.encode(prompt)?;
        let got_row = t.tokenize(prompt, Padding::Zero)?;
        if got != want || got_row != want_row {
            bad.push(format!("{prompt:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} prompts differ:\n{}",
        bad.len(),
        rows.len(),
        bad.join("\n")
    );
    Ok(())
}
