//! MambaLm against transformers on the fixtures (logits, prompt cache, cached greedy decoding),
//! parallel forward against step-by-step decoding for other configurations, and checkpoint errors.

use candle_core::{safetensors, DType, Device, IndexOp, Tensor, D};
use mamba_nn::{
    BackboneConfig, LmConfig, Mamba1Config, Mamba2Config, Mamba3Config, MambaLm, Merge, MixerCache, MixerConfig, Route,
    RouteParams,
};
use std::collections::HashMap;
use std::path::PathBuf;

const CPU: Device = Device::Cpu;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn check_against_transformers(name: &str) {
    let model = MambaLm::load_hf(&fixtures().join(name), DType::F32, &CPU).unwrap();
    let io = safetensors::load(fixtures().join(format!("{name}_io.safetensors")), &CPU).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let (logits, mut caches) = model.forward(&ids).unwrap();
    let e = max_abs(&logits, &io["logits"]);
    assert!(e <= 1e-4, "{name} logits: max abs error {e}");
    for (i, c) in caches.iter().enumerate() {
        let MixerCache::Conv(c) = c else { panic!("{name}: layer {i} has no conv cache") };
        assert!(max_abs(&c.conv, &io[&format!("prompt_cache.conv_state.{i}")]) <= 1e-5, "{name} conv cache {i}");
        assert!(max_abs(&c.ssm, &io[&format!("prompt_cache.ssm_state.{i}")]) <= 1e-4, "{name} ssm cache {i}");
    }
    let want: Vec<i64> = io["decode.new_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let mut next = logits.i((.., logits.dim(1).unwrap() - 1)).unwrap().argmax(D::Minus1).unwrap();
    for (k, &id) in want.iter().enumerate() {
        assert_eq!(next.to_vec1::<u32>().unwrap(), vec![id as u32], "{name}: greedy token {k}");
        let step = model.step(&next, &mut caches).unwrap();
        let e = max_abs(&step, &io["decode.step_logits"].i((.., k)).unwrap());
        assert!(e <= 1e-4, "{name} step {k}: max abs error {e}");
        next = step.argmax(D::Minus1).unwrap();
    }
}

#[test]
fn mamba_matches_transformers() {
    check_against_transformers("mamba_tiny");
}

#[test]
fn mamba2_matches_transformers() {
    check_against_transformers("mamba2_tiny");
}

/// Seeded random tensors for every checkpoint tensor of `config` (A_log > 0 so that
/// A = -exp(A_log) < -1).
fn random_tensors(config: &LmConfig, seed: u64) -> HashMap<String, Tensor> {
    // A linear congruential generator: reproducible values in [-0.5, 0.5).
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut tensors = HashMap::new();
    for mamba_nn::Param { name, shape, .. } in MambaLm::params(config) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| if name.ends_with("A_log") { next() + 0.6 } else { next() }).collect();
        tensors.insert(name, Tensor::from_vec(v, shape, &CPU).unwrap());
    }
    tensors
}

fn random_model(config: LmConfig, seed: u64) -> MambaLm {
    let tensors = random_tensors(&config, seed);
    MambaLm::load(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &CPU), config).unwrap()
}

/// Layer 0's mixer of `config` from `tensors` over x: its forward output, and whether a step fails.
fn mixer_forward(config: &LmConfig, tensors: &HashMap<String, Tensor>, x: &Tensor) -> (Tensor, bool) {
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &CPU).pp("backbone.layers.0.mixer");
    let token = x.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let b = &config.backbone;
    let m = b.mixer.spec().load(vb, b, Route::by_names(&b.routes).unwrap()).unwrap();
    let step_fails = m.step(&token, &mut m.empty_cache(x.dim(0).unwrap()).unwrap()).is_err();
    (m.forward(x).unwrap().0, step_fails)
}

#[test]
fn bidirectional_mixer_equals_both_directions_computed_directly() {
    let x = Tensor::from_vec((0..2 * 9 * 24).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect(), (2, 9, 24), &CPU)
        .unwrap();
    let flip = |t: &Tensor| mamba_nn::gather(t, &Route::reverse().order(9).unwrap()).unwrap();
    for kind in ["mamba1", "mamba2", "mamba3"] {
        // Mamba-2 and Mamba-3: 6 heads in 2 groups, a chunk shorter than the sequence.
        let causal = config(kind, 2, 4);
        // Mamba-3 shares every tensor between routes.
        let own = causal.backbone.mixer.spec().routes_own_params();
        let per_route = [(RouteParams::PerRoute, Merge::Mean)].into_iter().filter(|_| own);
        for (params, merge) in per_route.chain([(RouteParams::Shared, Merge::Sum)]) {
            let mut bidir = causal.clone();
            bidir.backbone.routes = vec!["forward".into(), "reverse".into()];
            (bidir.backbone.route_params, bidir.backbone.merge) = (params, merge);
            let tensors = random_tensors(&bidir, 5);
            let (y, step_fails) = mixer_forward(&bidir, &tensors, &x);
            assert!(step_fails, "{kind:?}: a bidirectional mixer cannot step");
            // The backward direction on its own: a causal mixer over the reversed sequence, with the
            // second route's parameters (Vim's `_b` names) under the plain names when they are its own.
            let mut back = tensors.clone();
            if params == RouteParams::PerRoute {
                for (k, v) in &tensors {
                    let plain = k
                        .replace("_b.", ".")
                        .replace("A_b_log", "A_log")
                        .replace("D_b", "D")
                        .replace("dt_bias_b", "dt_bias");
                    if plain != *k {
                        back.insert(plain, v.clone());
                    }
                }
            }
            let (y_f, _) = mixer_forward(&causal, &tensors, &x);
            let (y_b, _) = mixer_forward(&causal, &back, &flip(&x));
            let mut want = (y_f + flip(&y_b)).unwrap();
            if merge == Merge::Mean {
                want = (want / 2.0).unwrap();
            }
            let e = max_abs(&y, &want);
            assert!(e <= 1e-5, "{kind:?} {params:?} {merge:?}: max abs error {e}");
        }
    }
}

