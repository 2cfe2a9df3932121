//! Splits, standardisation, windows, metrics and the naive baselines, by their definitions.

use mamba_series::{evaluate, windows, Errors, Forecaster, Naive, Scaler, SeasonalNaive, SplitRule, Splits};

#[test]
fn splits_follow_the_papers_conventions() {
    // 0.7 / 0.1 / 0.2 of 100 rows, lookback 10: validation and test windows look back into
    // the split before.
    let s = SplitRule::Fractions { train: 0.7, validation: 0.1 }.split(100, 10).unwrap();
    assert_eq!(s, Splits { train: 0..70, validation: 60..80, test: 70..100 });
    // ETTh1 (17,420 hourly rows): 12 / 4 / 4 months of 30 days; the rest is unused.
    let s = SplitRule::EttMonths { rows_per_day: 24 }.split(17_420, 96).unwrap();
    assert_eq!(s, Splits { train: 0..8640, validation: 8544..11_520, test: 11_424..14_400 });
    // Too short to split.
    assert!(SplitRule::Fractions { train: 0.7, validation: 0.1 }.split(12, 10).is_none());
    assert!(SplitRule::EttMonths { rows_per_day: 24 }.split(9000, 96).is_none());
}

#[test]
fn standardisation_is_fitted_on_the_training_rows_only() {
    let cols = vec![vec![1.0, 2.0, 3.0, 100.0], vec![5.0, 5.0, 5.0, 5.0]];
    let s = Scaler::fit(&cols, 0..3);
    assert!((s.mean[0] - 2.0).abs() < 1e-6 && (s.std[0] - (2.0f32 / 3.0).sqrt()).abs() < 1e-6);
    assert_eq!((s.mean[1], s.std[1]), (5.0, 1.0), "a constant column is centred, not divided by 0");
    let z = s.transform(&cols);
    assert!(z[0][..3].iter().sum::<f32>().abs() < 1e-5);
    assert!((z[0][3] - 98.0 / s.std[0]).abs() < 1e-3, "later rows do not move the fit");
    let back = s.inverse(0, &z[0]);
    assert!(back.iter().zip(&cols[0]).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn windows_slide_inside_their_rows() {
    assert_eq!(windows(0..10, 3, 2, 1), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(windows(5..15, 3, 2, 2), vec![5, 7, 9]);
    assert!(windows(0..4, 3, 2, 1).is_empty());
}

#[test]
fn baselines_are_their_definitions() {
    assert_eq!(Naive.forecast(&[1.0, 2.0, 3.0], 2), vec![3.0, 3.0]);
    assert_eq!(SeasonalNaive { period: 2 }.forecast(&[1.0, 2.0, 3.0, 4.0], 5), vec![3.0, 4.0, 3.0, 4.0, 3.0]);
    assert_eq!(SeasonalNaive { period: 1 }.forecast(&[1.0, 2.0], 3), Naive.forecast(&[1.0, 2.0], 3));

    // A series with period 4: the seasonal naive forecast is exact, the naive one is not.
    let col: Vec<f32> = (0..40).map(|t| [0.0, 1.0, 0.0, -1.0][t % 4]).collect();
    let cols = vec![col];
    let seasonal = evaluate(&SeasonalNaive { period: 4 }, &cols, 0..40, 8, 4);
    let naive = evaluate(&Naive, &cols, 0..40, 8, 4);
    assert_eq!((seasonal.mse(), seasonal.count), (0.0, 29 * 4));
    // Each window's last value is one of the cycle; errors average to 1 per step either way.
    assert!((naive.mse() - 1.0).abs() < 0.1, "{}", naive.mse());

    let mut e = Errors::default();
    e.add(&[1.0, 2.0], &[0.0, 4.0]);
    assert_eq!((e.mse(), e.mae()), (2.5, 1.5));
}
