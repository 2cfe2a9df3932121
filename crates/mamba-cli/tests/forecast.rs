//! Forecasting end to end: a generated CSV (two seasonal variables) trains a patch-token Mamba
//! forecaster that beats the naive forecast on the test split; the checkpoint forecasts a new
//! CSV (CSV and PNG written); bad tables and configs stop the run naming the file and column.

mod common;

use common::{assert_cuda_refused, mamba, scratch, text};
use std::path::Path;

/// Monthly rows from 2000-01: `wave` has a 12-month season and a trend, `echo` the same season
/// later and smaller; a little deterministic noise on both.
fn table(path: &Path, rows: usize) {
    let mut out = String::from("month,wave,echo\n");
    for t in 0..rows {
        let season = (std::f64::consts::TAU * t as f64 / 12.0).sin();
        let noise = ((t * 7919 % 101) as f64 / 101.0 - 0.5) * 0.2;
        let wave = 10.0 + 0.02 * t as f64 + 3.0 * season + noise;
        let echo = -2.0 + 1.5 * (std::f64::consts::TAU * (t as f64 - 2.0) / 12.0).sin() - noise;
        out += &format!("{}-{:02},{wave:.4},{echo:.4}\n", 2000 + t / 12, t % 12 + 1);
    }
    std::fs::write(path, out).unwrap();
}

fn config(data: &Path) -> String {
    format!(
        r#"
[task]
kind = "forecasting"
data = "{}"
lookback = 24
horizon = 6
period = 12

[model]
kind = "mamba"
tokens = "patch"
patch_len = 6
patch_stride = 3

[backbone]
kind = "mamba1"
d_model = 16
n_layer = 1
d_state = 8

[train]
epochs = 4
batch_size = 16
seed = 2
log_every = 10
checkpoint_every = 1000

[optim]
lr = 3e-3
warmup_steps = 5
"#,
        data.display()
    )
}

/// The `| name | MSE | MAE |` rows of `mamba eval`'s test table.
fn test_mse(report: &str, name: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("| {name}")))
        .and_then(|rest| rest.split('|').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} row in {report}"))
}