fn config(kind: &str, ngroups: usize, chunk_size: usize) -> LmConfig {
    let mixer = match kind {
        "mamba1" => MixerConfig::Mamba1(Mamba1Config { dt_rank: Some(2), ..Default::default() }),
        "mamba2" => MixerConfig::Mamba2(Mamba2Config { headdim: 8, ngroups, chunk_size, ..Default::default() }),
        _ => MixerConfig::Mamba3(Mamba3Config { headdim: 8, ngroups, chunk_size, ..Default::default() }),
    };
    LmConfig { backbone: BackboneConfig::causal(24, 2, 6, mixer), vocab_size: 11, tie_embeddings: kind == "mamba1" }
}

/// The parallel forward and token-by-token steps from an empty cache give the same logits and
/// the same final caches.
fn check_parallel_equals_steps(model: &MambaLm, batch: usize, len: usize) {
    let ids: Vec<u32> = (0..batch * len).map(|i| (i * 7 % 11) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, len), &CPU).unwrap();
    let (logits, caches) = model.forward(&ids).unwrap();
    let mut step_caches = model.empty_caches(batch).unwrap();
    for t in 0..len {
        let step = model.step(&ids.i((.., t)).unwrap(), &mut step_caches).unwrap();
        let e = max_abs(&step, &logits.i((.., t)).unwrap());
        assert!(e <= 1e-4, "len {len} step {t}: max abs error {e}");
    }
    for (a, b) in caches.iter().zip(&step_caches) {
        match (a, b) {
            (MixerCache::Conv(a), MixerCache::Conv(b)) => {
                assert!(max_abs(&a.conv, &b.conv) <= 1e-6 && max_abs(&a.ssm, &b.ssm) <= 1e-4, "final cache, len {len}")
            }
            (MixerCache::Mamba3(a), MixerCache::Mamba3(b)) => {
                assert!(max_abs(&a.ssm, &b.ssm) <= 1e-4 && max_abs(&a.k, &b.k) <= 1e-5, "final state, len {len}")
            }
            _ => panic!("len {len}: caches of two kinds"),
        }
    }
}

#[test]
fn parallel_forward_equals_step_decoding() {
    let m1 = random_model(config("mamba1", 1, 8), 1);
    // ngroups 2 (6 heads of 8), lengths shorter than the conv, not a multiple of the chunk.
    let m2 = random_model(config("mamba2", 2, 8), 2);
    // The time-invariant ablation: dt, B and C from parameters, not from the input.
    let mut lti = config("mamba1", 1, 8);
    let MixerConfig::Mamba1(m) = &mut lti.backbone.mixer else { unreachable!() };
    m.selective = false;
    let m3 = random_model(lti, 3);
    // Mamba-3: 6 heads in 2 groups, one rotating pair of its 6 state dims.
    let m4 = random_model(config("mamba3", 2, 8), 4);
    for model in [&m1, &m2, &m3, &m4] {
        for (batch, len) in [(1, 1), (2, 3), (2, 13), (1, 16)] {
            check_parallel_equals_steps(model, batch, len);
        }
    }
}

