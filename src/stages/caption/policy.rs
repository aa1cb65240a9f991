//! The decisions of the caption stage as pure functions over plain data:
//! which tags the tagger outputs (thresholds, MCut), how well an image
//! matches its prompt (alignment), and the training caption each policy
//! writes (ordering, keep tokens, undesired tags, replacements).
//!
//! Tag selection follows the reference (neggles/wdv3-timm `get_tags`,
//! SmilingWolf's tagger demo): a general tag is output when its probability
//! is *above* the general threshold (0.35), a character tag when above the
//! character threshold (0.75); the rating is the most probable rating label.
//! With MCut (Largeron et al. 2012, "MCut: a thresholding strategy for
//! multi-label classification", as in the demo) the general threshold of an
//! image is the midpoint of the largest gap between consecutive sorted
//! general probabilities, and the character threshold is that of the
//! character probabilities but at least 0.15.
//!
//! **Alignment** (per item with a generation prompt): the prompt is cleaned
//! (A1111 syntax removed, [`clean_prompt`]) and split at commas; a prompt
//! tag is *checkable* when it names a general or character output of the
//! tagger ([`tag_key`] comparison: case, spaces and underscores do not
//! matter); it is *confirmed* when the tagger output it for the image (above
//! its threshold, as selected above). `alignment = confirmed / checkable`,
//! in [0, 1]; with no checkable tag (no prompt, or none the tagger knows)
//! there is no score. Prompt tags the tagger does not know (quality words,
//! free text, rating words) are neither confirmed nor held against the
//! image.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::models::sdxl::prompt::clean_prompt;
use crate::models::tagger::labels::{
    display_name, tag_key, Labels, CATEGORY_CHARACTER, CATEGORY_GENERAL, CATEGORY_RATING,
};

/// Character-threshold floor under MCut (SmilingWolf's demo).
pub const MCUT_CHARACTER_FLOOR: f32 = 0.15;

/// Thresholds of tag selection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Thresholds {
    /// General tags: output when p > this (reference default 0.35).
    pub general: f32,
    /// Character tags: output when p > this (reference default 0.75).
    pub character: f32,
    /// Per-image MCut thresholds instead of the fixed ones.
    pub mcut: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            general: 0.35,
            character: 0.75,
            mcut: false,
        }
    }
}

/// One selected tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredTag {
    /// Display name (spaces, kaomoji kept).
    pub name: String,
    /// Danbooru category (0 general, 4 character).
    pub category: u32,
    /// Probability.
    pub p: f32,
}

/// What the tagger says about one image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TagResult {
    /// Most probable rating label and its probability.
    pub rating: Option<(String, f32)>,
    /// Every rating label with its probability, in output order.
    pub ratings: Vec<(String, f32)>,
    /// Selected character tags, most probable first.
    pub character: Vec<ScoredTag>,
    /// Selected general tags, most probable first.
    pub general: Vec<ScoredTag>,
}

impl TagResult {
    /// Every selected tag: characters, then general (each by probability).
    pub fn all(&self) -> impl Iterator<Item = &ScoredTag> {
        self.character.iter().chain(&self.general)
    }
}

/// MCut threshold of a set of probabilities: the midpoint of the largest
/// gap between consecutive values in descending order (`None` for fewer
/// than two values).
pub fn mcut_threshold(probs: &[f32]) -> Option<f32> {
    let mut v: Vec<f32> = probs.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let (mut best, mut at) = (f32::NEG_INFINITY, None);
    for k in 0..v.len().saturating_sub(1) {
        let gap = v[k] - v[k + 1];
        if gap > best {
            best = gap;
            at = Some(k);
        }
    }
    at.map(|k| (v[k] + v[k + 1]) / 2.0)
}

/// The thresholds actually used for one image `(general, character)`.
pub fn effective_thresholds(probs: &[f32], labels: &Labels, th: &Thresholds) -> (f32, f32) {
    if !th.mcut {
        return (th.general, th.character);
    }
    let of = |cat: u32| -> Vec<f32> { labels.indices(cat).into_iter().map(|k| probs[k]).collect() };
    let g = mcut_threshold(&of(CATEGORY_GENERAL)).unwrap_or(th.general);
    let c = mcut_threshold(&of(CATEGORY_CHARACTER))
        .map_or(th.character, |c| c.max(MCUT_CHARACTER_FLOOR));
    (g, c)
}