#[test]
fn a_csv_trains_a_forecaster_that_forecasts_new_files() {
    let dir = scratch("forecast");
    table(&dir.join("months.csv"), 400);
    let cfg = dir.join("months.toml");
    std::fs::write(&cfg, config(&dir.join("months.csv"))).unwrap();
    let run = dir.join("run");
    let o = mamba(&["train", cfg.to_str().unwrap(), "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let o = mamba(&["eval", "--checkpoint", run.join("best").to_str().unwrap(), "--device", "cpu"]);
    let report = text(&o);
    assert!(
        o.status.success() && report.contains("test split (") && report.contains("seasonal naive (12)"),
        "{report}"
    );
    let (model, naive) = (test_mse(&report, "model"), test_mse(&report, "naive"));
    assert!(model < 0.5 * naive, "the model must beat the last value by far: {report}");

    // `--data`: another CSV, read by column name and standardised as in training. The same rows
    // with the columns swapped give the same errors; the JSON names each forecaster's.
    let swapped = dir.join("swapped.csv");
    let rows: Vec<String> = std::fs::read_to_string(dir.join("months.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{}", f[0], f[2], f[1])
        })
        .collect();
    std::fs::write(&swapped, rows.join("\n")).unwrap();
    let best = run.join("best");
    let o = mamba(&["eval", "--checkpoint", best.to_str().unwrap(), "--data", swapped.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mse = json["test"]["model"]["mse"].as_f64().unwrap();
    assert!((mse - model).abs() < 1e-4, "{mse} against {model} in {report}");
    assert!(json["test"]["naive (last value)"]["mae"].as_f64().is_some(), "{json}");

    // A new file: the last 30 months of another stretch of the same process, columns reordered
    // and an extra column; the forecast continues the month column.
    let recent = dir.join("recent.csv");
    table(&recent, 430);
    let text_in = std::fs::read_to_string(&recent).unwrap();
    let lines: Vec<&str> = text_in.lines().collect();
    let mut reordered = String::from("month,extra,echo,wave\n");
    for l in &lines[lines.len() - 30..] {
        let f: Vec<&str> = l.split(',').collect();
        reordered += &format!("{},0,{},{}\n", f[0], f[2], f[1]);
    }
    std::fs::write(&recent, reordered).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let best = run.join("best");
    let args = ["predict", "--checkpoint", best.to_str().unwrap(), "--out", out.to_str().unwrap()];
    if !cfg!(feature = "cuda") {
        assert_cuda_refused(&mamba(&[&args[..], &["--device", "cuda", recent.to_str().unwrap()]].concat()));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");
    }
    let o = mamba(&[&args[..], &["--device", "cpu", recent.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let forecast = std::fs::read_to_string(out.join("recent.forecast.csv")).unwrap();
    let rows: Vec<&str> = forecast.lines().collect();
    assert_eq!(rows[0], "month,wave,echo");
    assert_eq!(rows.len(), 7, "{forecast}");
    // 430 rows end at 2035-10: the forecast is 2035-11 .. 2036-04, near the true process.
    assert!(rows[1].starts_with("2035-11,") && rows[6].starts_with("2036-04,"), "{forecast}");
    for (h, row) in rows[1..].iter().enumerate() {
        let t = (430 + h) as f64;
        let truth = 10.0 + 0.02 * t + 3.0 * (std::f64::consts::TAU * t / 12.0).sin();
        let wave: f64 = row.split(',').nth(1).unwrap().parse().unwrap();
        assert!((wave - truth).abs() < 1.5, "month {h}: {wave} vs {truth} (season amplitude 3)");
    }
    let png = image::open(out.join("recent.forecast.png")).unwrap();
    assert_eq!((png.width(), png.height()), (800, 480), "one panel per variable");

    // Too short, a missing column, and a hole in the lookback: named, nothing written.
    let short = dir.join("short.csv");
    std::fs::write(&short, lines[..20].join("\n")).unwrap();
    let o = mamba(&[&args[..], &[short.to_str().unwrap()]].concat());
    assert!(!o.status.success() && text(&o).contains("short.csv: 19 rows; the model looks back 24"), "{}", text(&o));
    let renamed = dir.join("renamed.csv");
    std::fs::write(&renamed, text_in.replacen("echo", "ECHO", 1)).unwrap();
    let o = mamba(&[&args[..], &[renamed.to_str().unwrap()]].concat());
    assert!(!o.status.success() && text(&o).contains("renamed.csv: no column \"echo\""), "{}", text(&o));
    let holed = dir.join("holed.csv");
    let mut with_hole: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let last = with_hole.len() - 3;
    with_hole[last] = with_hole[last].rsplit_once(',').unwrap().0.to_string() + ",NA";
    std::fs::write(&holed, with_hole.join("\n")).unwrap();
    let o = mamba(&[&args[..], &[holed.to_str().unwrap()]].concat());
    let at = format!("the first in row {last} (time {:?})", with_hole[last].split(',').next().unwrap());
    assert!(
        !o.status.success() && text(&o).contains("column \"echo\" has missing values") && text(&o).contains(&at),
        "{}",
        text(&o)
    );
    assert!(!out.join("short.forecast.csv").exists() && !out.join("holed.forecast.png").exists());
}

#[test]
fn bad_tables_and_configs_are_named() {
    let dir = scratch("forecast-bad");
    let data = dir.join("months.csv");
    table(&data, 120);
    let cfg = dir.join("bad.toml");
    let train = |config: String| {
        std::fs::write(&cfg, config).unwrap();
        let o = mamba(&["train", cfg.to_str().unwrap(), "--out", dir.join("run").to_str().unwrap()]);
        assert!(!o.status.success());
        text(&o)
    };
    let good = config(&data);
    // A ragged row and a non-number: file, line and column.
    let rows = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, rows.replacen("2000-03,", "2000-03,1,", 1)).unwrap();
    let msg = train(good.clone());
    assert!(msg.contains("months.csv, line 4") && msg.contains("4 fields, but the header has 3"), "{msg}");
    std::fs::write(&data, rows.replacen("2000-05,", "2000-05,x", 1)).unwrap();
    let msg = train(good.clone());
    assert!(msg.contains("months.csv, line 6, column 2"), "{msg}");
    // A missing value in a modelled column.
    let holed: Vec<String> =
        rows.lines().map(|l| if l.starts_with("2000-05,") { "2000-05,NA,1.0".into() } else { l.to_string() }).collect();
    std::fs::write(&data, holed.join("\n")).unwrap();
    let msg = train(good.clone());
    assert!(
        msg.contains("months.csv: column \"wave\" has 1 missing values, the first in row 5 (time \"2000-05\")"),
        "{msg}"
    );
    std::fs::write(&data, &rows).unwrap();
    for (change, needle) in [
        (("lookback = 24", "lookback = 200"), "too few"),
        (("period = 12", "period = 30"), "period 30"),
        (("period = 12", "columns = [\"wave\", \"nope\"]"), "no column \"nope\""),
        (("period = 12", "split = [0.9, 0.2]"), "split = [0.9, 0.2]"),
        (("period = 12", "split = \"weekly\""), "\"weekly\""),
        (("patch_len = 6", "patch_len = 60"), "patch_len 60"),
        (("tokens = \"patch\"", "tokens = \"patch\"\ndropout = 0.1"), "dropout"),
    ] {
        let msg = train(good.replace(change.0, change.1));
        // Named by the config, or by the data file for a column it lacks.
        let file = msg.contains("bad.toml") || msg.contains("months.csv");
        assert!(file && msg.contains(needle) && !msg.contains("panicked"), "{needle}: {msg}");
    }
}
