//! The fused Mamba-2 route against its composition (the conv op, the SSD's candle-ops form and
//! the gate) and f64 finite differences: forward and every gradient, over lengths across the
//! SSD's 64-step chunks, batch > 1, groups, with and without the conv bias, dt limits and the
//! gated RMSNorm.

mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use mamba_ssm::{mamba2_inner, mamba2_inner_ref, Mamba2Output, Mamba2Weights};

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    len: usize,
    heads: usize,
    headdim: usize,
    groups: usize,
    state: usize,
    k: usize,
    conv_bias: bool,
    dt_limit: (f64, f64),
    norm: bool,
}

const BASE: Case = Case {
    batch: 2,
    len: 37,
    heads: 4,
    headdim: 3,
    groups: 2,
    state: 5,
    k: 4,
    conv_bias: true,
    dt_limit: (0.0, f64::INFINITY),
    norm: true,
};

/// zxbcdt, then conv weight, conv bias?, dt_bias, A_log, D, norm weight?.
fn inputs(c: Case, seed: u64, dtype: DType) -> Vec<Tensor> {
    let (di, bc) = (c.heads * c.headdim, c.groups * c.state);
    let conv_dim = di + 2 * bc;
    let mut v = vec![
        uniform(&[c.batch, c.len, di + conv_dim + c.heads], seed, -1.0, 1.0, dtype),
        uniform(&[conv_dim, 1, c.k], seed + 1, -0.6, 0.6, dtype),
    ];
    if c.conv_bias {
        v.push(uniform(&[conv_dim], seed + 2, -0.3, 0.3, dtype));
    }
    v.extend([
        uniform(&[c.heads], seed + 3, -2.0, 0.0, dtype),
        uniform(&[c.heads], seed + 4, -1.0, 1.0, dtype),
        uniform(&[c.heads], seed + 5, -1.0, 1.0, dtype),
    ]);
    if c.norm {
        v.push(uniform(&[di], seed + 6, 0.5, 1.5, dtype));
    }
    v
}

type Route = fn(&Tensor, &Mamba2Weights, Option<&[u32]>) -> mamba_ssm::Result<Mamba2Output>;

/// The routes of a case: none (identity), reverse, and a class token at position len / 2
/// visited first, then the even positions and then the odd ones.
fn routes(len: usize) -> Vec<Option<Vec<u32>>> {
    let mid = len as u32 / 2;
    let rest = (0..len as u32).step_by(2).chain((1..len as u32).step_by(2)).filter(|&p| p != mid);
    vec![None, Some((0..len as u32).rev().collect()), Some(std::iter::once(mid).chain(rest).collect())]
}

fn call(f: Route, c: Case, t: &[Tensor]) -> Mamba2Output {
    call_route(f, c, t, None)
}

fn call_route(f: Route, c: Case, t: &[Tensor], order: Option<&[u32]>) -> Mamba2Output {
    let (bias, rest) = if c.conv_bias { (Some(&t[2]), &t[3..]) } else { (None, &t[2..]) };
    let w = Mamba2Weights {
        conv_weight: &t[1],
        conv_bias: bias,
        dt_bias: &rest[0],
        a_log: &rest[1],
        d: &rest[2],
        headdim: c.headdim,
        groups: c.groups,
        state: c.state,
        dt_limit: c.dt_limit,
        norm: c.norm.then(|| (&rest[3], 1e-5)),
    };
    f(&t[0], &w, order).unwrap()
}

/// A loss that weighs y and the last state.
fn loss(out: &Mamba2Output, seed: u64) -> Tensor {
    let w = |t: &Tensor, s: u64| uniform(t.dims(), seed + s, -1.0, 1.0, t.dtype());
    (dot(&out.y, &w(&out.y, 0)) + dot(&out.last_state, &w(&out.last_state, 1))).unwrap()
}

/// The fused op in `dtype` against the composition in f64 on the same values: in f32 the two
/// round differently (softplus and its derivative, sums over every step), so each is held to
/// the exact result rather than to the other's rounding.
fn compare(c: Case, dtype: DType, tol: f64) {
    compare_route(c, None, dtype, tol);
}

