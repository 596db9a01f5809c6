//! Charts as PNG and SVG (plotters): line charts with a shaded mean ± std band, and
//! histograms with recorded bin edges, one panel per layer.
//!
//! Every chart is written twice from the same drawing code: `STEM.png` (bitmap, text
//! rendered with the bundled DejaVu Sans through `ab_glyph`) and `STEM.svg` (text kept as
//! text, so titles and legends are searchable). Sizes: line charts
//! [`LINE_SIZE`] pixels, histograms [`HIST_PANEL_SIZE`] per panel, stacked vertically.

use crate::{Error, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Largest magnitude of a value that is drawn. Beyond it the span of an axis (and the
/// tick arithmetic of plotters) overflows f64 and the drawing does not end; such values
/// are an error.
pub const MAX_DRAWN: f64 = 1e300;

/// Width × height in pixels of a line chart.
pub const LINE_SIZE: (u32, u32) = (1024, 640);
/// Width × height in pixels of one histogram panel.
pub const HIST_PANEL_SIZE: (u32, u32) = (1024, 300);

/// Font family the charts use (registered from `assets/DejaVuSans.ttf`).
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Line colours, in series order (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a line chart: `y[i]` at `x[i]`, optionally with a shaded band
/// `y[i] ± band[i]` (the standard deviation over seeds). `x`, `y` and `band` have the
/// same length; non-finite points are skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Abscissae, n values.
    pub x: Vec<f64>,
    /// Ordinates, n values.
    pub y: Vec<f64>,
    /// Half-width of the shaded band, n values (± std), or none.
    pub band: Option<Vec<f64>>,
}

/// One overlaid histogram: `counts[i]` values fell in `[edges[i], edges[i+1])`.
/// `edges` has `counts.len() + 1` finite, strictly increasing values.
#[derive(Debug, Clone, PartialEq)]
pub struct HistSeries {
    /// Legend text.
    pub label: String,
    /// Bin edges, bins + 1 values.
    pub edges: Vec<f64>,
    /// Height of each bin (a count or a fraction), bins values.
    pub counts: Vec<f64>,
}

/// One panel of a histogram chart (e.g. one layer) with its overlaid histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct HistPanel {
    /// Panel caption.
    pub title: String,
    /// Histograms drawn over each other, each as a filled step outline.
    pub series: Vec<HistSeries>,
}

fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Config(
            "the bundled font assets/DejaVuSans.ttf could not be parsed".into(),
        ))
    }
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("drawing chart: {e}")))
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn prepare_dir(stem: &Path) -> Result<()> {
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// A drawing that can be made on any backend.
trait Drawing {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Runs `draw` on a PNG and on an SVG backend of `size`, writing `stem.png`, `stem.svg`.
fn render_both(stem: &Path, size: (u32, u32), draw: &impl Drawing) -> Result<()> {
    ensure_font()?;
    prepare_dir(stem)?;
    let png = with_ext(stem, "png");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw.draw(&root).map_err(|e| draw_err(&png, e))?;
        root.present().map_err(|e| draw_err(&png, e))?;
    }
    let svg = with_ext(stem, "svg");
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw.draw(&root).map_err(|e| draw_err(&svg, e))?;
        root.present().map_err(|e| draw_err(&svg, e))?;
    }
    Ok(())
}

/// Finite (x, y) points of a series (and for log axes, y > 0).
fn points(s: &Series, log_y: bool) -> Vec<(f64, f64)> {
    s.x.iter()
        .zip(&s.y)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || **y > 0.0))
        .map(|(&x, &y)| (x, y))
        .collect()
}

/// The band polygon (upper edge forward, lower edge back), lower edge floored at
/// `floor` (the axis minimum, so log axes stay finite).
fn band_polygon(s: &Series, floor: f64) -> Vec<(f64, f64)> {
    let Some(b) = &s.band else {
        return Vec::new();
    };
    let pts: Vec<(f64, f64, f64)> =
        s.x.iter()
            .zip(&s.y)
            .zip(b)
            .filter(|((x, y), b)| x.is_finite() && y.is_finite() && b.is_finite())
            .map(|((&x, &y), &b)| (x, y, b.abs()))
            .collect();
    let mut poly: Vec<(f64, f64)> = pts.iter().map(|&(x, y, b)| (x, y + b)).collect();
    poly.extend(pts.iter().rev().map(|&(x, y, b)| (x, (y - b).max(floor))));
    poly
}

