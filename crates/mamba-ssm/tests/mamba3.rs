//! Mamba-3's scan against mamba_ssm's own references (tests/fixtures/mamba3, made from the
//! official code in float64): outputs, final states and gradients, for grouped queries and keys,
//! no D and z, and a scan that continues from given states; and MIMO (rank 4) against the
//! reference as mamba_ssm's MIMO layer rotates.

mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use mamba_ssm::{
    mamba3_chunk_scan, mamba3_chunk_scan_ref, mamba3_scan_ref, Mamba3Inputs, Mamba3Output, Mamba3State, Mimo,
};
use std::collections::HashMap;

const INPUTS: [&str; 11] = ["Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z"];
const STATES: [&str; 4] = ["Input_Angle_State", "Input_SSM_State", "Input_K_State", "Input_V_State"];
/// MIMO's weights of the values, gates and outputs.
const MIMO: [&str; 3] = ["MIMO_V", "MIMO_Z", "MIMO_O"];

/// The case's inputs (as f64 leaves), in the order of `INPUTS` then `STATES`, those it has.
fn leaves(fx: &HashMap<String, Tensor>, case: &str) -> Vec<(&'static str, Var)> {
    INPUTS
        .iter()
        .chain(&STATES)
        .filter_map(|name| {
            let t = fx.get(&format!("{case}.in.{name}"))?;
            Some((*name, var(&t.to_dtype(DType::F64).unwrap())))
        })
        .collect()
}

/// A scan: the step reference, or the chunked form at some chunk size.
type Scan<'a> = &'a dyn Fn(&Mamba3Inputs, Option<&Mamba3State>) -> Mamba3Output;

fn step_by_step(x: &Mamba3Inputs, initial: Option<&Mamba3State>) -> Mamba3Output {
    mamba3_scan_ref(x, initial).unwrap()
}

fn in_chunks(chunk: usize) -> impl Fn(&Mamba3Inputs, Option<&Mamba3State>) -> Mamba3Output {
    move |x, initial| mamba3_chunk_scan_ref(x, chunk, initial).unwrap()
}

/// The chunked form on SSD's CPU kernel (chunks of 64 steps), with its hand-written backward.
fn on_the_kernel(x: &Mamba3Inputs, initial: Option<&Mamba3State>) -> Mamba3Output {
    mamba3_chunk_scan(x, 64, initial).unwrap()
}

fn scan(leaves: &[(&str, Var)], scan: Scan) -> Mamba3Output {
    let get = |name: &str| leaves.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_tensor());
    let x = Mamba3Inputs {
        q: get("Q").unwrap(),
        k: get("K").unwrap(),
        v: get("V").unwrap(),
        adt: get("ADT").unwrap(),
        dt: get("DT").unwrap(),
        trap: get("Trap").unwrap(),
        q_bias: get("Q_bias").unwrap(),
        k_bias: get("K_bias").unwrap(),
        angles: get("Angles").unwrap(),
        d: get("D"),
        z: get("Z"),
        mimo: get("MIMO_V").map(|x| Mimo { x, z: get("MIMO_Z").unwrap(), o: get("MIMO_O") }),
    };
    let initial = get("Input_SSM_State").map(|ssm| Mamba3State {
        angle: get("Input_Angle_State").unwrap().clone(),
        ssm: ssm.clone(),
        k: get("Input_K_State").unwrap().clone(),
        v: get("Input_V_State").unwrap().clone(),
    });
    scan(&x, initial.as_ref())
}

