//! A small SVG writer for rcx's figures: panels side by side, each with axes, ticks,
//! labels, a title, a legend and any mix of line series (solid or dashed), shaded bands,
//! scatter markers and histogram bars. Built with chained setters:
//!
//! ```
//! use rcx::plot::{Figure, Line, Panel};
//! let panel = Panel::new("loss").x_label("step").line(Line::new(vec![0.0, 1.0], vec![2.0, 1.0]));
//! let svg = Figure::new().panel(panel).to_svg();
//! assert!(svg.starts_with("<svg"));
//! ```
//!
//! Every drawn series element carries a class (`line`, `band`, `marker`, `bar`) so that
//! tests and scripts can find them. Non-finite points are skipped (lines break there).

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Colours given to series that do not set one, in order.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

// Layout of one panel, in SVG pixels.
const PANEL_WIDTH: f64 = 420.0;
const PANEL_HEIGHT: f64 = 320.0;
const MARGIN_LEFT: f64 = 64.0;
const MARGIN_RIGHT: f64 = 18.0;
const MARGIN_TOP: f64 = 34.0;
const MARGIN_BOTTOM: f64 = 50.0;
const FIGURE_TITLE_HEIGHT: f64 = 30.0;
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";

/// The legend label and colour setters every series type shares.
macro_rules! label_and_color_setters {
    ($($series:ty),*) => {$(
        impl $series {
            pub fn label(mut self, label: &str) -> Self {
                self.label = Some(label.into());
                self
            }
            pub fn color(mut self, color: &str) -> Self {
                self.color = Some(color.into());
                self
            }
        }
    )*};
}

label_and_color_setters!(Line, Band, Scatter, Histogram);

/// A polyline through (xs[i], ys[i]).
#[derive(Clone, Debug)]
pub struct Line {
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    pub label: Option<String>,
    pub color: Option<String>,
    pub dashed: bool,
    pub width: f64,
    /// Also draw a marker at every point.
    pub markers: bool,
}

impl Line {
    pub fn new(xs: Vec<f64>, ys: Vec<f64>) -> Self {
        Line {
            xs,
            ys,
            label: None,
            color: None,
            dashed: false,
            width: 2.0,
            markers: false,
        }
    }
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
    pub fn width(mut self, width: f64) -> Self {
        self.width = width;
        self
    }
    pub fn markers(mut self) -> Self {
        self.markers = true;
        self
    }
}

/// The shaded region between lower[i] and upper[i] over xs[i].
#[derive(Clone, Debug)]
pub struct Band {
    pub xs: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    pub label: Option<String>,
    pub color: Option<String>,
    pub opacity: f64,
}

impl Band {
    pub fn new(xs: Vec<f64>, lower: Vec<f64>, upper: Vec<f64>) -> Self {
        Band {
            xs,
            lower,
            upper,
            label: None,
            color: None,
            opacity: 0.2,
        }
    }
    pub fn opacity(mut self, opacity: f64) -> Self {
        self.opacity = opacity;
        self
    }
}

/// Circles at (xs[i], ys[i]).
#[derive(Clone, Debug)]
pub struct Scatter {
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    pub label: Option<String>,
    pub color: Option<String>,
    pub radius: f64,
}

impl Scatter {
    pub fn new(xs: Vec<f64>, ys: Vec<f64>) -> Self {
        Scatter {
            xs,
            ys,
            label: None,
            color: None,
            radius: 3.0,
        }
    }
    pub fn radius(mut self, radius: f64) -> Self {
        self.radius = radius;
        self
    }
}

/// Bars: bar i spans [edges[i], edges[i+1]] with height heights[i].
#[derive(Clone, Debug)]
pub struct Histogram {
    pub edges: Vec<f64>,   // [bins + 1]
    pub heights: Vec<f64>, // [bins]
    pub label: Option<String>,
    pub color: Option<String>,
    pub opacity: f64,
    /// Draw only the outline of the bars (to overlay on filled ones).
    pub outline: bool,
}