/// Select the tags of one image from its probabilities (one per label).
pub fn select_tags(probs: &[f32], labels: &Labels, th: &Thresholds) -> TagResult {
    let (tg, tc) = effective_thresholds(probs, labels, th);
    let mut r = TagResult::default();
    for (k, (&p, (name, &cat))) in probs
        .iter()
        .zip(labels.names.iter().zip(&labels.categories))
        .enumerate()
    {
        let _ = k;
        match cat {
            CATEGORY_RATING => r.ratings.push((name.clone(), p)),
            CATEGORY_GENERAL if p > tg => r.general.push(ScoredTag {
                name: display_name(name),
                category: cat,
                p,
            }),
            CATEGORY_CHARACTER if p > tc => r.character.push(ScoredTag {
                name: display_name(name),
                category: cat,
                p,
            }),
            _ => {}
        }
    }
    let by_p = |a: &ScoredTag, b: &ScoredTag| b.p.total_cmp(&a.p).then(a.name.cmp(&b.name));
    r.general.sort_by(by_p);
    r.character.sort_by(by_p);
    r.rating = r
        .ratings
        .iter()
        .fold(None::<(String, f32)>, |best, (n, p)| match best {
            Some((_, bp)) if bp >= *p => best,
            _ => Some((n.clone(), *p)),
        });
    r
}

/// The tags of a prompt as training text: A1111 syntax removed
/// ([`clean_prompt`]), split at commas, whitespace collapsed, empty and
/// repeated tags (by [`tag_key`]) dropped. Underscores are kept: a tag
/// the tagger knows takes its display form in [`caption`], the others
/// (`score_9`, trigger words) stay as the base model was prompted.
pub fn prompt_tags(prompt: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for t in clean_prompt(prompt).split(',') {
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        if !t.is_empty() && seen.insert(tag_key(&t)) {
            out.push(t);
        }
    }
    out
}

/// How much of a prompt the tagger confirms (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    /// `confirmed / checked`, `None` when nothing was checkable.
    pub score: Option<f64>,
    /// Prompt tags that name a general or character output.
    pub checked: usize,
    /// Checked tags the tagger output for the image.
    pub confirmed: Vec<String>,
    /// Checked tags it did not output, with their probability.
    pub missing: Vec<(String, f32)>,
}

/// Alignment of one image with its prompt tags (display form), given the
/// tagger's probabilities and its selection for the image.
pub fn alignment(prompt: &[String], probs: &[f32], labels: &Labels, sel: &TagResult) -> Alignment {
    let selected: HashSet<String> = sel.all().map(|t| tag_key(&t.name)).collect();
    let mut a = Alignment::default();
    for t in prompt {
        let Some(k) = labels.index_of(t) else {
            continue;
        };
        if !matches!(labels.categories[k], CATEGORY_GENERAL | CATEGORY_CHARACTER) {
            continue;
        }
        a.checked += 1;
        if selected.contains(&tag_key(t)) {
            a.confirmed.push(t.clone());
        } else {
            a.missing.push((t.clone(), probs[k]));
        }
    }
    if a.checked > 0 {
        a.score = Some(a.confirmed.len() as f64 / a.checked as f64);
    }
    a
}

/// Which text becomes the training caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The generation prompt, A1111 syntax removed, in prompt order.
    Prompt,
    /// The tagger's tags.
    Tags,
    /// The prompt's tags the tagger confirms, in prompt order, and
    /// confident extra tags after them (count tags lead).
    Merged,
}

impl Policy {
    /// Stable name (`prompt`, `tags`, `merged`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::Prompt => "prompt",
            Policy::Tags => "tags",
            Policy::Merged => "merged",
        }
    }

    /// Whether the policy needs a tagger.
    pub fn needs_tagger(self) -> bool {
        !matches!(self, Policy::Prompt)
    }
}