/// `(lo, hi)` widened, around its middle, to at least 1e-9 of its magnitude (and at
/// least 1): an axis narrower than that has no ticks that f64 can tell apart.
fn drawable_span((lo, hi): (f64, f64)) -> (f64, f64) {
    let min = 1e-9 * lo.abs().max(hi.abs()).max(1.0);
    if hi - lo >= min {
        return (lo, hi);
    }
    let (mid, half) = (0.5 * lo + 0.5 * hi, 0.5f64.max(min));
    (mid - half, mid + half)
}

/// The first finite value of `values` whose magnitude exceeds [`MAX_DRAWN`].
fn too_large<'a>(values: impl IntoIterator<Item = &'a f64>) -> Option<f64> {
    values
        .into_iter()
        .copied()
        .find(|v| v.is_finite() && v.abs() > MAX_DRAWN)
}

/// Axis ranges covering every point and band of `series`, padded by 3 %.
fn line_ranges(series: &[Series], log_y: bool) -> Option<((f64, f64), (f64, f64))> {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        for (i, (x, y)) in points(s, log_y).into_iter().enumerate() {
            xs = (xs.0.min(x), xs.1.max(x));
            let b = s
                .band
                .as_ref()
                .and_then(|b| b.get(i))
                .copied()
                .filter(|b| b.is_finite())
                .unwrap_or(0.0)
                .abs();
            let lo = if log_y && y - b <= 0.0 { y } else { y - b };
            ys = (ys.0.min(lo), ys.1.max(y + b));
        }
    }
    if !(xs.0.is_finite() && ys.0.is_finite()) {
        return None;
    }
    xs = drawable_span(xs);
    if log_y {
        let (lo, hi) = (ys.0 / 1.3, ys.1 * 1.3);
        ys = if hi > lo {
            (lo, hi)
        } else {
            (lo / 10.0, lo * 10.0)
        };
    } else {
        let pad = ((ys.1 - ys.0) * 0.03).max(1e-9 * ys.1.abs().max(1.0));
        ys = (ys.0 - pad, ys.1 + pad);
        if ys.1 <= ys.0 {
            ys = (ys.0 - 0.5, ys.0 + 0.5);
        }
    }
    Some((xs, ys))
}

/// Writes a line chart to `stem.png` and `stem.svg` ([`LINE_SIZE`] pixels): each series
/// a coloured line with point markers, its band (when given) shaded in the same colour,
/// a legend naming every series, axis labels `x_label` and `y_label` (put the units in
/// them, e.g. "test error (%)"), a logarithmic y axis when `log_y` (points with y ≤ 0
/// are then left out). Empty series are allowed (an empty frame is drawn).
///
/// Errors: [`Error::Io`] naming the file when a folder or image cannot be written,
/// [`Error::Shape`] when a series' `x`, `y` and `band` lengths differ.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    for s in series {
        let band_len = s.band.as_ref().map_or(s.y.len(), Vec::len);
        if s.x.len() != s.y.len() || band_len != s.y.len() {
            return Err(Error::Shape {
                what: format!("series '{}' of chart '{title}'", s.label),
                expected: "x, y and band of equal length".into(),
                found: format!("x {}, y {}, band {band_len}", s.x.len(), s.y.len()),
            });
        }
        let band = s.band.iter().flatten();
        if let Some(v) = too_large(s.x.iter().chain(&s.y).chain(band)) {
            return Err(Error::Shape {
                what: format!("series '{}' of chart '{title}'", s.label),
                expected: format!("values of magnitude ≤ {MAX_DRAWN:e}"),
                found: format!("{v:e}"),
            });
        }
    }
    let ((x0, x1), (y0, y1)) = line_ranges(series, log_y)
        .unwrap_or(((0.0, 1.0), if log_y { (0.1, 1.0) } else { (0.0, 1.0) }));
    let d = LineDrawing {
        title,
        x_label,
        y_label,
        series,
        x: (x0, x1),
        y: (y0, y1),
        log_y,
    };
    render_both(stem, LINE_SIZE, &d)
}

struct LineDrawing<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
    x: (f64, f64),
    y: (f64, f64),
    log_y: bool,
}

impl Drawing for LineDrawing<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (y0, y1) = self.y;
        if self.log_y {
            draw_lines(root, self, (y0..y1).log_scale())
        } else {
            draw_lines(root, self, y0..y1)
        }
    }
}

