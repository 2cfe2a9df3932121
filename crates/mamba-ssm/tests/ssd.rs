//! The SSD chunked scan (the CPU kernel, in chunks of 64 steps) against the same algorithm from
//! candle ops, its quadratic form, the step recurrence, the PyTorch fixtures and finite
//! differences, over lengths that are not multiples of the chunk size and groups > 1.

mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use mamba_ssm::{ssd_chunk_scan, ssd_chunk_scan_ref, ssd_quadratic, ssd_scan_ref, ScanOutput, SsdParams};

#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    len: usize,
    heads: usize,
    headdim: usize,
    groups: usize,
    state: usize,
    chunk: usize,
    /// 0: no D, 1: D per head, 2: D per (head, headdim).
    d: usize,
    z: bool,
    h0: bool,
    limit: (f64, f64),
}

const BASE: Case = Case {
    batch: 2,
    len: 29,
    heads: 4,
    headdim: 3,
    groups: 2,
    state: 5,
    chunk: 8,
    d: 1,
    z: true,
    h0: true,
    limit: (0.0, f64::INFINITY),
};

/// Leaves in a fixed order: x, dt, A, B, C, dt_bias, then D, z, h0 when present.
fn leaves(c: Case, seed: u64, dtype: DType) -> Vec<Var> {
    let Case { batch, len, heads, headdim, groups, state, .. } = c;
    let u = |shape: &[usize], s: u64, lo: f64, hi: f64| var(&uniform(shape, seed + s, lo, hi, dtype));
    let mut v = vec![
        u(&[batch, len, heads, headdim], 1, -1.0, 1.0),
        u(&[batch, len, heads], 2, -2.0, 1.0),
        u(&[heads], 3, -2.0, -0.2),
        u(&[batch, len, groups, state], 4, -1.0, 1.0),
        u(&[batch, len, groups, state], 5, -1.0, 1.0),
        u(&[heads], 6, -0.5, 0.5),
    ];
    match c.d {
        1 => v.push(u(&[heads], 7, -1.0, 1.0)),
        2 => v.push(u(&[heads, headdim], 7, -1.0, 1.0)),
        _ => {}
    }
    if c.z {
        v.push(u(&[batch, len, heads, headdim], 8, -2.0, 2.0));
    }
    if c.h0 {
        v.push(u(&[batch, heads, headdim, state], 9, -1.0, 1.0));
    }
    v
}

enum Form {
    /// The kernel.
    Chunked,
    /// The chunked algorithm from candle ops, in chunks of `Case::chunk`.
    Composed,
    /// The step recurrence.
    Reference,
}

fn scan(form: &Form, c: Case, t: &[Tensor]) -> ScanOutput {
    let mut rest = t[6..].iter();
    let d = (c.d > 0).then(|| rest.next().unwrap());
    let z = c.z.then(|| rest.next().unwrap());
    let h0 = c.h0.then(|| rest.next().unwrap());
    let p = SsdParams { d, z, dt_bias: Some(&t[5]), dt_softplus: true, dt_limit: c.limit };
    match form {
        Form::Chunked => ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], c.chunk, &p, h0).unwrap(),
        Form::Composed => ssd_chunk_scan_ref(&t[0], &t[1], &t[2], &t[3], &t[4], c.chunk, &p, h0).unwrap(),
        Form::Reference => ssd_scan_ref(&t[0], &t[1], &t[2], &t[3], &t[4], &p, h0).unwrap(),
    }
}

fn cotangents(c: Case, dtype: DType) -> (Tensor, Tensor) {
    (
        uniform(&[c.batch, c.len, c.heads, c.headdim], 90, -1.0, 1.0, dtype),
        uniform(&[c.batch, c.heads, c.headdim, c.state], 91, -1.0, 1.0, dtype),
    )
}

fn run(form: &Form, c: Case, t: &[Tensor], dtype: DType) -> (ScanOutput, Vec<Tensor>) {
    let out = scan(form, c, t);
    let (dy, dlast) = cotangents(c, dtype);
    let grads = (dot(&out.y, &dy) + dot(&out.last_state, &dlast)).unwrap().backward().unwrap();
    let g = t.iter().map(|v| grads.get(v).cloned().expect("every input gets a gradient")).collect();
    (out, g)
}

/// `form` in `dtype` against `reference` in f64 on the same values: in f32 each form rounds its
/// own way (a sum over the whole sequence reaches A's gradient), so each is held to the exact
/// result rather than to the other's rounding.
fn compare(form: Form, reference: Form, c: Case, dtype: DType, tol: f64) {
    let vars = leaves(c, 3, dtype);
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (out, g) = run(&form, c, &t, dtype);
    let wide: Vec<Tensor> = t.iter().map(|x| var(&x.to_dtype(DType::F64).unwrap()).as_tensor().clone()).collect();
    let (want, g_ref) = run(&reference, c, &wide, DType::F64);
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (out, g): (ScanOutput, Vec<Tensor>) =
        (ScanOutput { y: f64s(&out.y), last_state: f64s(&out.last_state) }, g.iter().map(f64s).collect());
    let at = format!("len {}, batch {}, groups {}", c.len, c.batch, c.groups);
    assert_close(&format!("y ({at})"), &out.y, &want.y, tol);
    assert_close(&format!("final state ({at})"), &out.last_state, &want.last_state, tol);
    for (i, (g, r)) in g.iter().zip(&g_ref).enumerate() {
        assert_close(&format!("gradient of input {i} ({at})"), g, r, tol);
    }
}

