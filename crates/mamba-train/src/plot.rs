//! Figures: the curves of a run, drawn from its metrics.jsonl (training and validation loss by
//! step, and every other validation metric, one panel each, as SVG); a confusion matrix (SVG); a
//! forecast after its history (PNG). Text is set in the bundled DejaVu Sans, so drawing needs no
//! system fonts.

use crate::{Error, Result};
use plotters::prelude::*;
use plotters::style::text_anchor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

/// Registers the bundled font as "sans-serif" (once); every figure calls it before drawing.
fn fonts() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        let font: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The bundled file is a valid font; should it ever fail, text is simply not drawn.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    });
}

/// (step, value) points.
type Series = Vec<(f64, f64)>;

/// A panel: its title and its named series.
type Panel<'a> = (String, Vec<(&'a String, &'a Series)>);

/// (step, value) series by name: `train loss`, `validation loss`, `validation accuracy`, ...
fn series(metrics: &Path) -> Result<BTreeMap<String, Series>> {
    let text =
        std::fs::read_to_string(metrics).map_err(|source| Error::Io { path: metrics.display().to_string(), source })?;
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(step), Some(split)) = (v["step"].as_f64(), v["split"].as_str()) else { continue };
        let Some(fields) = v.as_object() else { continue };
        for (k, x) in fields {
            let skip = ["step", "epoch", "split", "lr", "grad_norm", "examples_per_s"].contains(&k.as_str());
            if let (false, Some(x)) = (skip, x.as_f64()) {
                if split == "validation" || k == "loss" {
                    out.entry(format!("{split} {k}")).or_default().push((step, x));
                }
            }
        }
    }
    Ok(out)
}

/// Writes the curves of `metrics` (a metrics.jsonl) to `out` (SVG).
pub fn plot_metrics(metrics: &Path, out: &Path) -> Result<()> {
    fonts();
    let all = series(metrics)?;
    let mut panels: Vec<Panel> = vec![("loss".into(), all.iter().filter(|(k, _)| k.ends_with(" loss")).collect())];
    for (k, v) in &all {
        if !k.ends_with(" loss") {
            panels.push((k.clone(), vec![(k, v)]));
        }
    }
    panels.retain(|(_, s)| s.iter().any(|(_, v)| !v.is_empty()));
    let fail = |e: String| Error::Io { path: out.display().to_string(), source: std::io::Error::other(e) };
    let root = SVGBackend::new(out, (640, 320 * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    for ((title, lines), area) in panels.iter().zip(root.split_evenly((panels.len().max(1), 1))) {
        let points = lines.iter().flat_map(|(_, v)| v.iter());
        let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points.filter(|(_, y)| y.is_finite()) {
            (x1, y0, y1) = (x1.max(x), y0.min(y), y1.max(y));
        }
        if !y0.is_finite() {
            continue;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| fail(e.to_string()))?;
        chart.configure_mesh().x_desc("step").draw().map_err(|e| fail(e.to_string()))?;
        for (i, (name, v)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(v.iter().copied(), color.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Writes a confusion matrix (`matrix[true][predicted]` counts) to `out` (SVG): each cell shaded
/// by its share of the true class's images, with its count; rows true classes, columns
/// predictions. Written beside `out` and renamed, so a failure leaves no half file.
pub fn plot_confusion(classes: &[String], matrix: &[Vec<usize>], out: &Path) -> Result<()> {
    fonts();
    let fail = |e: String| Error::Io { path: out.display().to_string(), source: std::io::Error::other(e) };
    let k = classes.len().max(1) as i32;
    let (cell, margin) = (36i32, 110i32);
    let side = (margin + k * cell + 20) as u32;
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (side, side)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let text = |s: &str, x: i32, y: i32, size: i32, colour: &RGBColor| {
            let style = ("sans-serif", size)
                .into_font()
                .color(colour)
                .pos(text_anchor::Pos::new(text_anchor::HPos::Center, text_anchor::VPos::Center));
            root.draw(&Text::new(s.to_string(), (x, y), style)).map_err(|e| fail(e.to_string()))
        };
        text("predicted", margin + k * cell / 2, 14, 14, &BLACK)?;
        for (i, (name, row)) in classes.iter().zip(matrix).enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            let y = margin + i as i32 * cell;
            text(name, margin / 2, y + cell / 2, 12, &BLACK)?;
            text(name, margin + i as i32 * cell + cell / 2, margin - 12, 12, &BLACK)?;
            for (j, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                // White to dark blue by share.
                let shade = |full: u8| (255.0 - share * (255.0 - full as f64)) as u8;
                let fill = RGBColor(shade(8), shade(48), shade(107));
                let x = margin + j as i32 * cell;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled()))
                    .map_err(|e| fail(e.to_string()))?;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], RGBColor(200, 200, 200)))
                    .map_err(|e| fail(e.to_string()))?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                text(&count.to_string(), x + cell / 2, y + cell / 2, 11, &ink)?;
            }
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, out).map_err(|source| Error::Io { path: out.display().to_string(), source })
}

/// Writes each variable's `history` (its last rows) followed by its `forecast` to `out` (PNG),
/// one panel per variable, the x axis in rows from the first forecast row. Written beside `out`
/// and renamed, so a failure leaves no half file.
pub fn plot_forecast(names: &[String], history: &[Vec<f32>], forecast: &[Vec<f32>], out: &Path) -> Result<()> {
    fonts();
    let fail = |e: String| Error::Io { path: out.display().to_string(), source: std::io::Error::other(e) };
    let file = out.file_name().map_or("forecast.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{file}.tmp.png"));
    let panels = names.len().max(1);
    let (width, height) = (800u32, 240 * panels as u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        for (((name, past), future), area) in
            names.iter().zip(history).zip(forecast).zip(root.split_evenly((panels, 1)))
        {
            let n = past.len() as f64;
            let past: Vec<(f64, f64)> = past.iter().enumerate().map(|(i, &v)| (i as f64 - n, v as f64)).collect();
            // The forecast line starts at the last known value, so the two join.
            let future: Vec<(f64, f64)> = past
                .last()
                .copied()
                .into_iter()
                .chain(future.iter().enumerate().map(|(i, &v)| (i as f64, v as f64)))
                .collect();
            let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
            for &(_, y) in past.iter().chain(&future).filter(|(_, y)| y.is_finite()) {
                (y0, y1) = (y0.min(y), y1.max(y));
            }
            if !y0.is_finite() {
                continue;
            }
            let pad = ((y1 - y0) * 0.05).max(1e-6);
            let x1 = future.last().map_or(1.0, |p| p.0 + 1.0);
            let mut chart = ChartBuilder::on(&area)
                .caption(name, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(-n..x1, (y0 - pad)..(y1 + pad))
                .map_err(|e| fail(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc("rows from the first forecast")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(|e| fail(e.to_string()))?;
            for (label, line, color) in [("history", &past, BLUE), ("forecast", &future, RED)] {
                chart
                    .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| fail(e.to_string()))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()
                .map_err(|e| fail(e.to_string()))?;
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(width, height, pixels).ok_or_else(|| fail("pixel buffer size".into()))?;
    image.save_with_format(&tmp, image::ImageFormat::Png).map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, out).map_err(|source| Error::Io { path: out.display().to_string(), source })
}
