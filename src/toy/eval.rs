//! Prompt adherence of a model in the toy world (`eps2v toy eval`), and the
//! attribute reading shared with the toy tagger's accuracy gate.
//!
//! Why: the conversion's question is "does the model still draw what the
//! prompt asks?" (DESIGN.md §4). In the toy world that is measurable: a
//! fixed set of prompts from the toy template pack (`fixtures/prompts/toy`,
//! prompts `0..n` of seed 0) is sampled with fixed seeds, each image is read
//! by the toy tagger, and what it sees is compared with what the prompt asks
//! ([`super::parse_tags`]).
//!
//! Reading an image ([`read_tags`]): exclusive groups take the tagger's most
//! probable tag (count, size, background style, background colour); then
//! the `count` most probable `colour shape` tags (1 or 2: a scene's shapes
//! are distinct colour–kind pairs).
//!
//! Attributes ([`Attributes`], what adherence judges): `count` (1 or 2),
//! `shapes` (the multiset of shape kinds, e.g. {star, ring}), `colours`
//! (the multiset of shape colours), `background` (style and colour both
//! right). Adherence of an attribute = share of images where the reading
//! equals the prompt; `overall` = the mean of the four. `has_shapes` = share
//! of images where the tagger gives at least one `colour shape` tag a
//! probability ≥ 0.5 (the "still draws shapes" rate: a broken model draws
//! noise or flat fields, and the reading above always names a shape).
//! The same attribute comparison on fresh scenes (true tags instead of a
//! prompt) is the toy tagger's accuracy gate ([`tagger_attribute_accuracy`]).

use std::time::Instant;

use serde::Serialize;

use super::scenes::{parse_tags, SceneSpec, TOY_BUCKETS};
use crate::diffusion::{SamplerKind, UncondMode};
use crate::models::tagger::Tagger;
use crate::pipeline::sample::{sample_many, BatchItem, Rendered, SampleConfig};
use crate::pipeline::SdxlModel;
use crate::stages::Ctx;
use crate::{Error, Result};

/// Settings of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalOptions {
    /// Number of prompts (prompt `i` of the toy pack at seed `prompt_seed`,
    /// image seed `i`, bucket `i mod 3`).
    pub prompts: usize,
    /// Seed of the prompt set.
    pub prompt_seed: u64,
    /// Euler sampling steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// CFG rescale φ; `None`: the sampler's default for the prediction
    /// type (0.7 for v, 0 for eps).
    pub rescale: Option<f64>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            prompts: 64,
            prompt_seed: 0,
            steps: 12,
            cfg: 5.0,
            rescale: None,
        }
    }
}

/// The four adherence attributes (module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Attributes {
    /// Count right.
    pub count: f64,
    /// Shape kinds right.
    pub shapes: f64,
    /// Shape colours right.
    pub colours: f64,
    /// Background style and colour right.
    pub background: f64,
}

impl Attributes {
    /// The mean of the four.
    pub fn mean(&self) -> f64 {
        (self.count + self.shapes + self.colours + self.background) / 4.0
    }
}