impl Histogram {
    pub fn new(edges: Vec<f64>, heights: Vec<f64>) -> Self {
        Histogram {
            edges,
            heights,
            label: None,
            color: None,
            opacity: 0.5,
            outline: false,
        }
    }

    /// `bins` equal bins over `range` (values outside it are dropped, the upper edge is
    /// included); heights are counts, or densities (integrating to the kept fraction)
    /// if `density`.
    pub fn of_values(values: &[f64], bins: usize, range: (f64, f64), density: bool) -> Self {
        let bins = bins.max(1);
        let (low, high) = range;
        let width = (high - low) / bins as f64;
        let edges: Vec<f64> = (0..=bins).map(|i| low + i as f64 * width).collect();
        let mut heights = vec![0.0; bins];
        for &v in values {
            if v.is_finite() && v >= low && v <= high {
                let bin = (((v - low) / width) as usize).min(bins - 1);
                heights[bin] += 1.0;
            }
        }
        if density && !values.is_empty() {
            let scale = 1.0 / (values.len() as f64 * width);
            heights.iter_mut().for_each(|h| *h *= scale);
        }
        Histogram::new(edges, heights)
    }
    pub fn opacity(mut self, opacity: f64) -> Self {
        self.opacity = opacity;
        self
    }
    pub fn outline(mut self) -> Self {
        self.outline = true;
        self
    }
}

#[derive(Clone, Debug)]
pub enum Series {
    Line(Line),
    Band(Band),
    Scatter(Scatter),
    Histogram(Histogram),
}

impl Series {
    fn label(&self) -> Option<&str> {
        match self {
            Series::Line(s) => s.label.as_deref(),
            Series::Band(s) => s.label.as_deref(),
            Series::Scatter(s) => s.label.as_deref(),
            Series::Histogram(s) => s.label.as_deref(),
        }
    }
    fn color(&self) -> Option<&str> {
        match self {
            Series::Line(s) => s.color.as_deref(),
            Series::Band(s) => s.color.as_deref(),
            Series::Scatter(s) => s.color.as_deref(),
            Series::Histogram(s) => s.color.as_deref(),
        }
    }
    /// Every (x, y) the series covers, to fit the axes.
    fn extent(&self) -> (Vec<f64>, Vec<f64>) {
        match self {
            Series::Line(s) => (s.xs.clone(), s.ys.clone()),
            Series::Scatter(s) => (s.xs.clone(), s.ys.clone()),
            Series::Band(s) => (
                s.xs.clone(),
                s.lower.iter().chain(&s.upper).cloned().collect(),
            ),
            Series::Histogram(s) => {
                let mut ys = s.heights.clone();
                ys.push(0.0);
                (s.edges.clone(), ys)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegendPosition {
    UpperLeft,
    UpperRight,
    LowerLeft,
    LowerRight,
    Hidden,
}

/// One subplot.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub x_ticks: Option<Vec<f64>>,
    pub legend: LegendPosition,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: &str) -> Self {
        Panel {
            title: title.into(),
            x_label: String::new(),
            y_label: String::new(),
            x_range: None,
            y_range: None,
            x_ticks: None,
            legend: LegendPosition::UpperLeft,
            series: Vec::new(),
        }
    }
    pub fn x_label(mut self, label: &str) -> Self {
        self.x_label = label.into();
        self
    }
    pub fn y_label(mut self, label: &str) -> Self {
        self.y_label = label.into();
        self
    }
    pub fn x_range(mut self, min: f64, max: f64) -> Self {
        self.x_range = Some((min, max));
        self
    }
    pub fn y_range(mut self, min: f64, max: f64) -> Self {
        self.y_range = Some((min, max));
        self
    }
    /// Explicit x ticks (e.g. the response indices 1..8) instead of automatic ones.
    pub fn x_ticks(mut self, ticks: Vec<f64>) -> Self {
        self.x_ticks = Some(ticks);
        self
    }
    pub fn legend(mut self, position: LegendPosition) -> Self {
        self.legend = position;
        self
    }
    pub fn line(mut self, line: Line) -> Self {
        self.series.push(Series::Line(line));
        self
    }
    pub fn band(mut self, band: Band) -> Self {
        self.series.push(Series::Band(band));
        self
    }
    pub fn scatter(mut self, scatter: Scatter) -> Self {
        self.series.push(Series::Scatter(scatter));
        self
    }
    pub fn histogram(mut self, histogram: Histogram) -> Self {
        self.series.push(Series::Histogram(histogram));
        self
    }

    /// The axis ranges: the explicit ones, else the data's (y padded by 5%).
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for s in &self.series {
            let (x, y) = s.extent();
            xs.extend(x.into_iter().filter(|v| v.is_finite()));
            ys.extend(y.into_iter().filter(|v| v.is_finite()));
        }
        let x = self.x_range.unwrap_or_else(|| data_range(&xs, 0.0));
        let y = self.y_range.unwrap_or_else(|| data_range(&ys, 0.05));
        (widen_if_empty(x), widen_if_empty(y))
    }
}

fn data_range(values: &[f64], pad: f64) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 1.0);
    }
    let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let span = max - min;
    (min - pad * span, max + pad * span)
}

