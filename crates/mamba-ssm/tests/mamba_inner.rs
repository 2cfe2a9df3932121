//! The fused Mamba-1 route against its unfused composition (candle ops with the plain-loop conv
//! and scan references) and f64 finite differences: forward and every gradient, over odd
//! lengths, batch > 1 and every kind of route (identity, reverse, a permutation that puts a
//! class token first).

mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use mamba_ssm::{mamba_inner, mamba_inner_ref, InnerOutput, InnerWeights};

/// Sizes of one case.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    len: usize,
    di: usize,
    k: usize,
    r: usize,
    n: usize,
    conv_bias: bool,
}

const BASE: Case = Case { batch: 2, len: 37, di: 19, k: 4, r: 3, n: 5, conv_bias: true };

/// The routes of a case: none (identity), reverse, and a class token at position len / 2
/// visited first, then the even positions and then the odd ones.
fn routes(len: usize) -> Vec<(&'static str, Option<Vec<u32>>)> {
    let mid = len as u32 / 2;
    let rest = (0..len as u32).step_by(2).chain((1..len as u32).step_by(2)).filter(|&p| p != mid);
    let class_first = std::iter::once(mid).chain(rest).collect();
    vec![
        ("identity", None),
        ("reverse", Some((0..len as u32).rev().collect())),
        ("class token first", Some(class_first)),
    ]
}

/// xz and the weights, in the order: xz, conv weight, conv bias?, x_proj, dt_proj, dt_bias,
/// A_log, D.
fn inputs(c: Case, seed: u64, dtype: DType) -> Vec<(&'static str, Tensor)> {
    let Case { batch, len, di, k, r, n, .. } = c;
    let mut v = vec![
        ("xz", uniform(&[batch, len, 2 * di], seed, -1.0, 1.0, dtype)),
        ("conv weight", uniform(&[di, 1, k], seed + 1, -0.6, 0.6, dtype)),
    ];
    if c.conv_bias {
        v.push(("conv bias", uniform(&[di], seed + 2, -0.3, 0.3, dtype)));
    }
    v.extend([
        ("x_proj", uniform(&[r + 2 * n, di], seed + 3, -0.4, 0.4, dtype)),
        ("dt_proj", uniform(&[di, r], seed + 4, -0.5, 0.5, dtype)),
        ("dt_bias", uniform(&[di], seed + 5, -2.0, 0.0, dtype)),
        ("A_log", uniform(&[di, n], seed + 6, -1.0, 1.0, dtype)),
        ("D", uniform(&[di], seed + 7, -1.0, 1.0, dtype)),
    ]);
    v
}

type Route = fn(&Tensor, &InnerWeights, Option<&[u32]>) -> mamba_ssm::Result<InnerOutput>;

fn call(f: Route, c: Case, t: &[Tensor], order: Option<&[u32]>) -> InnerOutput {
    let (bias, rest) = if c.conv_bias { (Some(&t[2]), &t[3..]) } else { (None, &t[2..]) };
    let w = InnerWeights {
        conv_weight: &t[1],
        conv_bias: bias,
        x_proj: &rest[0],
        dt_proj: &rest[1],
        dt_bias: &rest[2],
        a_log: &rest[3],
        d: &rest[4],
    };
    f(&t[0], &w, order).unwrap()
}

/// A loss that weighs every output: y, the last state and the conv state.
fn loss(out: &InnerOutput, seed: u64) -> Tensor {
    let w = |t: &Tensor, s: u64| uniform(t.dims(), seed + s, -1.0, 1.0, t.dtype());
    let parts = [&out.y, &out.last_state, &out.conv_state];
    let mut total = dot(parts[0], &w(parts[0], 0));
    for (i, p) in parts.iter().enumerate().skip(1) {
        total = (total + dot(p, &w(p, i as u64))).unwrap();
    }
    total
}

