//! The forecasting models: DLinear against plain loops, RevIN's equivariance, what patch and
//! variate tokens let a forecast see, gradients for every parameter, config errors.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use mamba_series::{moving_average_matrix, ForecastConfig, ForecastModel, ForecastShape};
use std::collections::HashMap;

const SHAPE: ForecastShape = ForecastShape { lookback: 11, horizon: 5, variables: 3 };

const PATCH: &str = r#"
[model]
kind = "mamba"
tokens = "patch"
patch_len = 4
patch_stride = 3
revin = "affine"

[backbone]
kind = "mamba1"
d_model = 8
n_layer = 2
d_state = 4
"#;

const VARIATE: &str = r#"
[model]
kind = "mamba"
tokens = "variate"

[backbone]
kind = "mamba2"
d_model = 8
n_layer = 1
d_state = 4
headdim = 4
chunk_size = 2
"#;

const DLINEAR: &str = r#"
[model]
kind = "dlinear"
moving_average = 5
"#;

fn config(text: &str, shape: ForecastShape) -> Result<ForecastConfig, String> {
    let mut table: toml::Table = text.parse().unwrap();
    let model = match table.remove("model") {
        Some(toml::Value::Table(t)) => t,
        _ => panic!("no [model]"),
    };
    let backbone = match table.remove("backbone") {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    };
    ForecastConfig::from_tables(model, backbone, "test.toml", shape).map_err(|e| e.to_string())
}

/// The model of `text` over seeded parameters held as variables.
fn build(text: &str, shape: ForecastShape) -> (ForecastModel, HashMap<String, Var>) {
    let cfg = config(text, shape).unwrap();
    let vars: HashMap<String, Var> =
        cfg.init_params(3).unwrap().into_iter().map(|(n, t)| (n, Var::from_tensor(&t).unwrap())).collect();
    let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = ForecastModel::load(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap();
    (model, vars)
}

/// Deterministic lookbacks (batch, variables, lookback) with different levels and scales.
fn lookbacks(batch: usize, shape: ForecastShape) -> Vec<f32> {
    let n = batch * shape.variables * shape.lookback;
    (0..n).map(|i| ((i * 37 % 23) as f32 * 0.3).sin() * (1.0 + (i / shape.lookback) as f32) + (i % 7) as f32).collect()
}

fn forward(model: &ForecastModel, x: &[f32], batch: usize, shape: ForecastShape) -> Vec<f32> {
    let x = Tensor::from_vec(x.to_vec(), (batch, shape.variables, shape.lookback), &Device::Cpu).unwrap();
    model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_moving_average_repeats_the_ends() {
    for (len, width) in [(7, 5), (3, 25), (1, 3), (10, 1)] {
        let x: Vec<f32> = (0..len).map(|i| (i * i) as f32 - 2.0).collect();
        let a = moving_average_matrix(len, width);
        let half = width as isize / 2;
        for t in 0..len {
            // The reference: a window over the series padded with copies of its first and last values.
            let window: f32 = (-half..=half).map(|o| x[(t as isize + o).clamp(0, len as isize - 1) as usize]).sum();
            let ours: f32 = (0..len).map(|j| a[t * len + j] * x[j]).sum();
            assert!((ours - window / width as f32).abs() < 1e-4, "len {len} width {width} row {t}");
        }
    }
}

#[test]
fn dlinear_is_two_linear_maps_of_trend_and_remainder() {
    let (model, vars) = build(DLINEAR, SHAPE);
    let ForecastShape { lookback: l, horizon: h, variables: v } = SHAPE;
    let p = |name: &str| vars[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (ws, bs, wt, bt) =
        (p("linear_seasonal.weight"), p("linear_seasonal.bias"), p("linear_trend.weight"), p("linear_trend.bias"));
    let x = lookbacks(2, SHAPE);
    let ours = forward(&model, &x, 2, SHAPE);
    let mut expected = vec![];
    for series in x.chunks(l) {
        let trend: Vec<f32> = (0..l as isize)
            .map(|t| (-2..=2).map(|o| series[(t + o).clamp(0, l as isize - 1) as usize]).sum::<f32>() / 5.0)
            .collect();
        for k in 0..h {
            let mut y = bs[k] + bt[k];
            for j in 0..l {
                y += ws[k * l + j] * (series[j] - trend[j]) + wt[k * l + j] * trend[j];
            }
            expected.push(y);
        }
    }
    assert_eq!(ours.len(), 2 * v * h);
    assert!(max_diff(&ours, &expected) < 1e-4);
}

#[test]
fn revin_forecasts_follow_each_series_scale_and_level() {
    // With RevIN, moving every lookback by its own a x + b (a > 0) moves its forecast the same
    // way: the model sees only the standardised shape. Patch tokens (affine RevIN) and variate
    // tokens (plain RevIN, the blocks mixing variables) alike.
    for text in [PATCH, VARIATE] {
        let (model, _) = build(text, SHAPE);
        let x = lookbacks(2, SHAPE);
        let base = forward(&model, &x, 2, SHAPE);
        let affine = |series: usize| (0.5 + series as f32, 10.0 - 3.0 * series as f32);
        let apply = |values: &[f32], len: usize| -> Vec<f32> {
            values.iter().enumerate().map(|(i, v)| v * affine(i / len).0 + affine(i / len).1).collect()
        };
        let (moved, expected) = (apply(&x, SHAPE.lookback), apply(&base, SHAPE.horizon));
        let got = forward(&model, &moved, 2, SHAPE);
        assert!(max_diff(&got, &expected) < 2e-3, "{text}: {}", max_diff(&got, &expected));
    }
}

#[test]
fn patch_tokens_forecast_each_variable_on_its_own_and_variate_tokens_mix_them() {
    let x = lookbacks(1, SHAPE);
    let mut other = x.clone();
    let l = SHAPE.lookback;
    for v in &mut other[l..2 * l] {
        *v = -*v * 3.0; // variable 1 only
    }
    let h = SHAPE.horizon;
    for (text, independent) in [(PATCH, true), (VARIATE, false)] {
        let (model, _) = build(text, SHAPE);
        let (a, b) = (forward(&model, &x, 1, SHAPE), forward(&model, &other, 1, SHAPE));
        let (first, third) = (max_diff(&a[..h], &b[..h]), max_diff(&a[2 * h..], &b[2 * h..]));
        assert!(max_diff(&a[h..2 * h], &b[h..2 * h]) > 1e-3, "{text}: variable 1's forecast must change");
        if independent {
            assert_eq!((first, third), (0.0, 0.0), "{text}: the other variables' forecasts are untouched");
        } else {
            assert!(first > 1e-5 && third > 1e-5, "{text}: the blocks run over the variables");
        }
    }
}

#[test]
fn patches_end_at_the_newest_value() {
    // Lookback 11, patches of 4 every 3: three patches over steps 1..11; step 0 is in none.
    let (model, _) = build(PATCH, SHAPE);
    let x = lookbacks(1, SHAPE);
    let base = forward(&model, &x, 1, SHAPE);
    let changed = |step: usize| {
        let mut y = x.clone();
        y[step] += 5.0;
        y
    };
    // Without RevIN (whose statistics read every step) the patches are all that sees the input.
    let (plain, _) = build(&PATCH.replace("revin = \"affine\"", "revin = \"none\""), SHAPE);
    let plain_base = forward(&plain, &x, 1, SHAPE);
    let h = SHAPE.horizon;
    assert_eq!(max_diff(&forward(&plain, &changed(0), 1, SHAPE)[..h], &plain_base[..h]), 0.0, "step 0 is dropped");
    assert!(
        max_diff(&forward(&plain, &changed(10), 1, SHAPE)[..h], &plain_base[..h]) > 1e-4,
        "the newest step is read"
    );
    assert!(max_diff(&forward(&model, &changed(10), 1, SHAPE)[..h], &base[..h]) > 1e-4);
}

#[test]
fn every_parameter_gets_a_gradient() {
    let one_patch = PATCH.replace("patch_len = 4", "patch_len = 11");
    let single = ForecastShape { lookback: 1, horizon: 1, variables: 1 };
    let cases = [
        (PATCH, SHAPE),
        (one_patch.as_str(), SHAPE),
        (VARIATE, SHAPE),
        (VARIATE, single),
        (DLINEAR, SHAPE),
        (DLINEAR, single),
    ];
    for (text, shape) in cases {
        let (model, vars) = build(text, shape);
        let x = Tensor::from_vec(lookbacks(2, shape), (2, shape.variables, shape.lookback), &Device::Cpu).unwrap();
        let y = model.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, shape.variables, shape.horizon]);
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in {text} {shape:?}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{name} in {text} {shape:?}");
        }
    }
}

