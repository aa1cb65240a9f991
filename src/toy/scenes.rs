//! Procedural toy scenes: one or two coloured shapes on a plain, gradient or
//! striped background, each scene with its true Danbooru-style tags.
//!
//! Why: the toy world (DESIGN.md §4) needs images whose content is known
//! exactly, so that a tiny tagger can be trained on them and a tiny base
//! model's prompt adherence can be measured ("1girl" prompts become
//! "1shape" prompts). A scene is a pure function of `(seed, index)`
//! ([`Scene::random`], a ChaCha8 stream per index), so any scene of a
//! dataset can be redrawn without the others.
//!
//! Sizes: the toy buckets [`TOY_BUCKETS`] are 64×64, 96×64 and 64×96.
//! Sides must be multiples of 32: the VAE divides by 8 and the SDXL-layout
//! UNet halves the latent twice (three levels), and its skip connections
//! only line up when every level has an integer size (an 80-pixel side
//! gives a 10-latent, 5, then 3 → upsampled to 6 ≠ 5). They are the list
//! the bucket stage's kohya generator makes for `--kohya-resolution 80
//! --step 32 --min-side 64 --max-side 96` (test below), so `eps2v bucket`
//! keeps every scene at its own size.
//!
//! Drawing: every pixel is the mean of 4×4 sub-samples (antialiased
//! edges). Shapes are sized from `m = min(width, height)`: radius 0.16·m
//! (small), 0.24·m (medium), 0.34·m (large); a square's half side is 0.85·r,
//! a triangle is equilateral with circumradius r pointing up, a star has
//! five points (inner radius 0.45·r), a ring spans 0.6·r..r. A position is
//! only used when the whole shape fits in the image, and two shapes (same
//! size, small or medium) sit at a quarter and three quarters of the long
//! side, so they never overlap.
//!
//! What the tags leave free (drawn per scene, so that a prompt does not fix
//! its image and the sampler's noise decides something, as in real
//! datasets): the radius varies by ×0.9..1.1 for one shape (the size classes
//! stay apart: 0.176·m < 0.216·m, 0.264·m < 0.306·m) and ×0.9..1.0 for two;
//! a single shape's centre moves by up to ±7 % of the width and height,
//! two shapes' centres by up to ±10 % of the short side across the long
//! side (never along it, so they cannot touch), always kept whole in the
//! image; a gradient runs downwards or upwards (the tagged colour at the
//! top or the bottom); stripes run along either diagonal at any phase.
//!
//! Tag order (fixed; [`Scene::tags`]): count (`1shape` / `2shapes`); one
//! `"{colour} {shape}"` per shape, left to right (top to bottom in portrait
//! images); size (`small` / `medium` / `large`); for one shape its
//! horizontal position (`left` / `center` / `right`) then, when not
//! vertically centred, `top` / `bottom`; the background style
//! (`simple background` / `gradient background` / `striped background`);
//! the background colour (`"{colour} background"`). Example:
//! `1shape, red circle, large, center, striped background, blue background`.
//! [`parse_tags`] reads such a prompt back into a [`SceneSpec`].

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::imaging::buckets::Bucket;

/// The toy aspect-ratio buckets (width, height): square, 3:2 landscape,
/// 2:3 portrait. Sides are multiples of 32 (module docs).
pub const TOY_BUCKETS: [(u32, u32); 3] = [(64, 64), (96, 64), (64, 96)];

/// The toy buckets as [`Bucket`]s.
pub fn toy_buckets() -> Vec<Bucket> {
    TOY_BUCKETS
        .iter()
        .map(|&(w, h)| Bucket::new(w, h))
        .collect()
}

pub use super::tags::{all_tags, parse_tags, BgStyle, Colour, HPos, SceneSpec, Shape, Size, VPos};

/// One drawn shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacedShape {
    /// Kind.
    pub shape: Shape,
    /// Fill colour.
    pub colour: Colour,
    /// Centre x in pixels.
    pub cx: f64,
    /// Centre y in pixels.
    pub cy: f64,
    /// Radius in pixels (module docs).
    pub r: f64,
}

impl PlacedShape {
    /// Is the point `(x, y)` (pixel coordinates, pixel centres at +0.5)
    /// inside the shape?
    pub fn contains(&self, x: f64, y: f64) -> bool {
        self.contains_in(x, y, &self.outline())
    }

