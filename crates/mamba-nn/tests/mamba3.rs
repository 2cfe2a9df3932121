//! The Mamba-3 mixer against mamba_ssm's `Mamba3` module (tests/fixtures/mamba3/layer* for SISO,
//! mimo_layer* for MIMO of rank 4, made in float32 from the official code): the parallel
//! forward, token-by-token decoding from an empty state, and a prefill followed by decoding;
//! then decoding against the forward on configs the fixtures do not have.

use candle_core::{safetensors, DType, Device, Tensor};
use candle_nn::VarBuilder;
use mamba_nn::{init_tensors, InitConfig, Mamba3Config, Mamba3Mixer};
use mamba_ssm::Mamba3State;
use std::collections::HashMap;
use std::f64::consts::PI;

const CPU: Device = Device::Cpu;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!("{}/../../tests/fixtures/mamba3/{name}", env!("CARGO_MANIFEST_DIR"));
    safetensors::load(&path, &CPU).unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let max = |t: Tensor| t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    max((a - b).unwrap()) / max(b.clone()).max(1e-30)
}

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// Angles on the circle: the largest distance to the nearest multiple of 2 pi.
fn angle_err(got: &Tensor, want: &Tensor) -> f64 {
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    let turns = d.affine(0.5 / PI, 0.0).unwrap().round().unwrap();
    let d = (d - turns.affine(2.0 * PI, 0.0).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Our state against the module's cache `prefix.{angle,ssm,k,v}_state`; its k state is
/// (batch, rank, heads, state), ours (batch, heads, state) for SISO and (batch, heads, rank,
/// state) for MIMO.
#[track_caller]
fn states_close(what: &str, got: &Mamba3State, io: &HashMap<String, Tensor>, prefix: &str) {
    let want = |name: &str| &io[&format!("{prefix}.{name}_state")];
    close(&format!("{what} ssm"), &got.ssm, want("ssm"), 1e-4);
    let k = if got.k.rank() == 3 { want("k").squeeze(1) } else { want("k").transpose(1, 2) };
    close(&format!("{what} k"), &got.k, &k.unwrap(), 1e-4);
    close(&format!("{what} v"), &got.v, want("v"), 1e-4);
    let e = angle_err(&got.angle, want("angle"));
    assert!(e < 1e-4, "{what} angle: {e:.3e}");
}

/// The fixture layers: SISO and MIMO.
const LAYERS: [&str; 2] = ["layer", "mimo_layer"];

/// A fixture layer's constructor arguments (layer.json, mimo_layer.json).
fn fixture_config(layer: &str) -> Mamba3Config {
    let siso = Mamba3Config {
        d_model: 32,
        d_state: 16,
        expand: 2,
        headdim: 8,
        ngroups: 1,
        rope_fraction: 0.5,
        a_floor: 1e-4,
        chunk_size: 16,
        mimo_rank: None,
    };
    match layer {
        "layer" => siso,
        _ => Mamba3Config { d_state: 32, headdim: 32, mimo_rank: Some(4), ..siso },
    }
}

/// A fixture layer's mixer and its inputs and outputs.
fn fixture_mixer(layer: &str) -> (Mamba3Mixer, HashMap<String, Tensor>) {
    let tensors = fixture(&format!("{layer}.safetensors"));
    let mixer = Mamba3Mixer::load(VarBuilder::from_tensors(tensors, DType::F32, &CPU), &fixture_config(layer));
    (mixer.unwrap(), fixture(&format!("{layer}_io.safetensors")))
}

/// Each token of u (batch, len, d_model) through `step`, the outputs stacked.
fn decode(mixer: &Mamba3Mixer, u: &Tensor, state: &mut Mamba3State) -> Tensor {
    let ys: Vec<Tensor> = (0..u.dim(1).unwrap())
        .map(|t| mixer.step(&u.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), state).unwrap())
        .collect();
    Tensor::stack(&ys, 1).unwrap()
}

#[test]
fn the_forward_matches_mamba_ssm() {
    for layer in LAYERS {
        let (mixer, io) = fixture_mixer(layer);
        let (y, state) = mixer.forward(&io["u"]).unwrap();
        close(&format!("{layer} out"), &y, &io["out"], 1e-4);
        states_close(&format!("{layer} final"), &state, &io, "fwd_final");
    }
}

#[test]
fn decoding_token_by_token_matches_mamba_ssm() {
    for layer in LAYERS {
        let (mixer, io) = fixture_mixer(layer);
        let mut state = mixer.empty_state(2).unwrap();
        close(&format!("{layer} step out"), &decode(&mixer, &io["u"], &mut state), &io["step.out"], 1e-4);
        states_close(&format!("{layer} step final"), &state, &io, "step.final");
    }
}

#[test]
fn a_prefill_then_decoding_matches_mamba_ssm() {
    for layer in LAYERS {
        let (mixer, io) = fixture_mixer(layer);
        let u = &io["u"];
        let (prefill, mut state) = mixer.forward(&u.narrow(1, 0, 20).unwrap()).unwrap();
        close(&format!("{layer} prefill out"), &prefill, &io["mixed.prefill_out"], 1e-4);
        states_close(&format!("{layer} prefill cache"), &state, &io, "mixed.prefill_cache");
        let decoded = decode(&mixer, &u.narrow(1, 20, 17).unwrap(), &mut state);
        close(&format!("{layer} decode out"), &decoded, &io["mixed.decode_out"], 1e-4);
    }
}

/// Configs the fixtures do not have (grouped B and C, every pair rotating, a length that is
/// not a multiple of the chunk; SISO and MIMO of rank 3), freshly initialised: decoding equals
/// the parallel forward.
#[test]
fn decoding_equals_the_forward_on_an_unseen_config() {
    for mimo_rank in [None, Some(3)] {
        decoding_equals_the_forward(Mamba3Config {
            d_model: 24,
            d_state: 10,
            expand: 2,
            headdim: 6,
            ngroups: 2,
            rope_fraction: 1.0,
            a_floor: 1e-4,
            chunk_size: 8,
            mimo_rank,
        });
    }
}

fn decoding_equals_the_forward(cfg: Mamba3Config) {
    let tensors = init_tensors(&Mamba3Mixer::params(&cfg, 2), &InitConfig::default(), 3).unwrap();
    let mixer = Mamba3Mixer::load(VarBuilder::from_tensors(tensors, DType::F32, &CPU), &cfg).unwrap();
    let u = Tensor::randn(0f32, 1.0, (3, 21, 24), &CPU).unwrap();
    let (y, forward_state) = mixer.forward(&u).unwrap();
    let mut state = mixer.empty_state(3).unwrap();
    let stepped = decode(&mixer, &u, &mut state);
    close("decoded vs forward", &stepped, &y, 1e-5);
    close("ssm state", &state.ssm, &forward_state.ssm, 1e-5);
    assert!(angle_err(&state.angle, &forward_state.angle) < 1e-4);
}

#[test]
fn a_config_that_cannot_build_a_mixer_is_refused_by_key() {
    let good = fixture_config("layer");
    for (bad, key) in [
        (Mamba3Config { headdim: 7, ..good.clone() }, "`headdim`"),
        (Mamba3Config { ngroups: 3, ..good.clone() }, "`ngroups`"),
        (Mamba3Config { rope_fraction: 0.3, ..good.clone() }, "`rope_fraction`"),
        (Mamba3Config { d_state: 1, ..good.clone() }, "no pair to rotate"),
        (Mamba3Config { mimo_rank: Some(0), ..good.clone() }, "`mimo_rank`"),
        (Mamba3Config { mimo_rank: Some(2), d_state: 15, ..good.clone() }, "`d_state` must be even"),
    ] {
        let err = bad.validate().unwrap_err();
        assert!(err.contains(key), "{err}");
    }
    assert_eq!(good.validate(), Ok(()));
}
