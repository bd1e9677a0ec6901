//! Line plots as SVG files (plotters; text is left to the SVG viewer, so no
//! font files are needed).

use std::path::Path;

use plotters::prelude::*;

/// One line of a plot.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Drawn without markers (for reference lines).
    pub plain: bool,
}

/// A plot's text and scale.
#[derive(Clone, Debug)]
pub struct Axes<'a> {
    /// Caption above the plot.
    pub title: &'a str,
    /// x-axis label.
    pub x: &'a str,
    /// y-axis label.
    pub y: &'a str,
    /// Logarithmic x axis.
    pub log_x: bool,
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot failed: {e}")
}

/// Draws `series` into the SVG file `path`.
pub fn line_plot(path: &Path, axes: &Axes<'_>, series: &[Series]) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        anyhow::bail!("nothing to plot in {}", path.display());
    }
    let pad = ((y1 - y0) * 0.08).max(1.0);
    let (y0, y1) = ((y0 - pad).max(0.0), y1 + pad);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(axes.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60);
    // The two scales have different types, hence the macro.
    macro_rules! draw {
        ($x_range:expr) => {{
            let mut chart = builder
                .build_cartesian_2d($x_range, y0..y1)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(axes.x)
                .y_desc(axes.y)
                .draw()
                .map_err(plot_err)?;
            for (i, s) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                if !s.plain {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(plot_err)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }};
    }
    if axes.log_x {
        draw!((x0 * 0.9..x1 * 1.1).log_scale());
    } else {
        draw!(x0..x1);
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_the_legend() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let series = [
            Series {
                name: "30 units".into(),
                points: vec![(1.0, 300.0), (4.0, 250.0), (20.0, 280.0)],
                plain: false,
            },
            Series {
                name: "baseline".into(),
                points: vec![(1.0, 270.0), (20.0, 270.0)],
                plain: true,
            },
        ];
        let axes = Axes {
            title: "t",
            x: "temperature",
            y: "test errors",
            log_x: true,
        };
        line_plot(&path, &axes, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("30 units"),
            "{svg:.200}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