    /// The polygon of a triangle or star, relative to the centre (empty for
    /// the other shapes).
    fn outline(&self) -> Vec<(f64, f64)> {
        match self.shape {
            Shape::Triangle => regular_star(3, self.r, None),
            Shape::Star => regular_star(5, self.r, Some(0.45 * self.r)),
            _ => Vec::new(),
        }
    }

    /// [`Self::contains`] with the outline computed once.
    fn contains_in(&self, x: f64, y: f64, outline: &[(f64, f64)]) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let r = self.r;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Ring => {
                let d2 = dx * dx + dy * dy;
                d2 <= r * r && d2 >= (0.6 * r) * (0.6 * r)
            }
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            Shape::Triangle | Shape::Star => in_polygon(dx, dy, outline),
        }
    }

    /// A pixel `(x, y)` whose centre lies well inside the shape (the centre;
    /// for a ring, on its band to the right of the centre).
    pub fn probe_pixel(&self) -> (u32, u32) {
        let x = if self.shape == Shape::Ring {
            self.cx + 0.8 * self.r
        } else {
            self.cx
        };
        (x.floor() as u32, self.cy.floor() as u32)
    }
}

/// Vertices of a regular polygon (`inner = None`) or star (alternating
/// outer radius `r` and `inner`), first vertex straight up (y grows down).
fn regular_star(points: usize, r: f64, inner: Option<f64>) -> Vec<(f64, f64)> {
    let step = if inner.is_some() { 2 * points } else { points };
    (0..step)
        .map(|i| {
            let a = -std::f64::consts::FRAC_PI_2 + std::f64::consts::TAU * i as f64 / step as f64;
            let rad = match inner {
                Some(ri) if i % 2 == 1 => ri,
                _ => r,
            };
            (rad * a.cos(), rad * a.sin())
        })
        .collect()
}

/// Even-odd point-in-polygon test.
fn in_polygon(x: f64, y: f64, poly: &[(f64, f64)]) -> bool {
    let mut inside = false;
    let n = poly.len();
    for i in 0..n {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[(i + n - 1) % n];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
    }
    inside
}

/// A scene: what is drawn and what its tags say.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Width in pixels (one of [`TOY_BUCKETS`]).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// One or two shapes, left to right (top to bottom in portrait images).
    pub shapes: Vec<PlacedShape>,
    /// Size class shared by the shapes.
    pub size: Size,
    /// Position of a single shape (`None` with two shapes).
    pub position: Option<(HPos, VPos)>,
    /// Background style.
    pub background: BgStyle,
    /// Background colour (never the colour of a shape).
    pub background_colour: Colour,
    /// Untagged: a gradient runs upwards (the colour at the bottom),
    /// stripes run along the other diagonal.
    pub flip: bool,
    /// Untagged: stripe phase in pixels (0..16).
    pub phase: u32,
}

/// Stripe width in pixels (a period is two stripes).
const STRIPE: u32 = 8;

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

