//! Pictures and pages for people: line charts of training curves (PNG for
//! the run folder, SVG for HTML reports).
//!
//! Charts are drawn with `plotters`; its bitmap backend renders text with
//! `ab_glyph` from a font we embed (DejaVu Sans Mono, Bitstream Vera
//! licence, `fixtures/fonts/`), so a chart looks the same on every machine
//! and needs no system fonts.

pub mod plot;