fn compare_chunked_with_reference(c: Case, dtype: DType, tol: f64) {
    compare(Form::Chunked, Form::Reference, c, dtype, tol);
}

/// Across the kernel's chunk boundaries (64 steps), with the composition in other chunkings.
#[test]
fn kernel_matches_candle_composition() {
    for len in [1, 63, 64, 65, 150] {
        for c in [Case { len, ..BASE }, Case { len, groups: 1, d: 2, h0: false, chunk: 64, ..BASE }] {
            compare(Form::Chunked, Form::Composed, c, DType::F32, 1e-5);
        }
    }
    compare(Form::Chunked, Form::Composed, Case { len: 129, batch: 3, ..BASE }, DType::F64, 1e-11);
    compare(Form::Composed, Form::Reference, Case { len: 70, ..BASE }, DType::F64, 1e-11);
}

#[test]
fn chunked_matches_step_recurrence() {
    compare_chunked_with_reference(BASE, DType::F32, 1e-5);
    compare_chunked_with_reference(BASE, DType::F64, 1e-11);
}

#[test]
fn odd_shapes() {
    let cases = [
        Case { len: 1, ..BASE },
        Case { len: 24, ..BASE },
        Case { len: 65, ..BASE },
        Case { len: 200, batch: 1, groups: 1, ..BASE },
        Case { chunk: 5, ..BASE },
        Case { chunk: 64, ..BASE },
        Case { chunk: 1, len: 6, ..BASE },
        Case { groups: 1, batch: 1, ..BASE },
        Case { groups: 4, d: 2, ..BASE },
        Case { d: 0, z: false, h0: false, ..BASE },
        Case { limit: (0.05, 0.7), ..BASE },
    ];
    for c in cases {
        compare_chunked_with_reference(c, DType::F32, 1e-5);
    }
}

#[test]
fn chunked_quadratic_and_recurrent_forms_agree() {
    let c = Case { h0: false, ..BASE };
    for chunk in [1, 4, 8, 29, 100] {
        let t: Vec<Tensor> = leaves(c, 5, DType::F64).iter().map(|v| v.as_tensor().clone()).collect();
        let c = Case { chunk, ..c };
        let chunked = scan(&Form::Composed, c, &t);
        let recurrent = scan(&Form::Reference, c, &t);
        let p =
            SsdParams { d: Some(&t[6]), z: Some(&t[7]), dt_bias: Some(&t[5]), dt_softplus: true, ..Default::default() };
        let quadratic = ssd_quadratic(&t[0], &t[1], &t[2], &t[3], &t[4], &p).unwrap();
        assert_close("chunked vs quadratic", &chunked.y, &quadratic, 1e-12);
        assert_close("chunked vs recurrent", &chunked.y, &recurrent.y, 1e-12);
    }
}

#[test]
fn non_contiguous_inputs() {
    let c = Case { h0: false, z: false, ..BASE };
    let t: Vec<Tensor> = leaves(c, 8, DType::F32).iter().map(|v| v.as_tensor().clone()).collect();
    // x stored as (batch, heads, len, headdim) and viewed as (batch, len, heads, headdim).
    let x = t[0].transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    let p = SsdParams { d: Some(&t[6]), dt_bias: Some(&t[5]), dt_softplus: true, ..Default::default() };
    let got = ssd_chunk_scan(&x, &t[1], &t[2], &t[3], &t[4], 8, &p, None).unwrap();
    let want = ssd_scan_ref(&t[0], &t[1], &t[2], &t[3], &t[4], &p, None).unwrap();
    assert_close("y", &got.y, &want.y, 1e-5);
}

