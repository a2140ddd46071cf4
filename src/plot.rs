//! PNG charts with plotters; the font is built in, so charts render on machines without fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::atomic::{classify, parent_of, NewFile, Target};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font, checked by the plot test.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One series of a grouped bar chart: its name, colour and one value per group.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub values: Vec<f64>,
}

/// Draws a grouped bar chart with values in 0..=1 to `path`: written whole under a temporary
/// name and renamed (see [`crate::atomic`]), or, when `path` is a device node or a named
/// pipe, drawn in a temporary file and copied into it.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[Series],
) -> Result<()> {
    register();
    let target = classify(path).with_context(|| format!("--plot {}", path.display()))?;
    let target = match target {
        Target::Replace(t) => t,
        Target::Folder => anyhow::bail!("--plot {}: is a folder; give a file name", path.display()),
        in_place @ (Target::InPlace | Target::Descriptor(_)) => {
            let tmp = tempfile::Builder::new()
                .suffix(".png")
                .tempfile()
                .context("creating a temporary file for the chart")?;
            draw(tmp.path(), title, y_label, groups, series)
                .map_err(|e| anyhow!("drawing the chart: {e}"))?;
            let mut out = crate::output::open_in_place(path, &in_place)
                .with_context(|| format!("--plot {}: cannot open it", path.display()))?;
            std::io::copy(&mut std::fs::File::open(tmp.path())?, &mut out)
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(());
        }
    };
    let tmp = NewFile::create_with_suffix(&target, ".png").with_context(|| {
        format!(
            "--plot {}: cannot write in {}",
            path.display(),
            parent_of(&target).display()
        )
    })?;
    draw(tmp.temp_path(), title, y_label, groups, series)
        .map_err(|e| anyhow!("drawing the chart: {e}"))?;
    tmp.commit()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let width = (180 * groups.len() as u32).max(640);
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..1.05f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let k = series.len().max(1) as f64;
    let bar = 0.8 / k;
    for (s_idx, s) in series.iter().enumerate() {
        let color = s.color;
        chart
            .draw_series(s.values.iter().enumerate().map(|(g, &v)| {
                let x0 = g as f64 + 0.1 + s_idx as f64 * bar;
                Rectangle::new(
                    [(x0, 0.0), (x0 + bar * 0.92, v.clamp(0.0, 1.0))],
                    color.filled(),
                )
            }))?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(s.values.iter().enumerate().map(|(g, &v)| {
            let x = g as f64 + 0.1 + s_idx as f64 * bar;
            Text::new(
                format!("{v:.2}"),
                (x, (v + 0.035).min(1.04)),
                ("sans-serif", 13).into_font(),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    // Group names under the axis, centred on each group.
    for (g, name) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        let style = ("sans-serif", 14).into_font().into_text_style(&root).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        root.draw(&Text::new(name.clone(), (px, py + 10), style))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let groups = vec!["none frozen".to_string(), "encoder frozen".to_string()];
        let series = [
            Series {
                name: "class",
                color: RGBColor(31, 119, 180),
                values: vec![0.9, 0.5],
            },
            Series {
                name: "sentiment",
                color: RGBColor(255, 127, 14),
                values: vec![0.7, 0.33],
            },
        ];
        grouped_bars(&path, "eval accuracy", "accuracy", &groups, &series).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(
            bytes.len() > 5000,
            "a chart with text, not an empty image: {} bytes",
            bytes.len()
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
