//! PNG line plots of the reports ([`Figures`]). Drawing needs plotters, part of the `cli`
//! feature; without it a report is written without plots and says so ([`NOT_DRAWN`]).
//!
//! Text needs a font registered with plotters' `ab_glyph` backend: DejaVu Sans is loaded
//! from the usual system path (or `$R2SCP_FONT`). Without a font the plot is still drawn,
//! with axes, grid and lines but no captions, tick labels or legend.

use std::path::{Path, PathBuf};
#[cfg(feature = "cli")]
use std::sync::OnceLock;

use anyhow::Result;
#[cfg(feature = "cli")]
use anyhow::{anyhow, Context};
#[cfg(feature = "cli")]
use plotters::prelude::*;
#[cfg(feature = "cli")]
use plotters::style::FontStyle;

/// The line a report carries in place of its plots when the build cannot draw them.
pub const NOT_DRAWN: &str =
    "Plots: not drawn (this build of r2scp lacks its `cli` feature, which brings plotters).";

/// Default font location.
#[cfg(feature = "cli")]
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Register a sans-serif font once; true when text can be drawn.
#[cfg(feature = "cli")]
pub fn ensure_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let path = std::env::var("R2SCP_FONT").unwrap_or_else(|_| FONT_PATH.to_string());
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

/// One named line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// Convenience constructor.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// Labels of a plot.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    /// Caption above the plot.
    pub title: &'a str,
    /// X axis description.
    pub x: &'a str,
    /// Y axis description.
    pub y: &'a str,
}

/// The plots of one report: `<report dir>/plots/<name>.png`, linked from the report's
/// markdown as `plots/<name>.png`.
#[derive(Debug, Clone)]
pub struct Figures {
    // Read only when drawing.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    dir: PathBuf,
}

impl Figures {
    /// Plots of the report in `report_dir`; creates `report_dir/plots` when the build
    /// draws (`cli`), else creates nothing.
    pub fn new(report_dir: &Path) -> Result<Self> {
        let dir = report_dir.join("plots");
        #[cfg(feature = "cli")]
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Draws the line plot `<name>.png` (the free function `line_plot` of this module) and
    /// returns its markdown image link `![<name>](plots/<name>.png)`; `None` (nothing
    /// drawn) without the `cli` feature.
    #[cfg_attr(not(feature = "cli"), allow(unused_variables))]
    pub fn line_plot(
        &self,
        name: &str,
        labels: Labels,
        series: &[Series],
    ) -> Result<Option<String>> {
        #[cfg(feature = "cli")]
        {
            line_plot(&self.dir.join(format!("{name}.png")), labels, series)?;
            Ok(Some(format!("![{name}](plots/{name}.png)")))
        }
        #[cfg(not(feature = "cli"))]
        Ok(None)
    }
}

#[cfg(feature = "cli")]
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draw `series` as lines with point markers into a 800x500 PNG at `path`.
/// Empty series are skipped; an all-empty plot is still written (axes only).
#[cfg(feature = "cli")]
pub fn line_plot(path: &Path, labels: Labels, series: &[Series]) -> Result<()> {
    let text = ensure_font();
    draw(path, labels, series, text)
}

#[cfg(feature = "cli")]
fn draw(path: &Path, labels: Labels, series: &[Series], text: bool) -> Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow!("plot {}: {e:?}", path.display());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for s in series {
        for &(x, y) in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);

    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(labels.title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    } else {
        builder.x_label_area_size(10).y_label_area_size(10);
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    {
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(labels.x).y_desc(labels.y);
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| err(&e))?;
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let drawn = chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if text {
            drawn.label(s.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        if pts.len() <= 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    if text && series.iter().any(|s| !s.points.is_empty()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;

    #[test]
    fn plots_with_and_without_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = vec![
            Series::new("a", vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.25)]),
            Series::new("b", vec![(0.0, 0.2), (2.0, 0.9)]),
        ];
        let l = Labels {
            title: "t",
            x: "x",
            y: "y",
        };
        let p = dir.path().join("no_text.png");
        draw(&p, l, &s, false)?;
        assert!(std::fs::metadata(&p)?.len() > 100);
        let p2 = dir.path().join("text.png");
        line_plot(&p2, l, &s)?;
        assert!(std::fs::metadata(&p2)?.len() > 100);
        // degenerate input still gives a picture
        let p3 = dir.path().join("empty.png");
        line_plot(&p3, l, &[Series::new("e", vec![])])?;
        assert!(p3.exists());
        Ok(())
    }
}