/// Forward outputs and every input's gradient, for one route function.
fn run(f: Route, c: Case, inp: &[(&str, Tensor)], order: Option<&[u32]>) -> (InnerOutput, Vec<Tensor>) {
    let vars: Vec<Var> = inp.iter().map(|(_, t)| var(t)).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = call(f, c, &ts, order);
    let grads = loss(&out, 100).backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).expect("every input has a gradient").clone()).collect();
    (out, g)
}

fn compare(c: Case, dtype: DType, tol: f64) {
    let inp = inputs(c, 11, dtype);
    for (route, order) in routes(c.len) {
        let order = order.as_deref();
        let (got, g_got) = run(mamba_inner, c, &inp, order);
        let (want, g_want) = run(mamba_inner_ref, c, &inp, order);
        let at = |what: &str| format!("{what} ({route}, {c:?})");
        assert_close(&at("y"), &got.y, &want.y, tol);
        assert_close(&at("last state"), &got.last_state, &want.last_state, tol);
        assert_close(&at("conv state"), &got.conv_state, &want.conv_state, tol);
        for ((name, _), (a, b)) in inp.iter().zip(g_got.iter().zip(&g_want)) {
            assert_close(&at(&format!("d {name}")), a, b, tol);
        }
    }
}

#[test]
fn fused_route_equals_the_composition_f32() {
    compare(BASE, DType::F32, 1e-5);
}

#[test]
fn odd_shapes_f64() {
    // Length 1, a length shorter than the conv, one longer than the scan's chunk and tile (32,
    // 256) and not a multiple of them, no conv bias, more channels than one block of lanes (32).
    // A single batch row (fewer rows than threads) runs the kernels' composition instead.
    for c in [
        Case { len: 1, ..BASE },
        Case { len: 3, batch: 1, conv_bias: false, ..BASE },
        Case { len: 300, batch: 3, di: 40, r: 2, n: 4, ..BASE },
        Case { len: 5, k: 1, ..BASE },
    ] {
        compare(c, DType::F64, 1e-10);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let c = Case { batch: 2, len: 9, di: 6, k: 3, r: 2, n: 3, conv_bias: true };
    let inp = inputs(c, 5, DType::F64);
    let ts: Vec<Tensor> = inp.iter().map(|(_, t)| t.clone()).collect();
    for (route, order) in routes(c.len) {
        let order = order.as_deref();
        let (_, grads) = run(mamba_inner, c, &inp, order);
        let f = |args: &[Tensor]| loss(&call(mamba_inner, c, args, order), 100).to_scalar::<f64>().unwrap();
        for (i, (name, _)) in inp.iter().enumerate() {
            check_finite_differences(&format!("{name} ({route})"), &ts, i, &grads[i], &f);
        }
    }
}

#[test]
fn bad_inputs_are_named() {
    let c = Case { len: 6, di: 4, ..BASE };
    let t: Vec<Tensor> = inputs(c, 1, DType::F32).into_iter().map(|(_, t)| t).collect();
    let mut odd = t.clone();
    odd[0] = uniform(&[2, 6, 7], 1, -1.0, 1.0, DType::F32);
    let err = |t: &[Tensor], order: Option<&[u32]>| {
        let w = InnerWeights {
            conv_weight: &t[1],
            conv_bias: Some(&t[2]),
            x_proj: &t[3],
            dt_proj: &t[4],
            dt_bias: &t[5],
            a_log: &t[6],
            d: &t[7],
        };
        mamba_inner(&t[0], &w, order).unwrap_err().to_string()
    };
    assert!(err(&odd, None).contains("xz"));
    let mut bad_proj = t.clone();
    bad_proj[3] = uniform(&[5, 4], 1, -1.0, 1.0, DType::F32);
    assert!(err(&bad_proj, None).contains("x_proj"));
    assert!(err(&t, Some(&[0, 1, 2, 3, 4, 4])).contains("permutation"));
    assert!(err(&t, Some(&[0, 1, 2])).contains("permutation"));
}
