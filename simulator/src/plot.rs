//! SVG plots (plotters, no system fonts needed).

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::{Error, Result};

/// A named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

const SIZE: (u32, u32) = (720, 480);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Plot {
        path: path.to_path_buf(),
        message,
    }
}

/// Bounds of the data, padded so a flat series still has a range.
fn bounds(points: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = points
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

type Chart<'b, 'a> = ChartContext<'b, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A white canvas with a caption, labelled axes and a mesh over `xs` × `ys`.
fn axes<'b, 'a>(
    root: &'b DrawingArea<SVGBackend<'a>, Shift>,
    path: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    xs: (f64, f64),
    ys: (f64, f64),
) -> Result<Chart<'b, 'a>> {
    let err = plot_err(path);
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    Ok(chart)
}

/// Lines with markers, one per series, with a legend when there are several.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let err = plot_err(path);
    let xs = bounds(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let ys = bounds(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let mut chart = axes(&root, path, title, (x_label, y_label), xs, ys)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let markers = points.len() <= 60;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if markers {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// The empirical CDF of sorted data, thinned to at most `points` points.
pub fn cdf(sorted: &[f64], points: usize) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let step = n.div_ceil(points.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = sorted.last() {
        out.push((last, 1.0));
    }
    out
}

/// A histogram of `data` in `bins` equal bins.
pub fn histogram(path: &Path, title: &str, x_label: &str, data: &[f64], bins: usize) -> Result<()> {
    let err = plot_err(path);
    let (lo, hi) = bounds(data.iter().copied());
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u32; bins];
    for &x in data.iter().filter(|x| x.is_finite()) {
        let i = (((x - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let top = f64::from(counts.iter().copied().max().unwrap_or(0).max(1)) * 1.05;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let mut chart = axes(
        &root,
        path,
        title,
        (x_label, "messages"),
        (lo, hi),
        (0.0, top),
    )?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, f64::from(c))], COLORS[0].filled())
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_ends_at_one_and_is_thinned() {
        let xs: Vec<f64> = (0..1000).map(f64::from).collect();
        let c = cdf(&xs, 100);
        assert!(c.len() <= 101);
        assert_eq!(c.last(), Some(&(999.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn plots_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.svg");
        lines(
            &p,
            "t",
            "x",
            "y",
            &[("s".into(), vec![(0.0, 1.0), (1.0, 2.0)])],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("<svg"));
        let h = dir.path().join("h.svg");
        histogram(&h, "t", "x", &[1.0, 2.0, 2.0, 3.0], 10).unwrap();
        assert!(std::fs::read_to_string(&h).unwrap().contains("<rect"));
    }
}
