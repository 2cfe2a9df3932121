//! The reference initialisation: every checkpoint tensor, in the reference's ranges, repeatable.

use candle_core::{DType, Device, Tensor};
use mamba_nn::{init_params, InitConfig, LmConfig, MambaLm, Param};
use std::collections::BTreeSet;

fn config(kind: &str, extra: &str) -> LmConfig {
    let headdim = if kind == "mamba2" { "headdim = 16\n" } else { "" };
    let text = format!(
        "[model]\nvocab_size = 300\n[backbone]\nkind = \"{kind}\"\nd_model = 64\nn_layer = 4\nd_state = 8\n{headdim}{extra}"
    );
    LmConfig::from_toml(&text, "test.toml").unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn range(v: &[f32]) -> (f32, f32) {
    v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

#[test]
fn every_tensor_is_initialised_in_the_reference_ranges() {
    let init = InitConfig::default();
    for cfg in [
        config("mamba1", ""),
        config("mamba1", "routes = [\"forward\", \"reverse\"]\nroute_params = \"per_route\"\nproj_bias = true"),
        config("mamba2", "ngroups = 2"),
        config("mamba1", "selective = false"),
        config("mamba2", "routes = [\"forward\", \"reverse\"]\nroute_params = \"per_route\""),
    ] {
        let p = init_params(&cfg, &init, 0).unwrap();
        let declared = MambaLm::params(&cfg);
        assert_eq!(p.len(), declared.len());
        for Param { name, shape, .. } in &declared {
            assert_eq!(p[name].dims(), shape.as_slice(), "{name}");
        }
        let b = &cfg.backbone;
        for (name, t) in &p {
            let v = values(t);
            let (lo, hi) = range(&v);
            if name.contains("dt_bias") || (name.contains("dt_proj") && name.ends_with("bias")) {
                // softplus(bias) is the initial dt.
                for x in &v {
                    let dt = (*x as f64).exp().ln_1p();
                    assert!(dt >= init.dt_min * 0.999 && dt <= init.dt_max * 1.001, "{name}: dt {dt}");
                }
            } else if name.contains("A") && name.ends_with("_log") {
                if matches!(b.mixer, mamba_nn::MixerConfig::Mamba1(_)) {
                    let row: Vec<f32> = (1..=b.d_state).map(|n| (n as f32).ln()).collect();
                    assert!(v.chunks(b.d_state).all(|r| r == row.as_slice()), "{name}");
                } else {
                    assert!(lo >= 0.0 && hi <= 16f32.ln() + 1e-6, "{name}: {lo} {hi}");
                }
            } else if name.ends_with("out_proj.weight") {
                let bound = 1.0 / ((b.d_inner() * b.n_layer) as f32).sqrt();
                assert!(-lo <= bound && hi <= bound && hi > 0.9 * bound, "{name}: {lo} {hi} vs {bound}");
            } else if name.ends_with("in_proj.weight") {
                let bound = 1.0 / (b.d_model as f32).sqrt();
                assert!(-lo <= bound && hi <= bound && hi > 0.9 * bound, "{name}: {lo} {hi} vs {bound}");
            } else if name.ends_with("proj.bias") {
                assert_eq!((lo, hi), (0.0, 0.0), "{name}");
            } else if name.ends_with("embeddings.weight") {
                let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
                assert!((std - 0.02).abs() < 0.001, "{name}: std {std}");
            } else if name.ends_with(".D") || name.ends_with(".D_b") || name.ends_with("norm.weight") {
                assert_eq!((lo, hi), (1.0, 1.0), "{name}");
            }
        }
    }
}

/// The names, outside layers 1.., that `pick` selects, with layer 0's path cut.
fn picked(cfg: &LmConfig, pick: fn(&Param) -> bool) -> BTreeSet<String> {
    let outside = |p: &&Param| p.name.starts_with("backbone.layers.0.") || !p.name.contains(".layers.");
    let cut = |p: &Param| p.name.trim_start_matches("backbone.layers.0.").to_string();
    MambaLm::params(cfg).iter().filter(outside).filter(|p| pick(p)).map(cut).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// mamba_ssm's recipe exempts A_log, D, the dt biases, norms and biases from weight decay; the
/// projections and embeddings are the matrices a bf16 model holds in bf16.
#[test]
fn the_groups_are_the_reference_recipes() {
    let cfg = config("mamba1", "routes = [\"forward\", \"reverse\"]\nroute_params = \"per_route\"\nproj_bias = true");
    let exempt = [
        "backbone.norm_f.weight",
        "norm.weight",
        "mixer.in_proj.bias",
        "mixer.out_proj.bias",
        "mixer.A_log",
        "mixer.A_b_log",
        "mixer.D",
        "mixer.D_b",
        "mixer.dt_proj.bias",
        "mixer.dt_proj_b.bias",
        "mixer.conv1d.bias",
        "mixer.conv1d_b.bias",
    ];
    assert_eq!(picked(&cfg, |p| !p.decay), names(&exempt));
    let matrices = [
        "backbone.embeddings.weight",
        "mixer.in_proj.weight",
        "mixer.out_proj.weight",
        "mixer.x_proj.weight",
        "mixer.x_proj_b.weight",
        "mixer.dt_proj.weight",
        "mixer.dt_proj_b.weight",
    ];
    assert_eq!(picked(&cfg, |p| p.matrix), names(&matrices));

    let text = "[model]\nvocab_size = 300\ntie_embeddings = false\n[backbone]\nkind = \"mamba2\"\nd_model = 64\nn_layer = 2\nd_state = 8\nheaddim = 16";
    let cfg = LmConfig::from_toml(text, "untied.toml").unwrap();
    let exempt = [
        "backbone.norm_f.weight",
        "norm.weight",
        "mixer.norm.weight",
        "mixer.A_log",
        "mixer.D",
        "mixer.dt_bias",
        "mixer.conv1d.bias",
    ];
    assert_eq!(picked(&cfg, |p| !p.decay), names(&exempt));
    let matrices = ["backbone.embeddings.weight", "lm_head.weight", "mixer.in_proj.weight", "mixer.out_proj.weight"];
    assert_eq!(picked(&cfg, |p| p.matrix), names(&matrices));
}

#[test]
fn seeds_repeat_and_differ() {
    let cfg = config("mamba2", "");
    let (a, b, c) = (
        init_params(&cfg, &InitConfig::default(), 3).unwrap(),
        init_params(&cfg, &InitConfig::default(), 3).unwrap(),
        init_params(&cfg, &InitConfig::default(), 4).unwrap(),
    );
    let name = "backbone.layers.1.mixer.in_proj.weight";
    assert_eq!(values(&a[name]), values(&b[name]));
    assert_ne!(values(&a[name]), values(&c[name]));
}

#[test]
fn a_fresh_model_gives_finite_logits_near_uniform() {
    for kind in ["mamba1", "mamba2"] {
        let cfg = config(kind, "");
        let vocab = cfg.vocab_size;
        let p = init_params(&cfg, &InitConfig::default(), 1).unwrap();
        let model = MambaLm::load(candle_nn::VarBuilder::from_tensors(p, DType::F32, &Device::Cpu), cfg).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 200, 7]], &Device::Cpu).unwrap();
        let (logits, _) = model.forward(&ids).unwrap();
        let v = values(&logits);
        assert!(v.iter().all(|x| x.is_finite()));
        // Small embeddings and a tied head: the loss of a fresh model is close to log(vocab).
        let (lo, hi) = range(&v);
        assert!(lo > -1.0 && hi < 1.0, "{kind}: logits in [{lo}, {hi}], vocab {vocab}");
    }
}