#[test]
fn bad_configs_and_inputs_are_named() {
    let bad = [
        (PATCH.replace("patch_len = 4", "patch_len = 12"), "patch_len 12"),
        (DLINEAR.replace("= 5", "= 4"), "moving_average must be odd"),
        (
            format!("{DLINEAR}\n[backbone]\nkind = \"mamba1\"\nd_model = 8\nn_layer = 1\nd_state = 4\n"),
            "remove [backbone]",
        ),
        (PATCH.replace("tokens = \"patch\"", "tokens = \"pixels\""), "pixels"),
        (PATCH.replace("revin = \"affine\"", "revin = true"), "revin"),
        (PATCH.replace("d_state = 4", "d_state = 4\nroutes = [\"sideways\"]"), "sideways"),
        (VARIATE.replace("[backbone]", "[backbone]\ncolour = 1"), "colour"),
        (PATCH.replace("[backbone]", "[unused]"), "needs a [backbone]"),
    ];
    for (text, needle) in bad {
        let e = config(&text, SHAPE).unwrap_err();
        assert!(e.contains("test.toml") && e.contains(needle), "{needle}: {e}");
    }
    let e = config(PATCH, ForecastShape { horizon: 0, ..SHAPE }).unwrap_err();
    assert!(e.contains("horizon"), "{e}");
    let (model, _) = build(PATCH, SHAPE);
    let wrong = Tensor::zeros((1, 2, 11), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward(&wrong).unwrap_err().to_string();
    assert!(e.contains("2 variables x 11 steps") && e.contains("3 x 11"), "{e}");
}

#[test]
fn biases_norms_and_the_position_embedding_take_no_weight_decay() {
    let exempt = |text: &str| -> Vec<String> {
        let params = config(text, SHAPE).unwrap().params();
        params.into_iter().filter(|p| !p.decay && !p.name.starts_with("layers.")).map(|p| p.name).collect()
    };
    assert_eq!(exempt(PATCH), ["revin.bias", "embed.bias", "head.bias", "pos_embed", "norm_f.weight"]);
    assert_eq!(exempt(DLINEAR), ["linear_seasonal.bias", "linear_trend.bias"]);
    // The linear layers' weights are the matrices; their biases are not.
    let params = config(DLINEAR, SHAPE).unwrap().params();
    let matrices: Vec<&str> = params.iter().filter(|p| p.matrix).map(|p| p.name.as_str()).collect();
    assert_eq!(matrices, ["linear_seasonal.weight", "linear_trend.weight"]);
}