impl Scene {
    /// Scene `index` of the set made with `seed`: depends only on the pair
    /// (ChaCha8 seeded with `seed`, stream `index`).
    pub fn random(seed: u64, index: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index);
        let (width, height) = pick(&mut rng, &TOY_BUCKETS);
        let (w, h) = (f64::from(width), f64::from(height));
        let m = w.min(h);
        let two = rng.random_bool(0.35);
        let mut colours: Vec<Colour> = Colour::ALL.to_vec();
        let take_colour = |rng: &mut ChaCha8Rng, colours: &mut Vec<Colour>| {
            colours.remove(rng.random_range(0..colours.len()))
        };
        let background_colour = take_colour(&mut rng, &mut colours);
        let background = pick(&mut rng, &BgStyle::ALL);
        let flip = rng.random_bool(0.5);
        let phase = rng.random_range(0..2 * STRIPE);
        // A centre `c` moved by up to ±`j`, kept where a radius-`r` shape
        // is whole within `0..len`.
        let jitter = |rng: &mut ChaCha8Rng, c: f64, j: f64, r: f64, len: f64| {
            (c + rng.random_range(-j..=j)).clamp(r - 0.5, len + 0.5 - r)
        };
        let (shapes, size, position) = if two {
            let size = pick(&mut rng, &[Size::Small, Size::Medium]);
            let r = size.radius_fraction() * m * rng.random_range(0.9..=1.0);
            let a = (
                pick(&mut rng, &Shape::ALL),
                take_colour(&mut rng, &mut colours),
            );
            // A different (shape, colour) pair: the second colour is drawn
            // from the colours left, so the pair always differs.
            let b = (
                pick(&mut rng, &Shape::ALL),
                take_colour(&mut rng, &mut colours),
            );
            let mut place = |(shape, colour): (Shape, Colour), f: f64| {
                let (cx, cy) = if height > width {
                    (jitter(&mut rng, w / 2.0, 0.1 * m, r, w), h * f)
                } else {
                    (w * f, jitter(&mut rng, h / 2.0, 0.1 * m, r, h))
                };
                PlacedShape {
                    shape,
                    colour,
                    cx,
                    cy,
                    r,
                }
            };
            (vec![place(a, 0.25), place(b, 0.75)], size, None)
        } else {
            let size = pick(&mut rng, &Size::ALL);
            let r = size.radius_fraction() * m * rng.random_range(0.9..=1.1);
            // Positions where the whole shape fits (centre always does).
            let fits = |c: f64, len: f64| c - r >= -0.5 && c + r <= len + 0.5;
            let hs: Vec<HPos> = HPos::ALL
                .into_iter()
                .filter(|p| fits(p.fraction() * w, w))
                .collect();
            let vs: Vec<VPos> = VPos::ALL
                .into_iter()
                .filter(|p| fits(p.fraction() * h, h))
                .collect();
            let hp = pick(&mut rng, &hs);
            let vp = pick(&mut rng, &vs);
            let shape = pick(&mut rng, &Shape::ALL);
            let colour = take_colour(&mut rng, &mut colours);
            let cx = jitter(&mut rng, hp.fraction() * w, 0.07 * w, r, w);
            let cy = jitter(&mut rng, vp.fraction() * h, 0.07 * h, r, h);
            let one = PlacedShape {
                shape,
                colour,
                cx,
                cy,
                r,
            };
            (vec![one], size, Some((hp, vp)))
        };
        Scene {
            width,
            height,
            shapes,
            size,
            position,
            background,
            background_colour,
            flip,
            phase,
        }
    }

    /// The true tags, in the fixed order of the module docs.
    pub fn tags(&self) -> Vec<String> {
        let mut t = vec![if self.shapes.len() == 1 {
            "1shape".to_string()
        } else {
            "2shapes".to_string()
        }];
        for s in &self.shapes {
            t.push(format!("{} {}", s.colour.name(), s.shape.name()));
        }
        t.push(self.size.name().into());
        if let Some((hp, vp)) = self.position {
            t.push(hp.name().into());
            if let Some(v) = vp.tag() {
                t.push(v.into());
            }
        }
        t.push(self.background.tag().into());
        t.push(format!("{} background", self.background_colour.name()));
        t
    }

    /// The tags joined with `", "` (the `.txt` sidecar caption).
    pub fn caption(&self) -> String {
        self.tags().join(", ")
    }

    /// What the tags of this scene say, as [`parse_tags`] reads them.
    pub fn spec(&self) -> SceneSpec {
        SceneSpec {
            count: Some(self.shapes.len()),
            shapes: self
                .shapes
                .iter()
                .map(|s| (Some(s.colour), s.shape))
                .collect(),
            size: Some(self.size),
            hpos: self.position.map(|p| p.0),
            vpos: self.position.and_then(|p| p.1.tag().map(|_| p.1)),
            background: Some(self.background),
            background_colour: Some(self.background_colour),
            unknown: Vec::new(),
        }
    }

    /// Background colour at pixel `(x, y)` (before shapes), as floats.
    fn background_at(&self, x: u32, y: u32) -> [f64; 3] {
        let c = self.background_colour.rgb().map(f64::from);
        let k = self.background_colour.contrast().map(f64::from);
        let mix = |t: f64| [0, 1, 2].map(|i| c[i] + (k[i] - c[i]) * t);
        match self.background {
            BgStyle::Plain => c,
            BgStyle::Gradient => {
                let t = if self.height > 1 {
                    f64::from(y) / f64::from(self.height - 1)
                } else {
                    0.0
                };
                mix(0.5 * if self.flip { 1.0 - t } else { t })
            }
            BgStyle::Striped => {
                let d = if self.flip {
                    x + self.height - 1 - y
                } else {
                    x + y
                };
                if ((d + self.phase) / STRIPE) % 2 == 0 {
                    c
                } else {
                    mix(0.5)
                }
            }
        }
    }

    /// Draw the scene (4×4 supersampled shape edges).
    pub fn render(&self) -> RgbImage {
        const SS: u32 = 4;
        let mut img = RgbImage::new(self.width, self.height);
        let outlines: Vec<Vec<(f64, f64)>> = self.shapes.iter().map(|s| s.outline()).collect();
        for y in 0..self.height {
            for x in 0..self.width {
                let mut px = self.background_at(x, y);
                for (s, outline) in self.shapes.iter().zip(&outlines) {
                    // Pixels outside the shape's bounding square are skipped.
                    let (px0, py0) = (f64::from(x), f64::from(y));
                    if px0 + 1.0 < s.cx - s.r
                        || px0 > s.cx + s.r
                        || py0 + 1.0 < s.cy - s.r
                        || py0 > s.cy + s.r
                    {
                        continue;
                    }
                    let mut hits = 0u32;
                    for sy in 0..SS {
                        for sx in 0..SS {
                            let fx = px0 + (f64::from(sx) + 0.5) / f64::from(SS);
                            let fy = py0 + (f64::from(sy) + 0.5) / f64::from(SS);
                            if s.contains_in(fx, fy, outline) {
                                hits += 1;
                            }
                        }
                    }
                    if hits > 0 {
                        let a = f64::from(hits) / f64::from(SS * SS);
                        let c = s.colour.rgb().map(f64::from);
                        px = [0, 1, 2].map(|i| px[i] * (1.0 - a) + c[i] * a);
                    }
                }
                img.put_pixel(x, y, Rgb(px.map(|v| v.round().clamp(0.0, 255.0) as u8)));
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(px: &Rgb<u8>, c: [u8; 3], tol: i32) -> bool {
        (0..3).all(|i| (i32::from(px.0[i]) - i32::from(c[i])).abs() <= tol)
    }

    #[test]
    fn scenes_are_deterministic_per_seed_and_index() {
        for i in 0..20 {
            let a = Scene::random(7, i);
            assert_eq!(a, Scene::random(7, i));
            assert_eq!(a.render(), Scene::random(7, i).render());
        }
        let differ = (0..20).filter(|&i| Scene::random(7, i) != Scene::random(8, i));
        assert!(differ.count() >= 18);
        // Index i does not depend on the other indices.
        assert_ne!(Scene::random(7, 0), Scene::random(7, 1));
    }

    #[test]
    fn drawn_pixels_match_the_tags() {
        for i in 0..300 {
            let s = Scene::random(1, i);
            let img = s.render();
            assert_eq!((img.width(), img.height()), (s.width, s.height));
            assert!(TOY_BUCKETS.contains(&(s.width, s.height)));
            for sh in &s.shapes {
                let (x, y) = sh.probe_pixel();
                assert!(
                    close(img.get_pixel(x, y), sh.colour.rgb(), 1),
                    "scene {i}: {} at ({x},{y}) is {:?}",
                    s.caption(),
                    img.get_pixel(x, y)
                );
                assert_ne!(sh.colour, s.background_colour);
                // Whole shape inside the image.
                assert!(sh.cx - sh.r >= -0.5 && sh.cx + sh.r <= f64::from(s.width) + 0.5);
                assert!(sh.cy - sh.r >= -0.5 && sh.cy + sh.r <= f64::from(s.height) + 0.5);
            }
            // The left corner where the background starts is its colour (a
            // gradient's top, or bottom when it runs upwards), or for
            // stripes the colour or the 50 % mix, as the phase says.
            let c = s.background_colour.rgb();
            let k = s.background_colour.contrast();
            let half = [0, 1, 2].map(|j| (u16::from(c[j]) + u16::from(k[j])).div_ceil(2) as u8);
            let bottom = s.flip && s.background != BgStyle::Plain;
            let y0 = if bottom { s.height - 1 } else { 0 };
            let want = match s.background {
                BgStyle::Striped if (s.phase / 8) % 2 == 1 => half,
                _ => c,
            };
            assert!(
                close(img.get_pixel(0, y0), want, 1),
                "scene {i}: {} at (0,{y0}) is {:?}",
                s.caption(),
                img.get_pixel(0, y0)
            );
            // The radius stays in its size class.
            let m = f64::from(s.width.min(s.height));
            for sh in &s.shapes {
                let f = sh.r / (s.size.radius_fraction() * m);
                assert!((0.9 - 1e-9..=1.1 + 1e-9).contains(&f), "scene {i}: {f}");
            }
            if s.background == BgStyle::Plain {
                let c = s.background_colour.rgb();
                let (w, h) = (s.width - 1, s.height - 1);
                for (x, y) in [(w, 0), (0, h), (w, h)] {
                    assert!(close(img.get_pixel(x, y), c, 0));
                }
            }
            if s.shapes.len() == 2 {
                let (a, b) = (s.shapes[0], s.shapes[1]);
                let gap = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
                assert!(gap > a.r + b.r, "scene {i}: shapes overlap");
                assert_ne!((a.shape, a.colour), (b.shape, b.colour));
            }
        }
    }

    #[test]
    fn a_gradient_darkens_or_lightens_downwards_and_stripes_alternate() {
        let base = Scene {
            width: 64,
            height: 64,
            shapes: vec![],
            size: Size::Small,
            position: None,
            background: BgStyle::Gradient,
            background_colour: Colour::Blue,
            flip: false,
            phase: 0,
        };
        let img = base.render();
        // Blue is dark → mixes towards white.
        assert!(img.get_pixel(0, 63).0[0] > img.get_pixel(0, 0).0[0] + 100);
        assert_eq!(img.get_pixel(0, 0).0, Colour::Blue.rgb());
        // Upwards: the colour at the bottom.
        let up = Scene {
            flip: true,
            ..base.clone()
        }
        .render();
        assert!(up.get_pixel(0, 0).0[0] > up.get_pixel(0, 63).0[0] + 100);
        assert_eq!(up.get_pixel(0, 63).0, Colour::Blue.rgb());
        let striped = Scene {
            background: BgStyle::Striped,
            background_colour: Colour::Yellow,
            ..base
        };
        let img = striped.render();
        let y = Colour::Yellow.rgb();
        assert_eq!(img.get_pixel(0, 0).0, y);
        assert_eq!(img.get_pixel(7, 0).0, y);
        assert_ne!(img.get_pixel(8, 0).0, y);
        assert_eq!(img.get_pixel(16, 0).0, y);
        // Along the diagonal x + y: (8, 0) and (0, 8) are one stripe.
        assert_eq!(img.get_pixel(0, 8).0, img.get_pixel(8, 0).0);
        // The other diagonal and a phase of 4 px.
        let other = Scene {
            flip: true,
            phase: 4,
            ..striped
        }
        .render();
        assert_eq!(other.get_pixel(0, 63).0, y);
        assert_ne!(other.get_pixel(4, 63).0, y);
        assert_eq!(other.get_pixel(4, 59).0, other.get_pixel(0, 55).0);
    }

    /// The tags do not fix the image: scenes with the same caption differ
    /// in what the tags leave free (module docs).
    #[test]
    fn the_same_tags_give_different_images() {
        let mut by_caption: std::collections::HashMap<String, Vec<Scene>> = Default::default();
        for i in 0..4000 {
            let s = Scene::random(3, i);
            by_caption.entry(s.caption()).or_default().push(s);
        }
        let (mut pairs, mut differ) = (0, 0);
        for group in by_caption.values().filter(|g| g.len() >= 2) {
            pairs += 1;
            if group[0].render() != group[1].render() {
                differ += 1;
            }
        }
        assert!(pairs >= 20, "{pairs}");
        assert_eq!(differ, pairs);
    }

    #[test]
    fn shapes_differ_in_what_they_cover() {
        let at = |shape| PlacedShape {
            shape,
            colour: Colour::Red,
            cx: 32.0,
            cy: 32.0,
            r: 20.0,
        };
        // Centre: all but the ring.
        for s in Shape::ALL {
            assert_eq!(at(s).contains(32.0, 32.0), s != Shape::Ring, "{s:?}");
        }
        // A square's corner is outside the circle; a point below the star's
        // top tip but between arms is outside the star.
        assert!(at(Shape::Square).contains(32.0 + 16.0, 32.0 + 16.0));
        assert!(!at(Shape::Circle).contains(32.0 + 16.0, 32.0 + 16.0));
        assert!(at(Shape::Star).contains(32.0, 32.0 - 19.0));
        assert!(!at(Shape::Star).contains(32.0 + 10.0, 32.0 - 15.0));
        // Triangle points up: the top tip is in, the top corners are out.
        assert!(at(Shape::Triangle).contains(32.0, 32.0 - 18.0));
        assert!(!at(Shape::Triangle).contains(32.0 - 15.0, 32.0 - 15.0));
        assert!(at(Shape::Triangle).contains(32.0 - 15.0, 32.0 + 9.0));
    }

    #[test]
    fn captions_follow_the_documented_order() {
        let s = Scene {
            width: 96,
            height: 64,
            shapes: vec![PlacedShape {
                shape: Shape::Circle,
                colour: Colour::Red,
                cx: 24.0,
                cy: 16.0,
                r: 10.0,
            }],
            size: Size::Small,
            position: Some((HPos::Left, VPos::Top)),
            background: BgStyle::Striped,
            background_colour: Colour::Blue,
            flip: true,
            phase: 3,
        };
        assert_eq!(
            s.caption(),
            "1shape, red circle, small, left, top, striped background, blue background"
        );
        let all = all_tags();
        for t in s.tags() {
            assert!(all.contains(&t), "{t}");
        }
        assert_eq!(all.len(), 2 + 40 + 3 + 3 + 2 + 3 + 8);
    }

    #[test]
    fn every_tag_occurs_and_random_scenes_use_only_known_tags() {
        let all = all_tags();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..2000 {
            for t in Scene::random(3, i).tags() {
                assert!(all.contains(&t), "{t}");
                seen.insert(t);
            }
        }
        let missing: Vec<_> = all.iter().filter(|t| !seen.contains(*t)).collect();
        assert!(missing.is_empty(), "never drawn: {missing:?}");
    }

    #[test]
    fn parse_tags_reads_back_every_caption() {
        for i in 0..500 {
            let s = Scene::random(5, i);
            assert_eq!(
                parse_tags(&s.caption()).unwrap(),
                s.spec(),
                "{}",
                s.caption()
            );
        }
    }

    #[test]
    fn parse_tags_normalises_and_keeps_unknown_tags() {
        let p = parse_tags(" masterpiece,1shape , Red_Circle,, striped_background , left").unwrap();
        assert_eq!(p.count, Some(1));
        assert_eq!(p.shapes, vec![(Some(Colour::Red), Shape::Circle)]);
        assert_eq!(p.background, Some(BgStyle::Striped));
        assert_eq!(p.hpos, Some(HPos::Left));
        assert_eq!(p.vpos, None);
        assert_eq!(p.unknown, vec!["masterpiece".to_string()]);
        let p = parse_tags("2shapes, star, blue ring, green background").unwrap();
        assert_eq!(
            p.shapes,
            vec![(None, Shape::Star), (Some(Colour::Blue), Shape::Ring)]
        );
        assert_eq!(p.background_colour, Some(Colour::Green));
    }

    #[test]
    fn parse_tags_refuses_contradictions_naming_the_tag() {
        let e = parse_tags("1shape, small, large").unwrap_err().to_string();
        assert!(e.contains("'large'") && e.contains("size"), "{e}");
        let e = parse_tags("1shape, 2shapes").unwrap_err().to_string();
        assert!(e.contains("'2shapes'"), "{e}");
        assert!(parse_tags("red background, blue background").is_err());
        // Repeating the same tag is no contradiction.
        assert!(parse_tags("left, left").is_ok());
    }

    #[test]
    fn toy_buckets_are_the_bucket_stages_kohya_list_and_fit_the_unet() {
        let k = crate::imaging::buckets::kohya_buckets(80, 80, 64, 96, 32);
        let mut mine = toy_buckets();
        mine.sort();
        let mut k2 = k.clone();
        k2.sort();
        assert_eq!(mine, k2);
        for (w, h) in TOY_BUCKETS {
            assert_eq!(w % 32, 0);
            assert_eq!(h % 32, 0);
        }
    }

    /// The toy template pack (`fixtures/prompts/toy/`) parses with the
    /// template language and every prompt it makes is a scene `parse_tags`
    /// understands completely, with a background colour no shape uses.
    #[test]
    fn the_toy_template_pack_makes_scene_prompts() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/prompts/toy");
        let t = crate::prompts::load(
            &crate::prompts::TemplateSpec::File(root.join("template.txt")),
            None,
        )
        .unwrap();
        let mut two = 0;
        for i in 0..300 {
            let p = t.random(7, i);
            let spec = parse_tags(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert!(spec.unknown.is_empty(), "{p}: {:?}", spec.unknown);
            assert!(!spec.shapes.is_empty(), "{p}");
            assert_eq!(spec.count, Some(spec.shapes.len()), "{p}");
            for (c, _) in &spec.shapes {
                assert_ne!(*c, spec.background_colour, "{p}");
            }
            two += usize::from(spec.shapes.len() == 2);
        }
        assert!(two > 30 && two < 270, "two-shape prompts: {two} of 300");
    }
}