fn draw_lines<DB, Y>(
    root: &DrawingArea<DB, Shift>,
    d: &LineDrawing,
    y_spec: Y,
) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let (title, x_label, y_label, series, log_y) =
        (d.title, d.x_label, d.y_label, d.series, d.log_y);
    let y_floor = d.y.0;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(d.x.0..d.x.1, y_spec)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let poly = band_polygon(s, y_floor);
        if poly.len() >= 3 {
            chart
                .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                .map_err(|e| e.to_string())?;
        }
        let pts = points(s, log_y);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if pts.len() <= 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes a histogram chart to `stem.png` and `stem.svg`: one panel per entry of
/// `panels`, stacked vertically ([`HIST_PANEL_SIZE`] pixels each, plus a title band),
/// each panel overlaying its histograms as filled step outlines with a legend. The x
/// axis spans the edges of all series of the panel; `x_label` and `y_label` name the
/// axes with units (e.g. "log10 |gradient|", "fraction of values").
///
/// Errors: [`Error::Shape`] when a series does not have `counts.len() + 1` finite,
/// strictly increasing edges, or there is no panel; [`Error::Io`] naming the file when
/// it cannot be written.
pub fn histogram_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    panels: &[HistPanel],
) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::Shape {
            what: format!("histogram chart '{title}'"),
            expected: "at least one panel".into(),
            found: "none".into(),
        });
    }
    for p in panels {
        for s in &p.series {
            let ok = s.edges.len() == s.counts.len() + 1
                && s.edges.iter().all(|e| e.is_finite())
                && s.edges.windows(2).all(|w| w[0] < w[1])
                && too_large(s.edges.iter().chain(&s.counts)).is_none();
            if !ok {
                return Err(Error::Shape {
                    what: format!("histogram '{}' in panel '{}'", s.label, p.title),
                    expected: format!(
                        "bins + 1 finite, strictly increasing edges, and edges and counts of \
                         magnitude ≤ {MAX_DRAWN:e}"
                    ),
                    found: format!("{} edges for {} bins", s.edges.len(), s.counts.len()),
                });
            }
        }
    }
    let title_h = 40u32;
    let size = (
        HIST_PANEL_SIZE.0,
        title_h + HIST_PANEL_SIZE.1 * panels.len() as u32,
    );
    let d = HistDrawing {
        title,
        title_h,
        x_label,
        y_label,
        panels,
    };
    render_both(stem, size, &d)
}

struct HistDrawing<'a> {
    title: &'a str,
    title_h: u32,
    x_label: &'a str,
    y_label: &'a str,
    panels: &'a [HistPanel],
}

impl Drawing for HistDrawing<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, body) = root.split_vertically(self.title_h);
        top.titled(self.title, (FONT, 26))
            .map_err(|e| e.to_string())?;
        let areas = body.split_evenly((self.panels.len(), 1));
        for (area, panel) in areas.iter().zip(self.panels) {
            draw_hist_panel(area, panel, self.x_label, self.y_label)?;
        }
        Ok(())
    }
}

fn draw_hist_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &HistPanel,
    x_label: &str,
    y_label: &str,
) -> Result<(), String> {
    let mut x = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ymax = 0.0f64;
    for s in &panel.series {
        x = (x.0.min(s.edges[0]), x.1.max(s.edges[s.edges.len() - 1]));
        ymax = s
            .counts
            .iter()
            .copied()
            .filter(|c| c.is_finite())
            .fold(ymax, f64::max);
    }
    x = if x.0.is_finite() && x.1.is_finite() {
        drawable_span(x)
    } else {
        (0.0, 1.0)
    };
    if ymax <= 0.0 {
        ymax = 1.0;
    }
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title.as_str(), (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(x.0..x.1, 0.0..ymax * 1.05)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Step outline: (lo, 0) (lo, c) (hi, c) (hi, next c) … (last, 0).
        let mut step = vec![(s.edges[0], 0.0)];
        for (k, &c) in s.counts.iter().enumerate() {
            let c = if c.is_finite() { c } else { 0.0 };
            step.push((s.edges[k], c));
            step.push((s.edges[k + 1], c));
        }
        step.push((s.edges[s.edges.len() - 1], 0.0));
        chart
            .draw_series(std::iter::once(Polygon::new(
                step.clone(),
                color.mix(0.15).filled(),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(step, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