/// Angles compared on the circle: the distance to the nearest multiple of 2 pi.
fn angle_err(got: &Tensor, want: &Tensor) -> f64 {
    let d = (got - want).unwrap();
    let turns = d.affine(0.5 / std::f64::consts::PI, 0.0).unwrap().round().unwrap();
    let d = (d - turns.affine(2.0 * std::f64::consts::PI, 0.0).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Each scan against the fixture's three cases, to `tol` relative.
fn matches_fixture(scan_with: Scan, tol: f64) {
    let fx = fixture("mamba3/siso_op.safetensors");
    for case in ["gqa", "nodz", "init"] {
        let leaves = leaves(&fx, case);
        let want = |name: &str| &fx[&format!("{case}.{name}")];
        let out = scan(&leaves, scan_with);
        assert_close(&format!("{case} y"), &out.y, want("out"), tol);
        assert_close(&format!("{case} ssm state"), &out.state.ssm, want("final.ssm_state"), tol);
        assert_close(&format!("{case} k state"), &out.state.k, want("final.k_state"), tol);
        assert_close(&format!("{case} v state"), &out.state.v, want("final.v_state"), tol);
        let e = angle_err(&out.state.angle, want("final.angle_state"));
        assert!(e < tol, "{case} angle state: {e:.3e}");
        let grads = dot(&out.y, want("W")).backward().unwrap();
        for (name, leaf) in &leaves {
            let g = grads.get(leaf.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            // The fixture's gradients of the input states went through a float32 cast.
            let tol = if name.starts_with("Input_") { tol.max(1e-6) } else { tol };
            assert_close(&format!("{case} d{name}"), g, want(&format!("grad.{name}")), tol);
        }
    }
}

#[test]
fn the_step_reference_matches_mamba_ssm_outputs_states_and_gradients() {
    matches_fixture(&step_by_step, 1e-10);
}

#[test]
fn the_chunked_form_matches_mamba_ssm_at_any_chunk_size() {
    // 37 tokens: chunks of 1, of sizes that do not divide it, of 16 (the fixture's), and one
    // chunk longer than the sequence.
    for chunk in [1, 5, 16, 64] {
        matches_fixture(&in_chunks(chunk), 1e-10);
    }
    matches_fixture(&on_the_kernel, 1e-10);
}

/// MIMO against the fixture's "halved" reference (the rotation of mamba_ssm's MIMO layer and
/// kernel, pairs (i, i + state / 2)): outputs, final states and every gradient.
fn mimo_matches_fixture(scan_with: Scan, tol: f64) {
    let fx = fixture("mamba3/mimo_op.safetensors");
    let leaves: Vec<(&str, Var)> =
        INPUTS.iter().chain(&MIMO).map(|n| (*n, var(&fx[&format!("in.{n}")].to_dtype(DType::F64).unwrap()))).collect();
    let want = |name: &str| &fx[&format!("halved.{name}")];
    let out = scan(&leaves, scan_with);
    assert_close("y", &out.y, want("out"), tol);
    assert_close("ssm state", &out.state.ssm, want("final.ssm_state"), tol);
    assert_close("k state", &out.state.k, want("final.k_state"), tol);
    // The reference keeps the last token's values per rank; the state keeps its x.
    let mimo_v = leaves.iter().find(|(n, _)| *n == "MIMO_V").unwrap().1.as_tensor();
    let v_per_rank = out.state.v.unsqueeze(2).unwrap().broadcast_mul(mimo_v).unwrap();
    assert_close("v state", &v_per_rank, want("final.v_state"), tol);
    let e = angle_err(&out.state.angle, want("final.angle_state"));
    assert!(e < tol, "angle state: {e:.3e}");
    let grads = dot(&out.y, &fx["W"]).backward().unwrap();
    for (name, leaf) in &leaves {
        let g = grads.get(leaf.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(&format!("d{name}"), g, want(&format!("grad.{name}")), tol);
    }
}

#[test]
fn mimo_matches_mamba_ssm_step_by_step_and_in_chunks() {
    mimo_matches_fixture(&step_by_step, 1e-10);
    for chunk in [1, 5, 16, 64] {
        mimo_matches_fixture(&in_chunks(chunk), 1e-10);
    }
    mimo_matches_fixture(&on_the_kernel, 1e-10);
}

/// Inputs of a shape the fixtures do not have, seeded; with initial states when `states`, and
/// MIMO of that rank when `rank` is given.
fn random_leaves(
    (batch, len, heads, headdim, groups, state, angles): (usize, usize, usize, usize, usize, usize, usize),
    states: bool,
    rank: Option<usize>,
    seed: u64,
) -> Vec<(&'static str, Var)> {
    let u = |shape: &[usize], s: u64, lo: f64, hi: f64| var(&uniform(shape, seed * 100 + s, lo, hi, DType::F64));
    let ranked = |mut shape: Vec<usize>, at: usize| {
        if let Some(r) = rank {
            shape.insert(at, r);
        }
        shape
    };
    let (qk, bias) = (ranked(vec![batch, len, groups, state], 2), ranked(vec![heads, state], 1));
    let mut v = vec![
        ("Q", u(&qk, 1, -1.0, 1.0)),
        ("K", u(&qk, 2, -1.0, 1.0)),
        ("V", u(&[batch, len, heads, headdim], 3, -1.0, 1.0)),
        ("ADT", u(&[batch, heads, len], 4, -1.5, -0.01)),
        ("DT", u(&[batch, heads, len], 5, 0.01, 1.0)),
        ("Trap", u(&[batch, heads, len], 6, -3.0, 3.0)),
        ("Q_bias", u(&bias, 7, -0.5, 0.5)),
        ("K_bias", u(&bias, 8, -0.5, 0.5)),
        ("Angles", u(&[batch, len, heads, angles], 9, -2.0, 2.0)),
        ("D", u(&[heads], 10, -1.0, 1.0)),
        ("Z", u(&[batch, len, heads, headdim], 11, -2.0, 2.0)),
    ];
    if states {
        v.extend([
            ("Input_Angle_State", u(&[batch, heads, angles], 12, 0.0, 6.0)),
            ("Input_SSM_State", u(&[batch, heads, headdim, state], 13, -1.0, 1.0)),
            ("Input_K_State", u(&ranked(vec![batch, heads, state], 2), 14, -1.0, 1.0)),
            ("Input_V_State", u(&[batch, heads, headdim], 15, -1.0, 1.0)),
        ]);
    }
    if let Some(r) = rank {
        for (i, name) in MIMO.into_iter().enumerate() {
            v.push((name, u(&[heads, r, headdim], 16 + i as u64, -1.0, 1.0)));
        }
    }
    v
}

/// The chunked form, from candle ops and on the kernel, equals the step reference, outputs,
/// states and every gradient, over lengths 1 and not multiples of the chunk (the kernel's 64
/// steps too), grouped keys, a partial rotation and batch 3, SISO and MIMO of rank 3.
#[test]
fn the_chunked_form_equals_the_step_reference_on_unseen_shapes() {
    let cases = [(0, 1, None), (1, 2, None), (2, 23, None), (5, 150, None), (3, 1, Some(3)), (4, 23, Some(3))];
    let forms: [(&str, Scan); 2] = [("chunks of 8", &in_chunks(8)), ("kernel", &on_the_kernel)];
    for ((i, len, rank), states, (form, scan_with)) in
        cases.into_iter().flat_map(|c| [false, true].map(|s| (c, s))).flat_map(|(c, s)| forms.map(|f| (c, s, f)))
    {
        {
            let leaves = random_leaves((3, len, 6, 5, 3, 12, 3), states, rank, i * 2 + states as u64);
            let w = uniform(&[3, len, 6, 5], 99, -1.0, 1.0, DType::F64);
            let want = scan(&leaves, &step_by_step);
            let got = scan(&leaves, scan_with);
            let what = format!("{form}: len {len}, states {states}, rank {rank:?}");
            assert_close(&format!("{what}: y"), &got.y, &want.y, 1e-12);
            assert_close(&format!("{what}: ssm"), &got.state.ssm, &want.state.ssm, 1e-12);
            assert_close(&format!("{what}: k"), &got.state.k, &want.state.k, 1e-12);
            assert_close(&format!("{what}: v"), &got.state.v, &want.state.v, 1e-12);
            assert!(angle_err(&got.state.angle, &want.state.angle) < 1e-12, "{what}: angle");
            let (gw, gg) = (dot(&want.y, &w).backward().unwrap(), dot(&got.y, &w).backward().unwrap());
            for (name, leaf) in &leaves {
                let g = |grads: &candle_core::backprop::GradStore| grads.get(leaf.as_tensor()).unwrap().clone();
                // Against the scale of the inputs, not the gradient's own: with one token and no
                // state, q . k does not depend on the shared rotation, and dAngles is rounding.
                let (got, want) = (g(&gg), g(&gw));
                let e = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
                assert!(e / scale < 1e-11, "{what}: d{name}: error {e:.3e}");
            }
        }
    }
}

/// Scanning a sequence in two parts, the second from the first's state, equals scanning it
/// whole: what decoding after a prompt relies on.
#[test]
fn a_scan_continued_from_its_state_equals_the_whole_scan() {
    for rank in [None, Some(2)] {
        continue_scan(random_leaves((2, 19, 4, 3, 2, 8, 4), false, rank, 7));
    }
}

fn continue_scan(leaves: Vec<(&'static str, Var)>) {
    let whole = scan(&leaves, &in_chunks(4));
    let part = |from: usize, n: usize| -> Vec<(&'static str, Var)> {
        leaves
            .iter()
            .map(|(name, v)| {
                let t = v.as_tensor();
                let time_dim = match *name {
                    "ADT" | "DT" | "Trap" => Some(2),
                    "Q_bias" | "K_bias" | "D" | "MIMO_V" | "MIMO_Z" | "MIMO_O" => None,
                    _ => Some(1),
                };
                (*name, var(&time_dim.map_or(t.clone(), |d| t.narrow(d, from, n).unwrap())))
            })
            .collect()
    };
    let first = scan(&part(0, 12), &in_chunks(4));
    let second_leaves = part(12, 7);
    let get = |name: &str| second_leaves.iter().find(|(n, _)| *n == name).unwrap().1.as_tensor().clone();
    let mut x = Mamba3Inputs {
        q: &get("Q"),
        k: &get("K"),
        v: &get("V"),
        adt: &get("ADT"),
        dt: &get("DT"),
        trap: &get("Trap"),
        q_bias: &get("Q_bias"),
        k_bias: &get("K_bias"),
        angles: &get("Angles"),
        d: Some(&get("D")),
        z: Some(&get("Z")),
        mimo: None,
    };
    let (mx, mz, mo);
    if second_leaves.iter().any(|(n, _)| *n == "MIMO_V") {
        (mx, mz, mo) = (get("MIMO_V"), get("MIMO_Z"), get("MIMO_O"));
        x.mimo = Some(Mimo { x: &mx, z: &mz, o: Some(&mo) });
    }
    for (what, second) in [
        ("chunked", mamba3_chunk_scan_ref(&x, 4, Some(&first.state)).unwrap()),
        ("kernel", mamba3_chunk_scan(&x, 4, Some(&first.state)).unwrap()),
        ("step", mamba3_scan_ref(&x, Some(&first.state)).unwrap()),
    ] {
        let y = Tensor::cat(&[&first.y, &second.y], 1).unwrap();
        assert_close(&format!("{what}: y"), &y, &whole.y, 1e-12);
        assert_close(&format!("{what}: ssm"), &second.state.ssm, &whole.state.ssm, 1e-12);
    }
}

/// MIMO without output weights keeps each rank's output (with its D skip and gate): weighted by
/// mimo_o and summed over the ranks, they are the scan's output with the weights, in both forms.
#[test]
fn mimo_without_output_weights_gives_each_ranks_output() {
    let leaves = random_leaves((2, 11, 4, 3, 2, 6, 2), true, Some(3), 21);
    let o = leaves.iter().find(|(n, _)| *n == "MIMO_O").unwrap().1.as_tensor().clone();
    let per_rank: Vec<_> = leaves.iter().filter(|(n, _)| *n != "MIMO_O").cloned().collect();
    for (what, form) in [("step", &step_by_step as Scan), ("chunked", &in_chunks(4))] {
        let ranks = scan(&per_rank, form).y;
        assert_eq!(ranks.dims(), &[2, 11, 3, 4, 3], "{what}");
        let summed = ranks.broadcast_mul(&o.transpose(0, 1).unwrap()).unwrap().sum(2).unwrap();
        assert_close(&format!("{what}: y"), &summed, &scan(&leaves, form).y, 1e-12);
    }
}

/// In f32, the chunked form stays within 1e-5 of the float64 reference.
#[test]
fn the_chunked_form_in_f32_is_close_to_the_f64_reference() {
    let leaves = random_leaves((2, 45, 4, 8, 2, 16, 8), true, None, 11);
    let want = scan(&leaves, &step_by_step);
    let f32_leaves: Vec<_> =
        leaves.iter().map(|(n, v)| (*n, var(&v.as_tensor().to_dtype(DType::F32).unwrap()))).collect();
    for (form, scan_with) in [("chunks of 16", &in_chunks(16) as Scan), ("kernel", &on_the_kernel)] {
        let got = scan(&f32_leaves, scan_with);
        assert_eq!(got.y.dtype(), DType::F32);
        assert_close(&format!("{form}: y"), &got.y, &want.y, 1e-5);
        assert_close(&format!("{form}: ssm"), &got.state.ssm, &want.state.ssm, 1e-5);
    }
}

/// The step reference's gradient agrees with central differences, which need no fixture.
#[test]
fn the_reference_gradients_agree_with_finite_differences() {
    for rank in [None, Some(2)] {
        gradients_agree_with_finite_differences(random_leaves((1, 6, 2, 2, 1, 4, 2), true, rank, 5));
    }
}

fn gradients_agree_with_finite_differences(leaves: Vec<(&'static str, Var)>) {
    let w = uniform(&[1, 6, 2, 2], 98, -1.0, 1.0, DType::F64);
    let grads = dot(&scan(&leaves, &step_by_step).y, &w).backward().unwrap();
    let inputs: Vec<Tensor> = leaves.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    for (i, (name, leaf)) in leaves.iter().enumerate() {
        let loss = |args: &[Tensor]| {
            let l: Vec<_> = leaves.iter().zip(args).map(|((n, _), t)| (*n, var(t))).collect();
            dot(&scan(&l, &step_by_step).y, &w).to_scalar::<f64>().unwrap()
        };
        check_finite_differences(name, &inputs, i, grads.get(leaf.as_tensor()).unwrap(), &loss);
    }
}
