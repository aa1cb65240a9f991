//! The toy world's tag vocabulary: shape kinds, colours, sizes, positions
//! and background styles with their Danbooru-style names, every tag a
//! scene can carry ([`all_tags`], the toy tagger's labels) and
//! [`parse_tags`], which reads a toy prompt back into the scene it asks
//! for. Drawing scenes from them is [`super::scenes`], whose module docs
//! give the tag order.

use crate::{Error, Result};

/// A shape kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// Filled disc.
    Circle,
    /// Filled axis-aligned square.
    Square,
    /// Filled equilateral triangle pointing up.
    Triangle,
    /// Filled five-pointed star.
    Star,
    /// Annulus (0.6·r..r).
    Ring,
}

impl Shape {
    /// Every shape, in tag order.
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Ring,
    ];

    /// Tag word (`circle`, …).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// A colour of the toy palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// (220, 30, 30)
    Red,
    /// (245, 140, 20)
    Orange,
    /// (240, 220, 30)
    Yellow,
    /// (40, 170, 60)
    Green,
    /// (40, 80, 220)
    Blue,
    /// (140, 50, 180)
    Purple,
    /// (250, 250, 250)
    White,
    /// (20, 20, 20)
    Black,
}

impl Colour {
    /// Every colour, in tag order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];

    /// Tag word (`red`, …).
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Orange => [245, 140, 20],
            Colour::Yellow => [240, 220, 30],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Purple => [140, 50, 180],
            Colour::White => [250, 250, 250],
            Colour::Black => [20, 20, 20],
        }
    }

    /// The colour that gradients and stripes mix in: white for dark
    /// colours, black for light ones (Rec. 601 luma ≥ 150).
    pub(super) fn contrast(self) -> [u8; 3] {
        let [r, g, b] = self.rgb();
        let luma = 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
        if luma >= 150.0 {
            [0, 0, 0]
        } else {
            [255, 255, 255]
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// Shape size class (radius 0.16 / 0.24 / 0.34 of the short side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    /// r = 0.16·m.
    Small,
    /// r = 0.24·m.
    Medium,
    /// r = 0.34·m.
    Large,
}

impl Size {
    /// Every size, in tag order.
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// Tag (`small`, …).
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Radius as a fraction of the image's short side.
    pub fn radius_fraction(self) -> f64 {
        match self {
            Size::Small => 0.16,
            Size::Medium => 0.24,
            Size::Large => 0.34,
        }
    }
}

/// Horizontal position of a single shape (centre at ¼, ½, ¾ of the width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HPos {
    /// x = ¼ width.
    Left,
    /// x = ½ width.
    Center,
    /// x = ¾ width.
    Right,
}

impl HPos {
    /// Every horizontal position, in tag order.
    pub const ALL: [HPos; 3] = [HPos::Left, HPos::Center, HPos::Right];

    /// Tag (`left`, `center`, `right`).
    pub fn name(self) -> &'static str {
        match self {
            HPos::Left => "left",
            HPos::Center => "center",
            HPos::Right => "right",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    pub(super) fn fraction(self) -> f64 {
        match self {
            HPos::Left => 0.25,
            HPos::Center => 0.5,
            HPos::Right => 0.75,
        }
    }
}

/// Vertical position of a single shape (centre at ¼, ½, ¾ of the height;
/// `Middle` has no tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VPos {
    /// y = ¼ height (`top`).
    Top,
    /// y = ½ height (no tag).
    Middle,
    /// y = ¾ height (`bottom`).
    Bottom,
}

impl VPos {
    /// Every vertical position.
    pub const ALL: [VPos; 3] = [VPos::Top, VPos::Middle, VPos::Bottom];

    /// Tag, `None` for the middle.
    pub fn tag(self) -> Option<&'static str> {
        match self {
            VPos::Top => Some("top"),
            VPos::Middle => None,
            VPos::Bottom => Some("bottom"),
        }
    }

    pub(super) fn fraction(self) -> f64 {
        match self {
            VPos::Top => 0.25,
            VPos::Middle => 0.5,
            VPos::Bottom => 0.75,
        }
    }
}

/// Background style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BgStyle {
    /// One colour (`simple background`).
    Plain,
    /// Vertical gradient from the colour halfway to its contrast colour,
    /// downwards or upwards (`gradient background`).
    Gradient,
    /// Diagonal stripes, 8 px wide, of the colour and a 50 % mix towards
    /// its contrast colour (`striped background`).
    Striped,
}

impl BgStyle {
    /// Every style, in tag order.
    pub const ALL: [BgStyle; 3] = [BgStyle::Plain, BgStyle::Gradient, BgStyle::Striped];

    /// Tag (`simple background`, …).
    pub fn tag(self) -> &'static str {
        match self {
            BgStyle::Plain => "simple background",
            BgStyle::Gradient => "gradient background",
            BgStyle::Striped => "striped background",
        }
    }
}