#[test]
fn matches_pytorch_fixture() {
    let fx = fixture("ssd_scan.safetensors");
    for (suffix, dtype, tol) in [("", DType::F32, 1e-4), ("_f64", DType::F64, 1e-10)] {
        let names = ["x", "dt", "A", "B", "C", "D", "dt_bias"];
        let vars: Vec<Var> = names.iter().map(|k| var(&fx[&format!("in.{k}")].to_dtype(dtype).unwrap())).collect();
        let t = |i: usize| vars[i].as_tensor();
        let p = SsdParams { d: Some(t(5)), dt_bias: Some(t(6)), dt_softplus: true, ..Default::default() };
        for chunk in [8, 5, 64] {
            let out = ssd_chunk_scan(t(0), t(1), t(2), t(3), t(4), chunk, &p, None).unwrap();
            assert_close(&format!("y{suffix} chunk {chunk}"), &out.y, &fx[&format!("y{suffix}")], tol);
            assert_close(&format!("state{suffix}"), &out.last_state, &fx[&format!("last_state{suffix}")], tol);
            let grads = dot(&out.y, &fx["dout"].to_dtype(dtype).unwrap()).backward().unwrap();
            for (k, v) in names.iter().zip(&vars) {
                assert_close(
                    &format!("d{k}{suffix} chunk {chunk}"),
                    grads.get(v.as_tensor()).unwrap(),
                    &fx[&format!("grad_{k}{suffix}")],
                    tol,
                );
            }
        }
    }
}

#[test]
fn finite_differences_f64() {
    let c = Case {
        batch: 1,
        len: 70,
        heads: 2,
        headdim: 2,
        groups: 1,
        state: 3,
        chunk: 3,
        d: 2,
        z: true,
        h0: true,
        limit: (0.0, f64::INFINITY),
    };
    let t: Vec<Tensor> = leaves(c, 21, DType::F64).iter().map(|v| v.as_tensor().clone()).collect();
    let (_, grads) = run(&Form::Chunked, c, &t, DType::F64);
    let (dy, dlast) = cotangents(c, DType::F64);
    let loss = |args: &[Tensor]| {
        let out = scan(&Form::Chunked, c, args);
        (dot(&out.y, &dy) + dot(&out.last_state, &dlast)).unwrap().to_scalar::<f64>().unwrap()
    };
    for (i, grad) in grads.iter().enumerate() {
        check_finite_differences(&format!("input {i}"), &t, i, grad, &loss);
    }
}

#[test]
fn bad_shapes_are_named() {
    let t: Vec<Tensor> = leaves(BASE, 1, DType::F32).iter().map(|v| v.as_tensor().clone()).collect();
    let p = SsdParams::default();
    let err = |r: mamba_ssm::Result<ScanOutput>| r.err().expect("expected an error").to_string();
    let msg = err(ssd_chunk_scan(&t[0], &t[1].narrow(1, 0, 3).unwrap(), &t[2], &t[3], &t[4], 8, &p, None));
    assert!(msg.contains("`dt`") && msg.contains("(batch, len, heads) = (2, 29, 4)"), "{msg}");
    let b3 = Tensor::zeros((2, 29, 3, 5), DType::F32, &CPU).unwrap();
    let msg = err(ssd_chunk_scan(&t[0], &t[1], &t[2], &b3, &b3, 8, &p, None));
    assert!(msg.contains("groups (3) must divide heads (4)"), "{msg}");
    let msg = err(ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], 0, &p, None));
    assert!(msg.contains("chunk_size"), "{msg}");
    let h0 = Tensor::zeros((2, 4, 3), DType::F32, &CPU).unwrap();
    let msg = err(ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], 8, &p, Some(&h0)));
    assert!(msg.contains("`initial_states`") && msg.contains("(batch, heads, headdim, state)"), "{msg}");
    let d = Tensor::zeros((4, 2), DType::F32, &CPU).unwrap();
    let msg = err(ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], 8, &SsdParams { d: Some(&d), ..p }, None));
    assert!(msg.contains("`D`") && msg.contains("(heads, headdim) = (4, 3)"), "{msg}");
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    let c = Case { h0: false, z: false, d: 0, ..BASE };
    let t: Vec<Tensor> = leaves(c, 4, DType::F32).iter().map(|v| v.as_tensor().clone()).collect();
    fn p(t: &[Tensor]) -> SsdParams<'_> {
        SsdParams { dt_bias: Some(&t[5]), dt_softplus: true, ..Default::default() }
    }
    for dt in [DType::BF16, DType::F16] {
        let low: Vec<Tensor> = t.iter().map(|x| x.to_dtype(dt).unwrap()).collect();
        let back: Vec<Tensor> = low.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
        let out = ssd_chunk_scan(&low[0], &low[1], &low[2], &low[3], &low[4], 8, &p(&low), None).unwrap();
        assert_eq!((out.y.dtype(), out.last_state.dtype()), (dt, dt));
        let want = ssd_scan_ref(&back[0], &back[1], &back[2], &back[3], &back[4], &p(&back), None).unwrap();
        assert_close("y", &out.y.to_dtype(DType::F32).unwrap(), &want.y, 1e-2);
    }
}

#[test]
fn empty_batch_does_not_panic() {
    let t: Vec<Tensor> =
        leaves(Case { batch: 0, ..BASE }, 1, DType::F32).iter().map(|v| v.as_tensor().clone()).collect();
    let out = ssd_chunk_scan(&t[0], &t[1], &t[2], &t[3], &t[4], 8, &SsdParams::default(), None).unwrap();
    assert_eq!(out.y.dims(), &[0, 29, 4, 3]);
}
