use super::*;

#[test]
fn reference_vectors() -> Result<()> {
    // shared/reference/sdxl.md §3.2 test vectors.
    let t = ClipTokenizer::new()?;
    assert_eq!(
        t.encode("a photo of a cat")?,
        vec![320, 1125, 539, 320, 2368]
    );
    assert_eq!(
        t.encode("A photo of a cat.")?,
        vec![320, 1125, 539, 320, 2368, 269]
    );
    assert_eq!(
        t.encode("a photograph of an astronaut riding a horse")?,
        vec![320, 8853, 539, 550, 18376, 6765, 320, 4558]
    );
    assert_eq!(
        t.encode("masterpiece, best quality, 1girl")?,
        vec![12066, 267, 949, 3027, 267, 272, 1611]
    );
    assert_eq!(t.encode("hello world!")?, vec![3306, 1002, 256]);
    assert_eq!(t.tokenize("", Padding::Eos)?[..3], [BOS, EOS, EOS]);
    let g = t.tokenize("a photo of a cat", Padding::Zero)?;
    assert_eq!(g.len(), 77);
    assert_eq!(&g[..8], &[BOS, 320, 1125, 539, 320, 2368, EOS, 0]);
    assert_eq!(t.token_to_id("a</w>"), Some(320));
    assert_eq!(t.token_to_id("!"), Some(0));
    assert_eq!(t.token_to_id("in"), Some(512));
    assert_eq!(t.comma_id(), 267);
    Ok(())
}

#[test]
fn truncation_keeps_eos_last() -> Result<()> {
    let t = ClipTokenizer::new()?;
    let ids = t.tokenize(&"cat ".repeat(100), Padding::Zero)?;
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], EOS);
    assert_eq!(ids[75], t.encode("cat")?[0]);
    Ok(())
}

#[test]
fn html_unescape_matches_python_rules() {
    assert_eq!(html_unescape("&amp;lt;"), "&lt;");
    assert_eq!(html_unescape("a &amp b"), "a & b");
    assert_eq!(html_unescape("&ampx"), "&x");
    assert_eq!(html_unescape("&#65;&#x42;&#67"), "ABC");
    assert_eq!(html_unescape("&#128;"), "€");
    assert_eq!(html_unescape("&#0;"), "\u{fffd}");
    assert_eq!(html_unescape("&#1;"), "");
    assert_eq!(html_unescape("&bogus; &"), "&bogus; &");
    assert_eq!(html_unescape("&hellip;"), "…");
    assert_eq!(clean("  Hello\t\nWORLD  "), "hello world");
    assert_eq!(clean("ﬁne ＡＢＣ “quote”"), "fine abc \"quote\"");
}
