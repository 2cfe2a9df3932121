//! The naive and seasonal-naive forecasts of any CSV of the ETT layout (time, then variables):
//! test MSE / MAE on standardised values, chronological 0.7 / 0.1 / 0.2 split, every window.
//!
//!     cargo run --release -p mamba-series --example baselines -- FILE.csv LOOKBACK HORIZON PERIOD
//!
//! Default: the bundled monthly sunspots, lookback 144, horizon 12, period 132 (the 11-year cycle).

use mamba_series::{evaluate, read_csv, Naive, Scaler, SeasonalNaive, SplitRule};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/forecasting/sunspots-monthly.csv");
    let path = args.first().map(PathBuf::from).unwrap_or(default);
    let arg = |i: usize, d: usize| args.get(i).map_or(Ok(d), |a| a.parse::<usize>());
    let (lookback, horizon, period) = (arg(1, 144)?, arg(2, 12)?, arg(3, 132)?);
    if period > lookback {
        return Err(format!("the period ({period}) must fit in the lookback ({lookback})").into());
    }
    let table = read_csv(&path)?;
    let splits = SplitRule::Fractions { train: 0.7, validation: 0.1 }
        .split(table.len(), lookback)
        .ok_or_else(|| format!("{}: {} rows are too few for lookback {lookback}", path.display(), table.len()))?;
    let columns = Scaler::fit(&table.columns, splits.train.clone()).transform(&table.columns);
    println!("{}: {} rows x {} variables, test rows {:?}", path.display(), table.len(), table.names.len(), splits.test);
    println!("| forecaster | test MSE | test MAE |");
    println!("|---|---|---|");
    for (name, e) in [
        ("naive (last value)", evaluate(&Naive, &columns, splits.test.clone(), lookback, horizon)),
        ("seasonal naive", evaluate(&SeasonalNaive { period }, &columns, splits.test.clone(), lookback, horizon)),
    ] {
        println!("| {name} | {:.4} | {:.4} |", e.mse(), e.mae());
    }
    Ok(())
}