/// What a prompt asks for, as [`parse_tags`] reads it. Fields the prompt
/// does not mention are `None` (or empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SceneSpec {
    /// `1shape` → 1, `2shapes` → 2.
    pub count: Option<usize>,
    /// `"{colour} {shape}"` (or a bare `"{shape}"`) tags, in prompt order.
    pub shapes: Vec<(Option<Colour>, Shape)>,
    /// `small` / `medium` / `large`.
    pub size: Option<Size>,
    /// `left` / `center` / `right`.
    pub hpos: Option<HPos>,
    /// `top` / `bottom` (`None`: not asked, i.e. middle or unspecified).
    pub vpos: Option<VPos>,
    /// `simple` / `gradient` / `striped background`.
    pub background: Option<BgStyle>,
    /// `"{colour} background"`.
    pub background_colour: Option<Colour>,
    /// Tags that are none of the above (kept, not an error: prompts may
    /// carry quality or style tags).
    pub unknown: Vec<String>,
}

/// Every tag a scene can carry, in tag-order groups: counts, the 40
/// `"{colour} {shape}"` tags (colour-major), sizes, positions, background
/// styles, background colours. The toy tagger's label list.
pub fn all_tags() -> Vec<String> {
    let mut t: Vec<String> = vec!["1shape".into(), "2shapes".into()];
    for c in Colour::ALL {
        for s in Shape::ALL {
            t.push(format!("{} {}", c.name(), s.name()));
        }
    }
    t.extend(Size::ALL.iter().map(|s| s.name().to_string()));
    t.extend(HPos::ALL.iter().map(|p| p.name().to_string()));
    t.extend(VPos::ALL.iter().filter_map(|p| p.tag().map(String::from)));
    t.extend(BgStyle::ALL.iter().map(|b| b.tag().to_string()));
    t.extend(
        Colour::ALL
            .iter()
            .map(|c| format!("{} background", c.name())),
    );
    t
}

/// Read a toy prompt (comma-separated tags; case, underscores and extra
/// spaces ignored) into the scene it asks for. Errors only when a tag
/// contradicts an earlier one (two sizes, two counts, two positions on one
/// axis, two background styles or colours), naming both tags.
pub fn parse_tags(prompt: &str) -> Result<SceneSpec> {
    let mut spec = SceneSpec::default();
    fn set<T: PartialEq + Copy>(slot: &mut Option<T>, v: T, tag: &str, what: &str) -> Result<()> {
        match *slot {
            Some(old) if old != v => Err(Error::config(format!(
                "toy prompt: tag '{tag}' contradicts an earlier {what} tag; a scene has one {what}"
            ))),
            _ => {
                *slot = Some(v);
                Ok(())
            }
        }
    }
    for raw in prompt.split(',') {
        let tag = raw
            .replace('_', " ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        if tag.is_empty() {
            continue;
        }
        let (first, rest) = match tag.split_once(' ') {
            Some((a, b)) => (a, Some(b)),
            None => (tag.as_str(), None),
        };
        match (first, rest) {
            ("1shape", None) => set(&mut spec.count, 1, &tag, "count")?,
            ("2shapes", None) => set(&mut spec.count, 2, &tag, "count")?,
            ("top", None) => set(&mut spec.vpos, VPos::Top, &tag, "vertical position")?,
            ("bottom", None) => set(&mut spec.vpos, VPos::Bottom, &tag, "vertical position")?,
            ("simple", Some("background")) => set(
                &mut spec.background,
                BgStyle::Plain,
                &tag,
                "background style",
            )?,
            ("gradient", Some("background")) => set(
                &mut spec.background,
                BgStyle::Gradient,
                &tag,
                "background style",
            )?,
            ("striped", Some("background")) => set(
                &mut spec.background,
                BgStyle::Striped,
                &tag,
                "background style",
            )?,
            (w, None) => {
                if let Some(s) = Size::from_name(w) {
                    set(&mut spec.size, s, &tag, "size")?
                } else if let Some(p) = HPos::from_name(w) {
                    set(&mut spec.hpos, p, &tag, "horizontal position")?
                } else if let Some(s) = Shape::from_name(w) {
                    spec.shapes.push((None, s))
                } else {
                    spec.unknown.push(tag.clone())
                }
            }
            (c, Some(second)) => match (Colour::from_name(c), second) {
                (Some(c), "background") => {
                    set(&mut spec.background_colour, c, &tag, "background colour")?
                }
                (Some(c), s) if Shape::from_name(s).is_some() => spec
                    .shapes
                    .extend(Shape::from_name(s).map(|s| (Some(c), s))),
                _ => spec.unknown.push(tag.clone()),
            },
        }
    }
    Ok(spec)
}