/// Caption-writing options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy.
    pub policy: Policy,
    /// The first N tags of the prompt lead the caption, verbatim and in
    /// order, whatever the policy (pairs with kohya's `--keep_tokens N`).
    pub keep_tokens: usize,
    /// Tags never written into a caption (any spelling).
    pub undesired: Vec<String>,
    /// `(from, to)` rewrites applied to caption tags (`to` empty: remove).
    pub replace: Vec<(String, String)>,
    /// `merged`: extra general tags (not in the prompt) need p ≥ this.
    pub extra_threshold: f32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Merged,
            keep_tokens: 0,
            undesired: Vec::new(),
            replace: Vec::new(),
            extra_threshold: 0.6,
        }
    }
}

/// Danbooru count tags (`1girl`, `2boys`, `6+girls`, `multiple girls`,
/// `solo`, `no humans`…), which lead a caption.
pub fn is_count_tag(tag: &str) -> bool {
    let t = tag_key(tag);
    if matches!(
        t.as_str(),
        "solo" | "no humans" | "multiple girls" | "multiple boys" | "multiple others"
    ) {
        return true;
    }
    let digits = t.trim_start_matches(|c: char| c.is_ascii_digit());
    let n = t.len() - digits.len();
    let rest = digits.strip_prefix('+').unwrap_or(digits);
    n > 0 && matches!(rest, "girl" | "girls" | "boy" | "boys" | "other" | "others")
}

/// Order tagger tags for a caption: count tags, then characters, then
/// general tags; by probability within each group (ties by name).
pub fn order_tags(tags: &[ScoredTag]) -> Vec<String> {
    let mut v: Vec<&ScoredTag> = tags.iter().collect();
    let group = |t: &ScoredTag| {
        if is_count_tag(&t.name) {
            0
        } else if t.category == CATEGORY_CHARACTER {
            1
        } else {
            2
        }
    };
    v.sort_by(|a, b| {
        group(a)
            .cmp(&group(b))
            .then(b.p.total_cmp(&a.p))
            .then(a.name.cmp(&b.name))
    });
    v.into_iter().map(|t| t.name.clone()).collect()
}

/// The [`tag_key`]s of the tags the tagger can check in a prompt: its
/// general and character outputs (see the module docs).
pub fn checkable_keys(labels: &Labels) -> HashSet<String> {
    labels
        .names
        .iter()
        .zip(&labels.categories)
        .filter(|(_, c)| matches!(**c, CATEGORY_GENERAL | CATEGORY_CHARACTER))
        .map(|(n, _)| tag_key(n))
        .collect()
}