#[test]
fn checkpoint_problems_are_listed_together() {
    let dir = std::env::temp_dir().join(format!("mamba-nn-bad-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("mamba_tiny/config.json"), dir.join("config.json")).unwrap();
    let mut t = safetensors::load(fixtures().join("mamba_tiny/model.safetensors"), &CPU).unwrap();
    t.remove("backbone.layers.1.mixer.D");
    t.insert("backbone.layers.0.mixer.A_log".into(), Tensor::zeros((8, 64), DType::F32, &CPU).unwrap());
    t.insert("backbone.layers.0.mixer.extra".into(), Tensor::zeros(3, DType::F32, &CPU).unwrap());
    safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let msg = MambaLm::load_hf(&dir, DType::F32, &CPU).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    for part in [
        "missing backbone.layers.1.mixer.D",
        "backbone.layers.0.mixer.A_log: shape [8, 64], expected [64, 8]",
        "unexpected backbone.layers.0.mixer.extra",
    ] {
        assert!(msg.contains(part), "{part} not in: {msg}");
    }
}

/// The fixture's Mamba-1 model rewritten in the original state-spaces layout (config with
/// d_model / n_layer / ssm_cfg, `backbone.embedding.weight`) loads to the same logits.
#[test]
fn state_spaces_layout_loads() {
    let dir = std::env::temp_dir().join(format!("mamba-nn-state-spaces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = r#"{"d_model": 32, "n_layer": 2, "vocab_size": 60, "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"d_state": 8, "dt_rank": 2}, "rms_norm": true, "residual_in_fp32": true,
        "fused_add_norm": true, "tie_embeddings": true}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut t = safetensors::load(fixtures().join("mamba_tiny/model.safetensors"), &CPU).unwrap();
    let emb = t.remove("backbone.embeddings.weight").unwrap();
    t.insert("backbone.embedding.weight".into(), emb);
    safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let model = MambaLm::load_hf(&dir, DType::F32, &CPU);
    std::fs::remove_dir_all(&dir).unwrap();
    let model = model.unwrap();
    assert_eq!(model.config.vocab_size, 64, "60 padded to a multiple of 16");
    let io = safetensors::load(fixtures().join("mamba_tiny_io.safetensors"), &CPU).unwrap();
    let (logits, _) = model.forward(&io["input_ids"].to_dtype(DType::U32).unwrap()).unwrap();
    assert!(max_abs(&logits, &io["logits"]) <= 1e-4);
}

/// Saving in the Hugging Face layout and loading again gives the same model, for both kinds.
#[test]
fn save_then_load_round_trips() {
    for name in ["mamba_tiny", "mamba2_tiny"] {
        let src = fixtures().join(name);
        let config = LmConfig::from_hf_file(&src.join("config.json")).unwrap();
        let tensors = safetensors::load(src.join("model.safetensors"), &CPU).unwrap();
        let dir = std::env::temp_dir().join(format!("mamba-nn-save-{name}-{}", std::process::id()));
        mamba_nn::save_hf(&dir, &config, &tensors).unwrap();
        let reloaded = MambaLm::load_hf(&dir, DType::F32, &CPU);
        let saved_config = LmConfig::from_hf_file(&dir.join("config.json"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(saved_config.unwrap(), config, "{name}");
        let io = safetensors::load(fixtures().join(format!("{name}_io.safetensors")), &CPU).unwrap();
        let (logits, _) = reloaded.unwrap().forward(&io["input_ids"].to_dtype(DType::U32).unwrap()).unwrap();
        assert!(max_abs(&logits, &io["logits"]) <= 1e-4, "{name}");
    }
    // A checkpoint that does not fit is refused before anything is written.
    let config = LmConfig::from_hf_file(&fixtures().join("mamba_tiny/config.json")).unwrap();
    let dir = std::env::temp_dir().join(format!("mamba-nn-save-bad-{}", std::process::id()));
    assert!(mamba_nn::save_hf(&dir, &config, &HashMap::new()).is_err());
    assert!(!dir.exists());
}

/// With bf16 (or f16) matrices, the model computes exactly what an f32 model computes with those
/// matrices rounded, stays near transformers' f32 logits, and its steps follow its forward.
#[test]
fn half_precision_weights_compute_the_rounded_f32_model() {
    for name in ["mamba_tiny", "mamba2_tiny"] {
        let dir = fixtures().join(name);
        let io = safetensors::load(fixtures().join(format!("{name}_io.safetensors")), &CPU).unwrap();
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let half = MambaLm::load_hf(&dir, dtype, &CPU).unwrap();
            let mut rounded = safetensors::load(dir.join("model.safetensors"), &CPU).unwrap();
            for (name, t) in rounded.iter_mut() {
                if name.contains("proj") || name.contains("embeddings") || name == "lm_head.weight" {
                    *t = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                }
            }
            let reference =
                MambaLm::load(candle_nn::VarBuilder::from_tensors(rounded, DType::F32, &CPU), half.config.clone())
                    .unwrap();
            let (got, _) = half.forward(&ids).unwrap();
            let (want, _) = reference.forward(&ids).unwrap();
            let e = max_abs(&got, &want);
            assert!(e <= 1e-4, "{name} {dtype:?}: max abs error {e} vs the rounded f32 model");
            // bf16 keeps 8 bits of mantissa: about 0.4 % per weight.
            let scale = io["logits"].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let e = max_abs(&got, &io["logits"]) / scale;
            assert!(e <= 1e-2, "{name} {dtype:?}: max error {e} of the largest logit vs transformers (f32)");
            let (last, _) = half.prefill(&ids).unwrap();
            let len = ids.dim(1).unwrap();
            assert!(max_abs(&last, &got.i((.., len - 1)).unwrap()) <= 1e-6, "{name}: prefill = last row");
            check_parallel_equals_steps(&half, 2, 5);
        }
    }
}
