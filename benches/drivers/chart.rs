//! The results as a picture: each workload's pgengine contenders against the workload's
//! baseline (1.0 = level), one bar per CPU placement, in `benches/results/ratios.svg`.
//!
//! A run measures one placement, so each run records its ratios in
//! `benches/results/<placement>.tsv` (replacing the lines of the workloads it ran, keeping the
//! others) and then draws the chart from every placement file there is. Run the bench once per
//! placement (`PGENGINE_BENCH_PIN=same|split|none`) for the whole picture; the files are
//! tracked, so the README shows the last full measurement.

use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::BenchResult;

/// The placements, in the order their bars are drawn, with their colours.
const PLACEMENTS: [(&str, RGBColor); 3] = [
    ("same", RGBColor(31, 119, 180)),
    ("split", RGBColor(255, 127, 14)),
    ("none", RGBColor(44, 160, 44)),
];

/// One bar: pgengine's contender `driver` in `workload`, against `baseline`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub workload: String,
    pub driver: String,
    pub baseline: String,
    pub ratio: f64,
}

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results")
}

/// Records the ratios of `workload` for `placement` (`same`, `split` or `none`), replacing
/// the ones an earlier run recorded for it; `machine` heads the file.
pub fn record(placement: &str, machine: &str, workload: &str, ratios: &[Ratio]) -> BenchResult<()> {
    let dir = results_dir();
    fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{placement}.tsv"));
    let mut kept = read(&file)?;
    match kept.iter().position(|r| r.workload == workload) {
        // In place, so the order of the workloads stays the bench's.
        Some(at) => {
            kept.retain(|r| r.workload != workload);
            for (k, r) in ratios.iter().enumerate() {
                kept.insert(at + k, r.clone());
            }
        }
        None => kept.extend(ratios.iter().cloned()),
    }
    let mut text = format!("# {machine}\n# workload\tdriver\tbaseline\tratio\n");
    for r in &kept {
        text.push_str(&format!(
            "{}\t{}\t{}\t{:.4}\n",
            r.workload, r.driver, r.baseline, r.ratio
        ));
    }
    fs::write(&file, text)?;
    Ok(())
}

fn read(file: &Path) -> BenchResult<Vec<Ratio>> {
    let Ok(text) = fs::read_to_string(file) else {
        return Ok(Vec::new());
    };
    let mut ratios = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let fields: Vec<&str> = line.split('\t').collect();
        let [workload, driver, baseline, ratio] = fields[..] else {
            return Err(format!(
                "{}: a line of {} fields: {line:?}",
                file.display(),
                fields.len()
            )
            .into());
        };
        ratios.push(Ratio {
            workload: workload.to_owned(),
            driver: driver.to_owned(),
            baseline: baseline.to_owned(),
            ratio: ratio.parse()?,
        });
    }
    Ok(ratios)
}

/// Draws `ratios.svg` from every placement recorded so far; returns its path.
pub fn draw() -> BenchResult<PathBuf> {
    let dir = results_dir();
    let per_placement: Vec<Vec<Ratio>> = PLACEMENTS
        .iter()
        .map(|(name, _)| read(&dir.join(format!("{name}.tsv"))))
        .collect::<BenchResult<_>>()?;
    // One row per (workload, driver), in the order first seen.
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for r in per_placement.iter().flatten() {
        if !rows
            .iter()
            .any(|(w, d, _)| *w == r.workload && *d == r.driver)
        {
            rows.push((r.workload.clone(), r.driver.clone(), r.baseline.clone()));
        }
    }
    let file = dir.join("ratios.svg");
    if rows.is_empty() {
        return Ok(file);
    }
    let max = per_placement
        .iter()
        .flatten()
        .map(|r| r.ratio)
        .fold(1.2f64, f64::max)
        .min(4.0);
    // Room on the left (negative x) for each row's name.
    let label_room = max * 0.85;
    let height = 60 + rows.len() as u32 * 34;
    let root = SVGBackend::new(&file, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "pgengine ÷ baseline, median throughput (1.0 = level; bars: same core, split, unpinned)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .build_cartesian_2d(-label_room..max, 0f64..rows.len() as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_labels(12)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|x| {
            if *x < 0.0 {
                String::new()
            } else {
                format!("{x:.1}")
            }
        })
        .draw()?;
    for (i, (workload, driver, baseline)) in rows.iter().enumerate() {
        let top = rows.len() as f64 - i as f64;
        chart.draw_series(std::iter::once(Text::new(
            format!("{workload}: {driver} vs {baseline}"),
            (-label_room * 0.98, top - 0.45),
            ("sans-serif", 12),
        )))?;
        for (j, (placement, colour)) in PLACEMENTS.iter().enumerate() {
            let Some(r) = per_placement[j]
                .iter()
                .find(|r| r.workload == *workload && r.driver == *driver)
            else {
                continue;
            };
            let y0 = top - 0.1 - (j as f64 + 1.0) * 0.27;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y0), (r.ratio.min(max), y0 + 0.24)],
                colour.filled(),
            )))?;
            // A bar cut at the chart's edge says its value inside the bar.
            let (label, at) = if r.ratio > max * 0.9 {
                (format!("{:.2} {placement} ▸", r.ratio), max * 0.78)
            } else {
                (format!("{:.2} {placement}", r.ratio), r.ratio + max * 0.01)
            };
            chart.draw_series(std::iter::once(Text::new(
                label,
                (at, y0 + 0.2),
                ("sans-serif", 10),
            )))?;
        }
    }
    // Level with the baseline.
    chart.draw_series(LineSeries::new(
        [(1.0, 0.0), (1.0, rows.len() as f64)],
        BLACK.stroke_width(1),
    ))?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(file)
}