fn compare_route(c: Case, order: Option<&[u32]>, dtype: DType, tol: f64) {
    let t = inputs(c, 11, dtype);
    let run = |f: Route, dtype: DType| {
        let vars: Vec<Var> = t.iter().map(|x| var(&x.to_dtype(dtype).unwrap())).collect();
        let tv: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = call_route(f, c, &tv, order);
        let g = loss(&out, 50).backward().unwrap();
        let grads: Vec<Tensor> = tv.iter().map(|v| g.get(v).unwrap().to_dtype(DType::F64).unwrap()).collect();
        (out.y.to_dtype(DType::F64).unwrap(), out.last_state.to_dtype(DType::F64).unwrap(), grads)
    };
    let (y, last, grads) = run(mamba2_inner, dtype);
    let (y_ref, last_ref, grads_ref) = run(mamba2_inner_ref, DType::F64);
    let at = format!("{c:?}, route {order:?}");
    assert_close(&format!("y ({at})"), &y, &y_ref, tol);
    assert_close(&format!("last state ({at})"), &last, &last_ref, tol);
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        assert_close(&format!("gradient of input {i} ({at})"), g, r, tol);
    }
}

#[test]
fn fused_matches_composition() {
    for len in [1, 2, 37, 64, 65, 130] {
        compare(Case { len, ..BASE }, DType::F32, 1e-5);
    }
    compare(Case { groups: 1, conv_bias: false, batch: 3, ..BASE }, DType::F32, 1e-5);
    compare(Case { norm: false, ..BASE }, DType::F32, 1e-5);
    compare(Case { norm: false, groups: 1, len: 65, ..BASE }, DType::F32, 1e-5);
    compare(Case { dt_limit: (0.05, 0.6), k: 2, ..BASE }, DType::F32, 1e-5);
    compare(Case { len: 100, ..BASE }, DType::F64, 1e-11);
}

#[test]
fn every_route_kind() {
    for len in [1, 37, 70] {
        for order in routes(len) {
            compare_route(Case { len, ..BASE }, order.as_deref(), DType::F32, 1e-5);
        }
    }
}

#[test]
fn finite_differences_f64() {
    let c = Case { batch: 2, len: 70, heads: 2, headdim: 2, groups: 1, state: 3, ..BASE };
    let t = inputs(c, 23, DType::F64);
    let vars: Vec<Var> = t.iter().map(var).collect();
    let tv: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&call(mamba2_inner, c, &tv), 60).backward().unwrap();
    let f = |args: &[Tensor]| loss(&call(mamba2_inner, c, args), 60).to_scalar::<f64>().unwrap();
    for (i, v) in tv.iter().enumerate() {
        check_finite_differences(&format!("input {i}"), &t, i, grads.get(v).unwrap(), &f);
    }
}

#[test]
fn bad_shapes_are_named() {
    let t = inputs(BASE, 1, DType::F32);
    let narrow = t[0].narrow(2, 0, 10).unwrap();
    let mut bad = t.clone();
    bad[0] = narrow;
    let w = Mamba2Weights {
        conv_weight: &bad[1],
        conv_bias: Some(&bad[2]),
        dt_bias: &bad[3],
        a_log: &bad[4],
        d: &bad[5],
        headdim: 3,
        groups: 2,
        state: 5,
        dt_limit: (0.0, f64::INFINITY),
        norm: None,
    };
    let msg = mamba2_inner(&bad[0], &w, None).err().expect("a narrow input is an error").to_string();
    assert!(msg.contains("zxbcdt"), "{msg}");
    let w = Mamba2Weights { conv_weight: &t[1], conv_bias: Some(&t[2]), dt_bias: &t[3], a_log: &t[4], d: &t[5], ..w };
    let msg = mamba2_inner(&t[0], &w, Some(&[0, 0, 1])).err().expect("not a permutation").to_string();
    assert!(msg.contains("order"), "{msg}");
}

/// A second backward pass over the same graph finds nothing kept and recomputes the SSD: the
/// same gradients.
#[test]
fn second_backward_recomputes() {
    let vars: Vec<Var> = inputs(Case { len: 70, ..BASE }, 31, DType::F32).iter().map(var).collect();
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let order: Vec<u32> = (0..70).rev().collect();
    let l = loss(&call_route(mamba2_inner, Case { len: 70, ..BASE }, &t, Some(&order)), 70);
    let (first, second) = (l.backward().unwrap(), l.backward().unwrap());
    for (i, v) in t.iter().enumerate() {
        assert_close(&format!("gradient of input {i}"), second.get(v).unwrap(), first.get(v).unwrap(), 0.0);
    }
}