/// A range of zero (or invalid) width would divide by zero in the mapping.
fn widen_if_empty((min, max): (f64, f64)) -> (f64, f64) {
    if !(min.is_finite() && max.is_finite()) {
        (0.0, 1.0)
    } else if max > min {
        (min, max)
    } else {
        let half = if min == 0.0 { 0.5 } else { 0.1 * min.abs() };
        (min - half, min + half)
    }
}

/// Where one panel's plotting area lies in the SVG and which data ranges it shows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
}

impl Frame {
    /// Data (x, y) to SVG pixels; y grows downwards in SVG.
    pub fn to_px(&self, x: f64, y: f64) -> (f64, f64) {
        let (x0, x1) = self.x_range;
        let (y0, y1) = self.y_range;
        (
            self.left + (x - x0) / (x1 - x0) * self.width,
            self.top + (y1 - y) / (y1 - y0) * self.height,
        )
    }
}

/// A figure: panels side by side under an optional title.
#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub title: Option<String>,
    pub panels: Vec<Panel>,
}

impl Figure {
    pub fn new() -> Self {
        Figure::default()
    }
    pub fn title(mut self, title: &str) -> Self {
        self.title = Some(title.into());
        self
    }
    pub fn panel(mut self, panel: Panel) -> Self {
        self.panels.push(panel);
        self
    }

    pub fn width(&self) -> f64 {
        PANEL_WIDTH * self.panels.len().max(1) as f64
    }

    pub fn height(&self) -> f64 {
        PANEL_HEIGHT + self.title_height()
    }

    fn title_height(&self) -> f64 {
        if self.title.is_some() {
            FIGURE_TITLE_HEIGHT
        } else {
            0.0
        }
    }

    /// The plotting area of panel `index`.
    pub fn frame(&self, index: usize) -> Option<Frame> {
        let panel = self.panels.get(index)?;
        let (x_range, y_range) = panel.ranges();
        Some(Frame {
            left: index as f64 * PANEL_WIDTH + MARGIN_LEFT,
            top: self.title_height() + MARGIN_TOP,
            width: PANEL_WIDTH - MARGIN_LEFT - MARGIN_RIGHT,
            height: PANEL_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM,
            x_range,
            y_range,
        })
    }