/// One evaluated prompt.
#[derive(Debug, Clone, Serialize)]
pub struct EvalItem {
    /// The prompt.
    pub prompt: String,
    /// Image size.
    pub size: (u32, u32),
    /// What the tagger read.
    pub read: Vec<String>,
    /// Per attribute: count, shapes, colours, background.
    pub ok: [bool; 4],
    /// Some `colour shape` tag has probability ≥ 0.5.
    pub sees_shape: bool,
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ToyEval {
    /// The model's prediction type as sampled.
    pub prediction: String,
    /// Sampled on the ZTSNR schedule.
    pub ztsnr: bool,
    /// Settings.
    pub options: EvalOptions,
    /// Adherence per attribute.
    pub adherence: Attributes,
    /// Mean of the four attributes.
    pub overall: f64,
    /// Share of images where the tagger sees at least one shape.
    pub has_shapes: f64,
    /// Every prompt.
    pub items: Vec<EvalItem>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Prompts `0..n` of the toy template pack (the built-in `toy`, embedded
/// from `fixtures/prompts/toy`; an installed binary has no source tree) at
/// `seed`.
pub fn prompt_set(n: usize, seed: u64) -> Result<Vec<String>> {
    let t = crate::prompts::load(&crate::prompts::TemplateSpec::Builtin("toy".into()), None)?;
    Ok((0..n as u64)
        .map(|i| crate::prompts::tidy(&t.random(seed, i)))
        .collect())
}

/// What the tagger reads from one image's probabilities (module docs), as
/// scene tags (spaces, not underscores). The tagger must be a toy tagger.
pub fn read_tags(tagger: &Tagger, probs: &[f32]) -> Result<Vec<String>> {
    let p = |tag: &str| -> Result<f32> {
        let k = tagger
            .labels
            .index_of(&tag.replace(' ', "_"))
            .ok_or_else(|| {
                Error::model(format!(
                    "tagger {}: no output for the scene tag '{tag}'; pass a toy tagger (--tagger)",
                    tagger.id
                ))
            })?;
        probs
            .get(k)
            .copied()
            .ok_or_else(|| Error::model(format!("tagger {}: too few outputs", tagger.id)))
    };
    let best = |group: &[String]| -> Result<String> {
        let mut top = (f32::NEG_INFINITY, String::new());
        for t in group {
            let v = p(t)?;
            if v > top.0 {
                top = (v, t.clone());
            }
        }
        Ok(top.1)
    };
    let all = super::scenes::all_tags();
    let g = |f: &dyn Fn(&str) -> bool| -> Vec<String> {
        all.iter().filter(|t| f(t)).cloned().collect()
    };
    let counts = g(&|t| t == "1shape" || t == "2shapes");
    let sizes = g(&|t| matches!(t, "small" | "medium" | "large"));
    let styles = g(&|t| {
        matches!(
            t,
            "simple background" | "gradient background" | "striped background"
        )
    });
    let bg_colours = g(&|t| t.ends_with(" background") && !styles.iter().any(|s| s == t));
    let shapes = g(&|t| t.contains(' ') && !t.ends_with(" background"));
    let count = best(&counts)?;
    // As many `colour shape` tags as the count says, most probable first
    // (a scene's shapes are distinct pairs): a threshold would let one
    // shape at p = 0.45, or a third at 0.55, spoil an otherwise right read.
    let k = if count == "2shapes" { 2 } else { 1 };
    let mut ranked = Vec::with_capacity(shapes.len());
    for s in shapes {
        ranked.push((p(&s)?, s));
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out = vec![count];
    out.extend(ranked.into_iter().take(k).map(|(_, s)| s));
    out.push(best(&sizes)?);
    out.push(best(&styles)?);
    out.push(best(&bg_colours)?);
    Ok(out)
}

/// Whether the tagger gives some `colour shape` tag a probability ≥ 0.5
/// (the "still draws shapes" test; module docs).
pub fn sees_a_shape(tagger: &Tagger, probs: &[f32]) -> bool {
    tagger.labels.names.iter().zip(probs).any(|(name, &p)| {
        p >= 0.5 && {
            let t = name.replace('_', " ");
            t.contains(' ') && !t.ends_with(" background")
        }
    })
}

/// Read one image's probabilities ([`read_tags`]) and compare the reading
/// with what was asked ([`attributes_match`]). Returns the reading too.
pub fn judge(
    tagger: &Tagger,
    asked: &SceneSpec,
    probs: &[f32],
) -> Result<([bool; 4], Vec<String>)> {
    let read = read_tags(tagger, probs)?;
    let seen = parse_tags(&read.join(", "))?;
    Ok((attributes_match(asked, &seen), read))
}

/// Compare what is seen with what is asked: `[count, shapes, colours,
/// background]` right (module docs).
pub fn attributes_match(asked: &SceneSpec, seen: &SceneSpec) -> [bool; 4] {
    let kinds = |s: &SceneSpec| {
        let mut v: Vec<_> = s.shapes.iter().map(|(_, k)| *k).collect();
        v.sort();
        v
    };
    let colours = |s: &SceneSpec| {
        let mut v: Vec<_> = s.shapes.iter().map(|(c, _)| *c).collect();
        v.sort();
        v
    };
    [
        asked.count == seen.count,
        kinds(asked) == kinds(seen),
        colours(asked) == colours(seen),
        asked.background == seen.background && asked.background_colour == seen.background_colour,
    ]
}

/// Per-attribute shares of `[count, shapes, colours, background]` results.
pub fn shares(oks: &[[bool; 4]]) -> Attributes {
    let n = oks.len().max(1) as f64;
    let share = |i: usize| oks.iter().filter(|o| o[i]).count() as f64 / n;
    Attributes {
        count: share(0),
        shapes: share(1),
        colours: share(2),
        background: share(3),
    }
}

/// The unconditional branch the model was trained with (zeroed when it
/// does not say).
fn model_uncond(model: &SdxlModel) -> Result<UncondMode> {
    match &model.info.trained_uncond {
        Some(t) => t.parse::<UncondMode>(),
        None => Ok(UncondMode::Zero),
    }
}

/// The sampling settings of one evaluated image: Euler, `opts`' steps,
/// CFG and rescale, the schedule the model defaults to, image seed `seed`.
fn image_config(
    prompt: &str,
    uncond: &UncondMode,
    seed: u64,
    (width, height): (u32, u32),
    opts: &EvalOptions,
) -> SampleConfig {
    SampleConfig {
        prompt: prompt.to_string(),
        uncond: uncond.clone(),
        seed,
        steps: opts.steps,
        cfg: opts.cfg,
        rescale: opts.rescale,
        sampler: SamplerKind::Euler,
        schedule: None,
        width,
        height,
        batch: 1,
    }
}

/// The tagger's reading of `img` against `prompt`: per-attribute
/// agreement, the tags read, and whether it sees a shape.
fn read_image(
    tagger: &Tagger,
    img: &image::RgbImage,
    prompt: &str,
) -> Result<([bool; 4], Vec<String>, bool)> {
    let x = tagger
        .preprocess
        .batch(&[tagger.preprocess.image(img)], tagger.device())?;
    let probs = tagger.probabilities(&x)?;
    let (ok, read) = judge(tagger, &parse_tags(prompt)?, &probs[0])?;
    Ok((ok, read, sees_a_shape(tagger, &probs[0])))
}

/// Images per UNet call in [`evaluate`] (a speed knob: no pixel changes).
const EVAL_BATCH: usize = 8;

/// Sample the toy prompt set with `model` (its own prediction type and
/// ZTSNR flag, as loaded), read each image with `tagger`, and measure
/// adherence (module docs).
pub fn evaluate(
    model: &SdxlModel,
    tagger: &Tagger,
    opts: &EvalOptions,
    ctx: &Ctx,
) -> Result<ToyEval> {
    if opts.prompts == 0 || opts.steps == 0 {
        return Err(Error::config("toy eval: prompts and steps must be > 0"));
    }
    let t0 = Instant::now();
    let prompts = prompt_set(opts.prompts, opts.prompt_seed)?;
    let uncond = model_uncond(model)?;
    let bar = ctx.bar(prompts.len() as u64, "toy eval");
    // Prompt i is drawn at toy bucket i mod 3 with seed i; the images of
    // one size are sampled together (`sample_many`: batches on lanes, the
    // pixels of one `generate` each), then read in prompt order.
    let mut images: Vec<Option<image::RgbImage>> = vec![None; prompts.len()];
    for (k, &size) in TOY_BUCKETS.iter().enumerate() {
        let idx: Vec<usize> = (k..prompts.len()).step_by(TOY_BUCKETS.len()).collect();
        if idx.is_empty() {
            continue;
        }
        let items: Vec<BatchItem> = idx
            .iter()
            .map(|&i| BatchItem {
                prompt: prompts[i].clone(),
                uncond: uncond.clone(),
                seed: i as u64,
            })
            .collect();
        let cfg = image_config("", &uncond, 0, size, opts);
        let rendered = sample_many(model, &cfg, &items, EVAL_BATCH)?;
        for (&i, r) in idx.iter().zip(rendered) {
            images[i] = Some(match r {
                Rendered::Image(g) => g.image,
                Rendered::Broken { reason, .. } => {
                    return Err(Error::model(format!("toy eval: prompt {i}: {reason}")))
                }
            });
        }
        bar.inc(idx.len() as u64);
    }
    let mut items = Vec::with_capacity(prompts.len());
    for (i, (prompt, img)) in prompts.iter().zip(images).enumerate() {
        let img =
            img.ok_or_else(|| Error::Other("toy eval: the sampler returned no image".into()))?;
        let (ok, read, sees_shape) = read_image(tagger, &img, prompt)?;
        items.push(EvalItem {
            prompt: prompt.clone(),
            size: TOY_BUCKETS[i % TOY_BUCKETS.len()],
            ok,
            read,
            sees_shape,
        });
    }
    bar.finish_and_clear();
    let oks: Vec<[bool; 4]> = items.iter().map(|i| i.ok).collect();
    let adherence = shares(&oks);
    let has_shapes =
        items.iter().filter(|i| i.sees_shape).count() as f64 / items.len().max(1) as f64;
    Ok(ToyEval {
        prediction: model.info.prediction.to_string(),
        ztsnr: model.info.ztsnr,
        options: opts.clone(),
        overall: adherence.mean(),
        adherence,
        has_shapes,
        items,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One start of a [`denoise_curve`].
#[derive(Debug, Clone, Serialize)]
pub struct DenoiseRow {
    /// First step run (of the `steps`-step schedule).
    pub step: usize,
    /// σ the scenes were noised to.
    pub sigma: f64,
    /// Adherence per attribute of the denoised scenes.
    pub adherence: Attributes,
    /// Mean of the four attributes.
    pub overall: f64,
    /// Share of images where the tagger sees at least one shape.
    pub has_shapes: f64,
}

/// Where along the sampling path a model loses what adherence judges
/// (`eps2v toy eval --denoise-from`): `count` fresh scenes of `seed` (each
/// at its own size) are encoded by the model's VAE, noised (image seed
/// *i*) to the σ of each step in `starts` of the `opts.steps`-step
/// schedule, and denoised from there with their own captions as prompts
/// (Euler, `opts.cfg`), then read as in [`evaluate`]. Starting at the last
/// step gives about the VAE ceiling; starting at step 0 is txt2img with the
/// true scene under the noise (the terminal step's leftover signal);
/// a model that keeps the scene from a start σ is a good denoiser there.
pub fn denoise_curve(
    model: &SdxlModel,
    tagger: &Tagger,
    opts: &EvalOptions,
    starts: &[usize],
    (seed, count): (u64, usize),
    ctx: &Ctx,
) -> Result<Vec<DenoiseRow>> {
    use crate::pipeline::latent::from_rgb8;
    use crate::pipeline::sample::{sample_batch_from, BatchItem, Rendered, Start};
    if count == 0 || opts.steps == 0 {
        return Err(Error::config("toy eval: scenes and steps must be > 0"));
    }
    let uncond = model_uncond(model)?;
    let scenes: Vec<super::Scene> = (0..count as u64)
        .map(|i| super::Scene::random(seed, i))
        .collect();
    let latents = scenes
        .iter()
        .map(|sc| {
            let x = from_rgb8(&sc.render(), &model.device)?.to_dtype(model.vae.dtype())?;
            Ok(model.vae.encode_scaled(&x)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let sigmas = crate::diffusion::ScheduleKind::default_for(model.info.ztsnr)
        .sigmas(&model.schedule(), opts.steps)?;
    let bar = ctx.bar((starts.len() * count) as u64, "toy eval: denoise");
    let _warm = crate::nn::keep_warm();
    let mut rows = Vec::with_capacity(starts.len());
    for &step in starts {
        if step >= opts.steps {
            return Err(Error::config(format!(
                "toy eval: --denoise-from {step} is outside 0..{} (the --steps)",
                opts.steps
            )));
        }
        let sigma = sigmas[step];
        let mut oks = Vec::with_capacity(count);
        let mut seen = 0usize;
        for (i, sc) in scenes.iter().enumerate() {
            let prompt = sc.caption();
            let cfg = image_config(&prompt, &uncond, i as u64, (sc.width, sc.height), opts);
            let item = BatchItem {
                prompt: prompt.clone(),
                uncond: uncond.clone(),
                seed: i as u64,
            };
            let start = Start {
                latents: std::slice::from_ref(&latents[i]),
                step,
            };
            let img = match sample_batch_from(model, &cfg, &[item], Some(&start), &mut |_, _| {})?
                .pop()
            {
                Some(Rendered::Image(g)) => g.image,
                Some(Rendered::Broken { reason, .. }) => {
                    return Err(Error::model(format!("toy eval: scene {i}: {reason}")))
                }
                None => {
                    return Err(Error::Other(
                        "toy eval: the sampler returned no image".into(),
                    ))
                }
            };
            let (ok, _, sees_shape) = read_image(tagger, &img, &prompt)?;
            oks.push(ok);
            seen += usize::from(sees_shape);
            bar.inc(1);
        }
        let adherence = shares(&oks);
        rows.push(DenoiseRow {
            step,
            sigma,
            overall: adherence.mean(),
            adherence,
            has_shapes: seen as f64 / count as f64,
        });
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// `img` encoded by `model`'s VAE to its latent mean and decoded again, as
/// RGB8 (the path of a generated image: latent → decoder → PNG).
pub fn round_trip(model: &SdxlModel, img: &image::RgbImage) -> Result<image::RgbImage> {
    use crate::pipeline::latent::{decode_unit, from_rgb8, to_rgb8};
    let x = from_rgb8(img, &model.device)?.to_dtype(model.vae.dtype())?;
    to_rgb8(&decode_unit(model, &model.vae.encode_scaled(&x)?)?)
}

/// The most adherence a model with this VAE can show: the tagger's
/// attribute accuracy (as [`tagger_attribute_accuracy`]) on VAE round trips
/// of `count` fresh scenes of `seed` (encode → latent mean → decode). A
/// blurry decoder caps what any UNet trained in its latent space is judged
/// to draw; `eps2v toy eval --reconstruct N` prints it.
pub fn vae_ceiling(
    model: &SdxlModel,
    tagger: &Tagger,
    seed: u64,
    count: usize,
) -> Result<Attributes> {
    let mut oks = Vec::with_capacity(count);
    for i in 0..count as u64 {
        let scene = super::Scene::random(seed, i);
        let back = round_trip(model, &scene.render())?;
        oks.push(read_image(tagger, &back, &scene.caption())?.0);
    }
    Ok(shares(&oks))
}

/// The toy tagger's accuracy on exactly what adherence judges: on `count`
/// scenes of `seed`, the share whose attributes the tagger reads exactly
/// right, per attribute (module docs); the gate is their mean.
pub fn tagger_attribute_accuracy(tagger: &Tagger, seed: u64, count: usize) -> Result<Attributes> {
    let mut oks = Vec::with_capacity(count);
    crate::toy::tagger::tag_fresh_scenes(tagger, seed, count, |s, p| {
        oks.push(judge(tagger, &parse_tags(&s.caption())?, p)?.0);
        Ok(())
    })?;
    Ok(shares(&oks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_compare_kinds_colours_and_background() {
        let a =
            parse_tags("2shapes, red star, blue ring, small, striped background, white background")
                .unwrap();
        // Colours swapped between the shapes: kinds and colours still right.
        let b =
            parse_tags("2shapes, blue star, red ring, small, striped background, white background")
                .unwrap();
        assert_eq!(attributes_match(&a, &b), [true, true, true, true]);
        let c =
            parse_tags("1shape, red star, small, gradient background, white background").unwrap();
        assert_eq!(attributes_match(&a, &c), [false, false, false, false]);
        let d =
            parse_tags("2shapes, red star, blue star, small, striped background, black background")
                .unwrap();
        assert_eq!(attributes_match(&a, &d), [true, false, true, false]);
        let s = shares(&[[true, true, false, false], [true, false, false, true]]);
        assert_eq!(
            (s.count, s.shapes, s.colours, s.background),
            (1.0, 0.5, 0.0, 0.5)
        );
        assert_eq!(s.mean(), 0.5);
    }

    #[test]
    fn the_prompt_set_is_fixed_and_parses() {
        let a = prompt_set(16, 0).unwrap();
        assert_eq!(a, prompt_set(16, 0).unwrap());
        for p in &a {
            let s = parse_tags(p).unwrap();
            assert!(s.count.is_some() && !s.shapes.is_empty(), "{p}");
        }
    }
}
