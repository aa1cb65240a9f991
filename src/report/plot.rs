//! Line charts: one panel per metric, steps on x.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::pipeline::sample::write_atomic;
use crate::stages::bucket::encode_png_fast;
use crate::{Error, Result};

/// The embedded chart font.
static FONT: &[u8] = include_bytes!("../../fixtures/fonts/DejaVuSansMono.ttf");
/// Family name the font is registered under.
const FAMILY: &str = "eps2v-mono";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known good; a failure only loses labels.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// One panel: a title and its series of `(x, y)` points (non-finite points
/// are dropped).
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// `(name, points)` per line.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Logarithmic y axis (only positive values are drawn).
    pub log_y: bool,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("chart: {e}"))
}

/// An axis label: plain decimals with at most four significant digits
/// (`0.44`, `3.5`, `1200`), scientific notation only outside 0.001..10⁵
/// (`1e-4`, `2.5e-5`); trailing zeros trimmed.
fn tick(v: f64) -> String {
    fn trim(s: String) -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
    let a = v.abs();
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        return trim(format!("{v:.decimals$}"));
    }
    let s = format!("{v:.3e}");
    match s.split_once('e') {
        Some((m, e)) => format!("{}e{e}", trim(m.to_string())),
        None => s,
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    panels: &[Panel],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let pts: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!panel.log_y || *y > 0.0))
            .collect();
        let title_font = (FAMILY, 16).into_font();
        if pts.is_empty() {
            area.titled(&format!("{} (no data)", panel.title), title_font)
                .map_err(plot_err)?;
            continue;
        }
        let (mut x0, mut x1) = (f64::MAX, f64::MIN);
        let (mut y0, mut y1) = (f64::MAX, f64::MIN);
        for (x, y) in &pts {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            let d = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
            y0 -= d;
            y1 += d;
        }
        let mut chart_builder = ChartBuilder::on(area);
        chart_builder
            .caption(&panel.title, title_font)
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(64);
        let label_font = (FAMILY, 12).into_font();
        macro_rules! finish {
            ($chart:expr, $tf:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .label_style(label_font.clone())
                    .x_desc("step")
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick($tf(*v)))
                    .draw()
                    .map_err(plot_err)?;
                for (i, (name, p)) in panel.series.iter().enumerate() {
                    let color = COLORS[i % COLORS.len()];
                    let line: Vec<(f64, f64)> = p
                        .iter()
                        .copied()
                        .filter(|(x, y)| {
                            x.is_finite() && y.is_finite() && (!panel.log_y || *y > 0.0)
                        })
                        .collect();
                    let single = line.len() == 1;
                    chart
                        .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                        .map_err(plot_err)?
                        .label(name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                    if single || line.len() < 40 {
                        chart
                            .draw_series(line.iter().map(|&pt| Circle::new(pt, 3, color.filled())))
                            .map_err(plot_err)?;
                    }
                }
                chart
                    .configure_series_labels()
                    .label_font(label_font.clone())
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        if panel.log_y {
            let c = chart_builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(plot_err)?;
            finish!(c, |v: f64| v);
        } else {
            let c = chart_builder
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(plot_err)?;
            finish!(c, |v: f64| v);
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draw `panels` stacked vertically into a PNG at `path` (atomic write).
pub fn write_png(path: &Path, panels: &[Panel], width: u32, panel_height: u32) -> Result<()> {
    register_font();
    let height = panel_height * panels.len().max(1) as u32;
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        draw(root, panels)?;
    }
    let img = image::RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| Error::Other("chart: buffer size".into()))?;
    write_atomic(path, &encode_png_fast(&img)?)
}

/// Draw `panels` as an SVG document (text stays text: no font needed).
pub fn svg(panels: &[Panel], width: u32, panel_height: u32) -> Result<String> {
    let height = panel_height * panels.len().max(1) as u32;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        draw(root, panels)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        let cases = [
            (0.0, "0"),
            (3.5, "3.5"),
            (0.44, "0.44"),
            (1200.0, "1200"),
            (200.0, "200"),
            (0.7932, "0.7932"),
            (1e-4, "1e-4"),
            (2.5e-5, "2.5e-5"),
            (-1.25, "-1.25"),
            (123456.0, "1.235e5"),
        ];
        for (v, want) in cases {
            assert_eq!(tick(v), want, "{v}");
        }
    }

    #[test]
    fn png_and_svg_charts_render() {
        let panels = vec![
            Panel {
                title: "loss".into(),
                series: vec![(
                    "train".into(),
                    (1..50).map(|i| (i as f64, 1.0 / i as f64)).collect(),
                )],
                log_y: true,
            },
            Panel {
                title: "retention".into(),
                series: vec![(
                    "score".into(),
                    vec![(0.0, 0.2), (10.0, 0.7), (20.0, f64::NAN)],
                )],
                log_y: false,
            },
            Panel {
                title: "empty".into(),
                series: vec![],
                log_y: false,
            },
        ];
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.png");
        write_png(&p, &panels, 480, 160).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (480, 480));
        // Not blank: the lines and labels put dark and coloured pixels in.
        let dark = img
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 100))
            .count();
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(dark > 200 && blue > 20, "dark {dark}, blue {blue}");
        let s = svg(&panels, 480, 160).unwrap();
        assert!(
            s.starts_with("<svg") && s.contains("retention"),
            "{}",
            &s[..100]
        );
    }
}