    pub fn to_svg(&self) -> String {
        let (width, height) = (self.width(), self.height());
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             viewBox=\"0 0 {width} {height}\" {FONT}>"
        );
        let _ = writeln!(
            svg,
            "<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"white\"/>"
        );
        if let Some(title) = &self.title {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"20\" font-size=\"16\" text-anchor=\"middle\">{}</text>",
                width / 2.0,
                escape(title)
            );
        }
        for (index, panel) in self.panels.iter().enumerate() {
            if let Some(frame) = self.frame(index) {
                draw_panel(&mut svg, index, panel, &frame);
            }
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes the SVG to `path` atomically (a temporary file beside it, then a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, self.to_svg()).map_err(|e| Error::io(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }
}

/// Escapes text for SVG content and attribute values.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// About 5 ticks at multiples of 1, 2 or 5 times a power of ten inside [min, max].
fn nice_ticks(min: f64, max: f64) -> Vec<f64> {
    let raw = (max - min) / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (min / step - 1e-9).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// Tick text with as many decimals as the spacing of the ticks needs.
fn tick_text(value: f64, ticks: &[f64]) -> String {
    let spacing = ticks
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .fold(f64::INFINITY, f64::min);
    let decimals = if spacing.is_finite() && spacing > 0.0 {
        (-spacing.log10() - 1e-9).ceil().clamp(0.0, 6.0) as usize
    } else {
        2
    };
    let text = format!("{value:.decimals$}");
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

fn draw_panel(svg: &mut String, index: usize, panel: &Panel, frame: &Frame) {
    let Frame {
        left,
        top,
        width,
        height,
        x_range,
        y_range,
    } = *frame;
    let (right, bottom) = (left + width, top + height);
    let _ = writeln!(svg, "<g class=\"panel\">");
    let _ = writeln!(
        svg,
        "<defs><clipPath id=\"clip{index}\"><rect x=\"{left:.2}\" y=\"{top:.2}\" \
         width=\"{width:.2}\" height=\"{height:.2}\"/></clipPath></defs>"
    );

    // Grid and ticks.
    let inside = |v: f64, (a, b): (f64, f64)| v >= a.min(b) - 1e-9 && v <= a.max(b) + 1e-9;
    let x_ticks: Vec<f64> = panel
        .x_ticks
        .clone()
        .unwrap_or_else(|| nice_ticks(x_range.0, x_range.1))
        .into_iter()
        .filter(|&v| v.is_finite() && inside(v, x_range))
        .collect();
    let y_ticks: Vec<f64> = nice_ticks(y_range.0, y_range.1);
    for &x in &x_ticks {
        let (px, _) = frame.to_px(x, y_range.0);
        let _ = writeln!(
            svg,
            "<line x1=\"{px:.2}\" y1=\"{top:.2}\" x2=\"{px:.2}\" y2=\"{bottom:.2}\" \
             stroke=\"#e5e5e5\" stroke-width=\"1\"/>"
        );
        let _ = writeln!(
            svg,
            "<text x=\"{px:.2}\" y=\"{:.2}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            tick_text(x, &x_ticks)
        );
    }
    for &y in &y_ticks {
        let (_, py) = frame.to_px(x_range.0, y);
        let _ = writeln!(
            svg,
            "<line x1=\"{left:.2}\" y1=\"{py:.2}\" x2=\"{right:.2}\" y2=\"{py:.2}\" \
             stroke=\"#e5e5e5\" stroke-width=\"1\"/>"
        );
        let _ = writeln!(
            svg,
            "<text x=\"{:.2}\" y=\"{:.2}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            py + 4.0,
            tick_text(y, &y_ticks)
        );
    }

    // Series, clipped to the plotting area.
    let _ = writeln!(svg, "<g clip-path=\"url(#clip{index})\">");
    for (k, series) in panel.series.iter().enumerate() {
        let color = series.color().unwrap_or(PALETTE[k % PALETTE.len()]);
        draw_series(svg, series, color, frame);
    }
    let _ = writeln!(svg, "</g>");

    // Frame, labels, title.
    let _ = writeln!(
        svg,
        "<rect x=\"{left:.2}\" y=\"{top:.2}\" width=\"{width:.2}\" height=\"{height:.2}\" \
         fill=\"none\" stroke=\"#333\" stroke-width=\"1\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.2}\" y=\"{:.2}\" font-size=\"13\" text-anchor=\"middle\">{}</text>",
        left + width / 2.0,
        bottom + 38.0,
        escape(&panel.x_label)
    );
    let (label_x, label_y) = (left - 46.0, top + height / 2.0);
    let _ = writeln!(
        svg,
        "<text x=\"{label_x:.2}\" y=\"{label_y:.2}\" font-size=\"13\" text-anchor=\"middle\" \
         transform=\"rotate(-90 {label_x:.2} {label_y:.2})\">{}</text>",
        escape(&panel.y_label)
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.2}\" y=\"{:.2}\" font-size=\"14\" text-anchor=\"middle\">{}</text>",
        left + width / 2.0,
        top - 10.0,
        escape(&panel.title)
    );
    draw_legend(svg, panel, frame);
    let _ = writeln!(svg, "</g>");
}

/// Runs of consecutive indices whose values are all finite.
fn finite_runs(len: usize, finite: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for i in 0..len {
        if finite(i) {
            run.push(i);
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

fn path_data(points: impl Iterator<Item = (f64, f64)>) -> String {
    let mut d = String::new();
    for (i, (x, y)) in points.enumerate() {
        let _ = write!(d, "{}{x:.2},{y:.2}", if i == 0 { "M" } else { " L" });
    }
    d
}

fn draw_series(svg: &mut String, series: &Series, color: &str, frame: &Frame) {
    match series {
        Series::Line(line) => {
            let len = line.xs.len().min(line.ys.len());
            let dash = if line.dashed {
                " stroke-dasharray=\"7 5\""
            } else {
                ""
            };
            for run in finite_runs(len, |i| line.xs[i].is_finite() && line.ys[i].is_finite()) {
                let d = path_data(run.iter().map(|&i| frame.to_px(line.xs[i], line.ys[i])));
                let _ = writeln!(
                    svg,
                    "<path class=\"line\" d=\"{d}\" fill=\"none\" stroke=\"{color}\" \
                     stroke-width=\"{}\" stroke-linejoin=\"round\"{dash}/>",
                    line.width
                );
            }
            if line.markers {
                let points =
                    Scatter::new(line.xs.clone(), line.ys.clone()).radius(line.width + 1.5);
                draw_series(svg, &Series::Scatter(points), color, frame);
            }
        }
        Series::Band(band) => {
            let len = band.xs.len().min(band.lower.len()).min(band.upper.len());
            let finite = |i: usize| {
                band.xs[i].is_finite() && band.lower[i].is_finite() && band.upper[i].is_finite()
            };
            for run in finite_runs(len, finite) {
                let upper = run.iter().map(|&i| frame.to_px(band.xs[i], band.upper[i]));
                let lower = run
                    .iter()
                    .rev()
                    .map(|&i| frame.to_px(band.xs[i], band.lower[i]));
                let d = path_data(upper.chain(lower));
                let _ = writeln!(
                    svg,
                    "<path class=\"band\" d=\"{d} Z\" fill=\"{color}\" fill-opacity=\"{}\" \
                     stroke=\"none\"/>",
                    band.opacity
                );
            }
        }
        Series::Scatter(scatter) => {
            for (&x, &y) in scatter.xs.iter().zip(&scatter.ys) {
                if x.is_finite() && y.is_finite() {
                    let (px, py) = frame.to_px(x, y);
                    let _ = writeln!(
                        svg,
                        "<circle class=\"marker\" cx=\"{px:.2}\" cy=\"{py:.2}\" r=\"{}\" \
                         fill=\"{color}\"/>",
                        scatter.radius
                    );
                }
            }
        }
        Series::Histogram(hist) => {
            let (fill, stroke) = if hist.outline {
                (
                    "none".to_string(),
                    format!("stroke=\"{color}\" stroke-width=\"2\""),
                )
            } else {
                (
                    color.to_string(),
                    "stroke=\"white\" stroke-width=\"0.5\"".to_string(),
                )
            };
            for (edge, &h) in hist.edges.windows(2).zip(&hist.heights) {
                if !(edge[0].is_finite() && edge[1].is_finite() && h.is_finite()) {
                    continue;
                }
                let (x0, y0) = frame.to_px(edge[0], h);
                let (x1, base) = frame.to_px(edge[1], 0.0f64.max(frame.y_range.0));
                let (x, w) = (x0.min(x1), (x1 - x0).abs());
                let (y, hgt) = (y0.min(base), (base - y0).abs());
                let _ = writeln!(
                    svg,
                    "<rect class=\"bar\" x=\"{x:.2}\" y=\"{y:.2}\" width=\"{w:.2}\" \
                     height=\"{hgt:.2}\" fill=\"{fill}\" fill-opacity=\"{}\" {stroke}/>",
                    hist.opacity
                );
            }
        }
    }
}

fn draw_legend(svg: &mut String, panel: &Panel, frame: &Frame) {
    if panel.legend == LegendPosition::Hidden {
        return;
    }
    let entries: Vec<(usize, &Series, &str)> = panel
        .series
        .iter()
        .enumerate()
        .filter_map(|(k, s)| s.label().map(|label| (k, s, label)))
        .collect();
    if entries.is_empty() {
        return;
    }
    // Text width is estimated (no font metrics): about 0.6 em per character.
    let longest = entries
        .iter()
        .map(|e| e.2.chars().count())
        .max()
        .unwrap_or(0);
    let (row, swatch, pad) = (17.0, 24.0, 6.0);
    let box_width = pad * 3.0 + swatch + 6.6 * longest as f64;
    let box_height = pad * 2.0 + row * entries.len() as f64;
    let x = match panel.legend {
        LegendPosition::UpperRight | LegendPosition::LowerRight => {
            frame.left + frame.width - box_width - 8.0
        }
        _ => frame.left + 8.0,
    };
    let y = match panel.legend {
        LegendPosition::LowerLeft | LegendPosition::LowerRight => {
            frame.top + frame.height - box_height - 8.0
        }
        _ => frame.top + 8.0,
    };
    let _ = writeln!(svg, "<g class=\"legend\">");
    let _ = writeln!(
        svg,
        "<rect x=\"{x:.2}\" y=\"{y:.2}\" width=\"{box_width:.2}\" height=\"{box_height:.2}\" \
         fill=\"white\" fill-opacity=\"0.85\" stroke=\"#bbb\" stroke-width=\"1\"/>"
    );
    for (row_index, (k, series, label)) in entries.iter().enumerate() {
        let color = series.color().unwrap_or(PALETTE[k % PALETTE.len()]);
        let (sx, cy) = (x + pad, y + pad + row * (row_index as f64 + 0.5));
        match series {
            Series::Line(line) => {
                let dash = if line.dashed {
                    " stroke-dasharray=\"7 5\""
                } else {
                    ""
                };
                let _ = writeln!(
                    svg,
                    "<line x1=\"{sx:.2}\" y1=\"{cy:.2}\" x2=\"{:.2}\" y2=\"{cy:.2}\" \
                     stroke=\"{color}\" stroke-width=\"{}\"{dash}/>",
                    sx + swatch,
                    line.width
                );
            }
            Series::Scatter(_) => {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.2}\" cy=\"{cy:.2}\" r=\"3.5\" fill=\"{color}\"/>",
                    sx + swatch / 2.0
                );
            }
            Series::Band(band) => {
                let _ = writeln!(
                    svg,
                    "<rect x=\"{sx:.2}\" y=\"{:.2}\" width=\"{swatch}\" height=\"10\" \
                     fill=\"{color}\" fill-opacity=\"{}\"/>",
                    cy - 5.0,
                    band.opacity
                );
            }
            Series::Histogram(hist) => {
                let style = if hist.outline {
                    format!("fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"")
                } else {
                    format!("fill=\"{color}\" fill-opacity=\"{}\"", hist.opacity)
                };
                let _ = writeln!(
                    svg,
                    "<rect x=\"{sx:.2}\" y=\"{:.2}\" width=\"{swatch}\" height=\"10\" {style}/>",
                    cy - 5.0
                );
            }
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.2}\" y=\"{:.2}\" font-size=\"12\">{}</text>",
            sx + swatch + pad,
            cy + 4.0,
            escape(label)
        );
    }
    let _ = writeln!(svg, "</g>");
}