/// Write the caption of one item, or `None` when the policy has nothing to
/// say (no prompt for `prompt`, no tagger result for `tags`/`merged`). With
/// its inputs it always writes one, empty when `undesired` / `replace`
/// leave no tag (trained as an empty caption, never as the raw prompt).
/// `merged` without a prompt is `tags`. `checkable`: [`checkable_keys`] of
/// the tagger; `merged` drops only the prompt tags among them that the
/// tagger did not confirm, and keeps the ones it cannot check (quality,
/// meta, rating, artist and trigger words), as the base model was prompted
/// with them.
pub fn caption(
    cfg: &PolicyConfig,
    prompt: Option<&[String]>,
    tags: Option<&TagResult>,
    checkable: &HashSet<String>,
) -> Option<String> {
    // A prompt tag the tagger knows is written as the tagger writes it
    // (`long_hair` → `long hair`, kaomoji kept); the rest verbatim.
    let prompt: Option<Vec<String>> = prompt.filter(|p| !p.is_empty()).map(|p| {
        p.iter()
            .map(|t| match checkable.contains(&tag_key(t)) {
                true => display_name(t),
                false => t.clone(),
            })
            .collect()
    });
    let prompt = prompt.as_deref();
    let body: Vec<String> = match cfg.policy {
        Policy::Prompt => prompt?.to_vec(),
        Policy::Tags => order_tags(&tags?.all().cloned().collect::<Vec<_>>()),
        Policy::Merged => {
            let tags = tags?;
            match prompt {
                None => order_tags(&tags.all().cloned().collect::<Vec<_>>()),
                Some(p) => {
                    let seen: HashSet<String> = tags.all().map(|t| tag_key(&t.name)).collect();
                    let in_prompt: HashSet<String> = p.iter().map(|t| tag_key(t)).collect();
                    // Count tags lead (Danbooru order); the prompt tags
                    // the tagger confirmed or cannot check keep the
                    // prompt's order, the order the base model was
                    // prompted with and its images are aligned to; then
                    // what the tagger adds.
                    let (count, rest): (Vec<String>, Vec<String>) = p
                        .iter()
                        .filter(|t| {
                            let k = tag_key(t);
                            seen.contains(&k) || !checkable.contains(&k)
                        })
                        .cloned()
                        .partition(|t| is_count_tag(t));
                    let (extra_count, extra_rest): (Vec<String>, Vec<String>) = order_tags(
                        &tags
                            .all()
                            .filter(|t| {
                                !in_prompt.contains(&tag_key(&t.name))
                                    && (t.category == CATEGORY_CHARACTER
                                        || t.p >= cfg.extra_threshold)
                            })
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                    .into_iter()
                    .partition(|t| is_count_tag(t));
                    [count, extra_count, rest, extra_rest].concat()
                }
            }
        }
    };
    let lead: &[String] = prompt.map_or(&[], |p| &p[..cfg.keep_tokens.min(p.len())]);
    let undesired: HashSet<String> = cfg.undesired.iter().map(|t| tag_key(t)).collect();
    let replace: HashMap<String, &str> = cfg
        .replace
        .iter()
        .map(|(f, t)| (tag_key(f), t.as_str()))
        .collect();
    // A lead tag is kept verbatim, and neither it nor what `replace` would
    // make of it is written again.
    let mut seen: HashSet<String> = lead
        .iter()
        .filter_map(|t| replace.get(&tag_key(t)))
        .map(|r| tag_key(r))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for (k, t) in lead.iter().chain(&body).enumerate() {
        let keep = k < lead.len();
        let t = if keep {
            t.clone()
        } else {
            match replace.get(&tag_key(t)) {
                Some(r) => r.trim().to_string(),
                None => t.clone(),
            }
        };
        if t.is_empty() || (!keep && undesired.contains(&tag_key(&t))) {
            continue;
        }
        if seen.insert(tag_key(&t)) {
            out.push(t);
        }
    }
    // The policy had what it needs: its caption, even an empty one (every
    // tag undesired). `None` would let training fall back to the raw
    // prompt, undesired tags and all.
    Some(out.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels::new(vec![
            ("general".into(), 9),
            ("sensitive".into(), 9),
            ("1girl".into(), 0),
            ("solo".into(), 0),
            ("red_hair".into(), 0),
            ("smile".into(), 0),
            ("^_^".into(), 0),
            ("outdoors".into(), 0),
            ("hatsune_miku".into(), 4),
            ("saber_(fate)".into(), 4),
        ])
    }

    fn tag(name: &str, category: u32, p: f32) -> ScoredTag {
        ScoredTag {
            name: name.into(),
            category,
            p,
        }
    }

    #[test]
    fn selection_uses_strict_thresholds_and_sorts() {
        let probs = [0.9, 0.2, 0.99, 0.35, 0.5, 0.36, 0.8, 0.1, 0.75, 0.76];
        let r = select_tags(&probs, &labels(), &Thresholds::default());
        let names: Vec<&str> = r.general.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["1girl", "^_^", "red hair", "smile"]); // solo at exactly 0.35 is out
        let chars: Vec<&str> = r.character.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(chars, ["saber (fate)"]); // miku at exactly 0.75 is out
        assert_eq!(r.rating, Some(("general".into(), 0.9)));
        assert_eq!(r.ratings.len(), 2);
    }

    #[test]
    fn mcut_splits_at_the_largest_gap() {
        assert_eq!(mcut_threshold(&[0.9, 0.8, 0.2, 0.1]), Some(0.5));
        assert_eq!(mcut_threshold(&[0.5]), None);
        let probs = [0.9, 0.2, 0.95, 0.9, 0.3, 0.25, 0.2, 0.1, 0.1, 0.12];
        let th = Thresholds {
            mcut: true,
            ..Thresholds::default()
        };
        let (g, c) = effective_thresholds(&probs, &labels(), &th);
        assert!((g - 0.6).abs() < 1e-6, "{g}");
        assert!((c - MCUT_CHARACTER_FLOOR).abs() < 1e-6, "{c}"); // (0.12+0.1)/2 < 0.15
        let r = select_tags(&probs, &labels(), &th);
        assert_eq!(r.general.len(), 2);
    }

    #[test]
    fn prompt_tags_drop_a1111_syntax() {
        assert_eq!(
            prompt_tags("masterpiece, (red hair:1.2), [smile], 1girl BREAK solo, red_hair, <lora:x:0.8> ^_^, \\(o\\)"),
            ["masterpiece", "red hair", "smile", "1girl", "solo", "^_^", "(o)"]
        );
        assert!(prompt_tags("  ,, ").is_empty());
    }

    #[test]
    fn alignment_counts_only_known_content_tags() {
        let l = labels();
        // 1girl confirmed, red hair missing, masterpiece unknown, "general" is a rating.
        let probs = [0.9, 0.1, 0.99, 0.2, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0];
        let sel = select_tags(&probs, &l, &Thresholds::default());
        let p = prompt_tags("masterpiece, 1girl, red hair, general, Smile");
        let a = alignment(&p, &probs, &l, &sel);
        assert_eq!(a.checked, 3);
        assert_eq!(a.confirmed, ["1girl", "Smile"]);
        assert_eq!(a.missing, [("red hair".to_string(), 0.1)]);
        assert_eq!(a.score, Some(2.0 / 3.0));
        let none = alignment(&prompt_tags("masterpiece"), &probs, &l, &sel);
        assert_eq!((none.score, none.checked), (None, 0));
    }

    #[test]
    fn count_tags_are_recognised() {
        for t in [
            "1girl",
            "2girls",
            "6+girls",
            "1boy",
            "solo",
            "no humans",
            "multiple_girls",
            "3others",
        ] {
            assert!(is_count_tag(t), "{t}");
        }
        for t in ["girl", "1", "red hair", "girls und panzer", "1girl hat"] {
            assert!(!is_count_tag(t), "{t}");
        }
    }

    fn result() -> TagResult {
        TagResult {
            rating: Some(("general".into(), 0.9)),
            ratings: vec![("general".into(), 0.9)],
            character: vec![tag("hatsune miku", 4, 0.8)],
            general: vec![
                tag("long hair", 0, 0.97),
                tag("1girl", 0, 0.95),
                tag("smile", 0, 0.7),
                tag("solo", 0, 0.5),
                tag("outdoors", 0, 0.4),
            ],
        }
    }

    #[test]
    fn tags_policy_orders_count_character_general() {
        let cfg = PolicyConfig {
            policy: Policy::Tags,
            ..PolicyConfig::default()
        };
        assert_eq!(
            caption(&cfg, None, Some(&result()), &checkable_keys(&labels())).unwrap(),
            "1girl, solo, hatsune miku, long hair, smile, outdoors"
        );
        assert_eq!(caption(&cfg, None, None, &checkable_keys(&labels())), None);
        // Every tag undesired: an empty caption, not "nothing to say"
        // (which let training fall back to the raw prompt).
        let none_left = PolicyConfig {
            policy: Policy::Prompt,
            undesired: vec!["1girl".into(), "solo".into()],
            ..PolicyConfig::default()
        };
        let p = prompt_tags("1girl, solo");
        let got = caption(&none_left, Some(&p), None, &checkable_keys(&labels()));
        assert_eq!(got.as_deref(), Some(""));
    }

    #[test]
    fn merged_keeps_confirmed_prompt_tags_and_confident_extras() {
        let cfg = PolicyConfig::default();
        let p = prompt_tags("1girl, outdoors, red hair, masterpiece");
        // outdoors (0.4 < extra 0.6) stays because the prompt asked for it,
        // and keeps its place after 1girl; red hair is checkable and not
        // confirmed; masterpiece is not a tag the tagger knows, so it stays
        // where the prompt put it; long hair and smile are confident
        // extras (after the prompt's tags); solo (0.5) is not; the
        // character always is.
        assert_eq!(
            caption(&cfg, Some(&p), Some(&result()), &checkable_keys(&labels())).unwrap(),
            "1girl, outdoors, masterpiece, hatsune miku, long hair, smile"
        );
        // The shipped 1girl recipe's prompts: quality and rating words stay
        // (the rating is a category-9 output, never checked), whatever
        // their place.
        let p = prompt_tags("highres, sensitive, 1girl, solo, outdoors");
        assert_eq!(
            caption(&cfg, Some(&p), Some(&result()), &checkable_keys(&labels())).unwrap(),
            "1girl, solo, highres, sensitive, outdoors, hatsune miku, long hair, smile"
        );
        // The prompt's order, not the tagger's, whatever the probabilities;
        // count tags lead, the prompt's then the tagger's.
        let p = prompt_tags("outdoors, smile, 1girl");
        assert_eq!(
            caption(&cfg, Some(&p), Some(&result()), &checkable_keys(&labels())).unwrap(),
            "1girl, outdoors, smile, hatsune miku, long hair"
        );
        let p = prompt_tags("outdoors, 1girl");
        let cfg_solo = PolicyConfig {
            extra_threshold: 0.45,
            ..PolicyConfig::default()
        };
        assert_eq!(
            caption(
                &cfg_solo,
                Some(&p),
                Some(&result()),
                &checkable_keys(&labels())
            )
            .unwrap(),
            "1girl, solo, outdoors, hatsune miku, long hair, smile"
        );
        // Without a prompt, merged is tags.
        assert_eq!(
            caption(&cfg, None, Some(&result()), &checkable_keys(&labels())).unwrap(),
            "1girl, solo, hatsune miku, long hair, smile, outdoors"
        );
    }

    #[test]
    fn keep_tokens_undesired_and_replacements() {
        let cfg = PolicyConfig {
            policy: Policy::Merged,
            keep_tokens: 2,
            undesired: vec!["long_hair".into(), "masterpiece".into()],
            replace: vec![
                ("smile".into(), "grin".into()),
                ("outdoors".into(), "".into()),
            ],
            ..PolicyConfig::default()
        };
        let p = prompt_tags("masterpiece, trigger word, 1girl, outdoors");
        // The two lead tags stay verbatim (undesired does not apply to them).
        assert_eq!(
            caption(&cfg, Some(&p), Some(&result()), &checkable_keys(&labels())).unwrap(),
            "masterpiece, trigger word, 1girl, hatsune miku, grin"
        );
        let prompt_cfg = PolicyConfig {
            policy: Policy::Prompt,
            ..cfg.clone()
        };
        assert_eq!(
            caption(&prompt_cfg, Some(&p), None, &checkable_keys(&labels())).unwrap(),
            "masterpiece, trigger word, 1girl"
        );
        assert_eq!(
            caption(
                &prompt_cfg,
                None,
                Some(&result()),
                &checkable_keys(&labels())
            ),
            None
        );
    }

    /// Regressions: every prompt tag lost its underscores (`score_9` and
    /// trigger words no longer matched what users prompt), and a lead tag
    /// that `replace` rewrites came back a second time as its replacement.
    #[test]
    fn lead_and_unknown_prompt_tags_stay_verbatim_and_once() {
        let cfg = PolicyConfig {
            policy: Policy::Merged,
            keep_tokens: 2,
            replace: vec![("1girl".into(), "woman".into())],
            ..PolicyConfig::default()
        };
        let p = prompt_tags("score_9, 1girl, ohwx_person, red_hair, ^_^");
        let known = checkable_keys(&labels());
        assert_eq!(
            caption(&cfg, Some(&p), Some(&result()), &known).unwrap(),
            "score_9, 1girl, ohwx_person, hatsune miku, long hair, smile"
        );
        let prompt_cfg = PolicyConfig {
            policy: Policy::Prompt,
            keep_tokens: 0,
            ..cfg
        };
        assert_eq!(
            caption(&prompt_cfg, Some(&p), None, &known).unwrap(),
            "score_9, woman, ohwx_person, red hair, ^_^"
        );
    }
}
