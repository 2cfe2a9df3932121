//! The selective scan kernel against the PyTorch fixtures, the candle-ops reference loop and
//! finite differences, forward and gradients, over odd shapes.

mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use mamba_ssm::{selective_scan, selective_scan_ref, set_cpu_isa, CpuIsa, Error, ScanOutput, ScanParams};

/// Inputs of one test case: which optional parts are present, and the sizes.
#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    dim: usize,
    len: usize,
    state: usize,
    groups: usize,
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
    h0: bool,
    /// u and delta as transposed views of (batch, len, dim) storage.
    transposed: bool,
}

const BASE: Case = Case {
    batch: 2,
    dim: 19,
    len: 37,
    state: 5,
    groups: 1,
    d: true,
    z: true,
    bias: true,
    softplus: true,
    h0: true,
    transposed: false,
};

struct Inputs {
    vars: Vec<(&'static str, Var)>,
    dy: Tensor,
    dlast: Tensor,
}

fn inputs(c: Case, seed: u64, dtype: DType) -> Inputs {
    let Case { batch, dim, len, state, groups, .. } = c;
    let seq = |s: u64, lo: f64, hi: f64| {
        if c.transposed {
            uniform(&[batch, len, dim], seed + s, lo, hi, dtype).transpose(1, 2).unwrap()
        } else {
            uniform(&[batch, dim, len], seed + s, lo, hi, dtype)
        }
    };
    let bc = if groups == 1 { vec![batch, state, len] } else { vec![batch, groups, state, len] };
    let mut vars = vec![
        ("u", Var::from_tensor(&seq(1, -1.0, 1.0)).unwrap()),
        // Without softplus delta is the step size itself and must be positive.
        ("delta", Var::from_tensor(&if c.softplus { seq(2, -2.0, 1.0) } else { seq(2, 0.01, 0.6) }).unwrap()),
        ("A", var(&uniform(&[dim, state], seed + 3, -2.0, -0.1, dtype))),
        ("B", var(&uniform(&bc, seed + 4, -1.0, 1.0, dtype))),
        ("C", var(&uniform(&bc, seed + 5, -1.0, 1.0, dtype))),
    ];
    if c.d {
        vars.push(("D", var(&uniform(&[dim], seed + 6, -1.0, 1.0, dtype))));
    }
    if c.z {
        vars.push(("z", var(&uniform(&[batch, dim, len], seed + 7, -2.0, 2.0, dtype))));
    }
    if c.bias {
        vars.push(("delta_bias", var(&uniform(&[dim], seed + 8, -0.5, 0.5, dtype))));
    }
    if c.h0 {
        vars.push(("initial_state", var(&uniform(&[batch, dim, state], seed + 9, -1.0, 1.0, dtype))));
    }
    let dy = uniform(&[batch, dim, len], seed + 10, -1.0, 1.0, dtype);
    let dlast = uniform(&[batch, dim, state], seed + 11, -1.0, 1.0, dtype);
    Inputs { vars, dy, dlast }
}

type ScanFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &ScanParams,
    Option<&Tensor>,
) -> mamba_ssm::Result<mamba_ssm::ScanOutput>;

/// Runs `scan` on `tensors`, the inputs in the order of `inp.vars`.
fn call(scan: ScanFn, c: Case, inp: &Inputs, tensors: &[Tensor]) -> ScanOutput {
    let get = |name: &str| inp.vars.iter().position(|(n, _)| *n == name).map(|i| &tensors[i]);
    let p = ScanParams { d: get("D"), z: get("z"), delta_bias: get("delta_bias"), delta_softplus: c.softplus };
    let required = |name: &str| get(name).unwrap();
    scan(required("u"), required("delta"), required("A"), required("B"), required("C"), &p, get("initial_state"))
        .unwrap()
}

/// Runs `scan`; returns y, last state, and the gradient of sum(y dy) + sum(last dlast) for
/// every input.
fn run(scan: ScanFn, c: Case, inp: &Inputs, tensors: &[Tensor]) -> (Tensor, Tensor, Vec<Option<Tensor>>) {
    let out = call(scan, c, inp, tensors);
    let loss = (dot(&out.y, &inp.dy) + dot(&out.last_state, &inp.dlast)).unwrap();
    let grads = loss.backward().unwrap();
    let g = tensors.iter().map(|t| grads.get(t).cloned()).collect();
    (out.y, out.last_state, g)
}

fn tensors(inp: &Inputs) -> Vec<Tensor> {
    inp.vars.iter().map(|(_, v)| v.as_tensor().clone()).collect()
}

fn compare_with_reference(c: Case, tol: f64, dtype: DType) {
    let inp = inputs(c, 7, dtype);
    let ts = tensors(&inp);
    let (y, last, grads) = run(selective_scan, c, &inp, &ts);
    let (y_ref, last_ref, grads_ref) = run(selective_scan_ref, c, &inp, &ts);
    assert_close("y", &y, &y_ref, tol);
    assert_close("last state", &last, &last_ref, tol);
    for ((name, _), (g, r)) in inp.vars.iter().zip(grads.iter().zip(&grads_ref)) {
        let (g, r) = (g.as_ref().unwrap_or_else(|| panic!("no gradient for {name}")), r.as_ref().unwrap());
        assert_close(&format!("d{name}"), g, r, tol);
    }
}

#[test]
fn matches_reference_loop_forward_and_gradients() {
    compare_with_reference(BASE, 1e-5, DType::F32);
    compare_with_reference(BASE, 1e-11, DType::F64);
}

#[test]
fn odd_shapes() {
    let cases = [
        Case { len: 1, ..BASE },
        Case { len: 32, ..BASE },
        Case { len: 33, batch: 1, ..BASE },
        Case { len: 70, batch: 3, dim: 40, ..BASE },
        Case { dim: 1, state: 1, ..BASE },
        Case { dim: 36, groups: 3, ..BASE },
        Case { dim: 64, groups: 2, state: 16, ..BASE },
        Case { transposed: true, ..BASE },
        Case { len: 300, dim: 17, state: 3, batch: 1, ..BASE },
    ];
    for c in cases {
        compare_with_reference(c, 1e-5, DType::F32);
    }
}

/// Each instruction-set path of the kernels (plain, AVX2 + FMA, AVX-512, whichever this CPU has)
/// against the reference, in f32 (the paths differ in rounding only). The cap is process-wide:
/// the other tests of this binary may run on any of the paths meanwhile, and all of them pass.
#[test]
fn every_instruction_set_matches_the_reference() {
    let isas = [CpuIsa::Plain, CpuIsa::Avx2, CpuIsa::Avx512];
    for isa in isas.into_iter().filter(|&i| i <= CpuIsa::detect()) {
        assert_eq!(set_cpu_isa(isa), isa);
        for c in [BASE, Case { len: 70, batch: 3, dim: 40, ..BASE }, Case { dim: 64, groups: 2, state: 16, ..BASE }] {
            compare_with_reference(c, 1e-5, DType::F32);
        }
    }
    set_cpu_isa(CpuIsa::Avx512);
}

#[test]
fn every_optional_part_off() {
    let bare = Case { d: false, z: false, bias: false, softplus: false, h0: false, ..BASE };
    compare_with_reference(bare, 1e-5, DType::F32);
    compare_with_reference(Case { softplus: true, ..bare }, 1e-5, DType::F32);
    compare_with_reference(Case { bias: true, h0: true, ..bare }, 1e-5, DType::F32);
}

#[test]
fn softplus_threshold_branch() {
    // delta + bias above 20 takes torch's identity branch of softplus.
    let c = Case { dim: 3, len: 5, ..BASE };
    let inp = inputs(c, 3, DType::F64);
    let mut ts = tensors(&inp);
    ts[1] = var(&(&ts[1] + 25.0).unwrap()).as_tensor().clone();
    ts[2] = var(&(&ts[2] * 0.01).unwrap()).as_tensor().clone();
    let (y, _, g) = run(selective_scan, c, &inp, &ts);
    let (y_ref, _, g_ref) = run(selective_scan_ref, c, &inp, &ts);
    assert_close("y", &y, &y_ref, 1e-9);
    assert_close("ddelta", g[1].as_ref().unwrap(), g_ref[1].as_ref().unwrap(), 1e-8);
}

/// The fixtures were made with PyTorch autograd on `selective_scan_ref`.
#[test]
fn matches_pytorch_fixture() {
    let fx = fixture("selective_scan.safetensors");
    for (variant, suffix, tol) in
        [("full", "", 1e-4), ("plain", "", 1e-4), ("full", "_f64", 1e-10), ("plain", "_f64", 1e-10)]
    {
        let dtype = if suffix.is_empty() { DType::F32 } else { DType::F64 };
        let full = variant == "full";
        let input = |k: &str| Var::from_tensor(&fx[&format!("in.{k}")].to_dtype(dtype).unwrap()).unwrap();
        let mut names = vec!["u", if full { "delta" } else { "delta_pos" }, "A", "B", "C"];
        if full {
            names.extend(["D", "z", "delta_bias"]);
        }
        let vars: Vec<Var> = names.iter().map(|k| input(k)).collect();
        let t = |i: usize| vars[i].as_tensor();
        let p = if full {
            ScanParams { d: Some(t(5)), z: Some(t(6)), delta_bias: Some(t(7)), delta_softplus: true }
        } else {
            ScanParams::default()
        };
        let out = selective_scan(t(0), t(1), t(2), t(3), t(4), &p, None).unwrap();
        let want = |k: &str| fx[&format!("{variant}.{k}{suffix}")].clone();
        assert_close(&format!("{variant}{suffix} y"), &out.y, &want("y"), tol);
        assert_close(&format!("{variant}{suffix} last state"), &out.last_state, &want("last_state"), tol);
        let grads = dot(&out.y, &fx["dout"].to_dtype(dtype).unwrap()).backward().unwrap();
        for (k, v) in names.iter().zip(&vars) {
            assert_close(
                &format!("{variant}{suffix} d{k}"),
                grads.get(v.as_tensor()).unwrap(),
                &want(&format!("grad_{k}")),
                tol,
            );
        }
    }
}

#[test]
fn finite_differences_f64() {
    let c = Case { batch: 2, dim: 3, len: 6, state: 2, groups: 1, ..BASE };
    let inp = inputs(c, 11, DType::F64);
    let ts = tensors(&inp);
    let (_, _, grads) = run(selective_scan, c, &inp, &ts);
    let loss = |args: &[Tensor]| {
        let ScanOutput { y, last_state: last } = call(selective_scan, c, &inp, args);
        (dot(&y, &inp.dy) + dot(&last, &inp.dlast)).unwrap().to_scalar::<f64>().unwrap()
    };
    for (i, (name, _)) in inp.vars.iter().enumerate() {
        check_finite_differences(name, &ts, i, grads[i].as_ref().unwrap(), &loss);
    }
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    let c = Case { dim: 16, len: 40, ..BASE };
    let inp = inputs(c, 5, DType::F32);
    let ts = tensors(&inp);
    let y32 = call(selective_scan, c, &inp, &ts).y;
    for dt in [DType::BF16, DType::F16] {
        let low: Vec<Tensor> = ts.iter().map(|t| t.to_dtype(dt).unwrap()).collect();
        let back: Vec<Tensor> = low.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
        let ScanOutput { y, last_state: last } = call(selective_scan, c, &inp, &low);
        assert_eq!((y.dtype(), last.dtype()), (dt, dt));
        // Same inputs after rounding, computed in f32: only the output rounding differs.
        let y_rounded_inputs = call(selective_scan, c, &inp, &back).y;
        assert_close("y", &y.to_dtype(DType::F32).unwrap(), &y_rounded_inputs, 1e-2);
        assert!(rel_err(&y.to_dtype(DType::F32).unwrap(), &y32) < 0.1);
    }
}

#[test]
fn bad_shapes_and_dtypes_are_named() {
    let c = Case { dim: 4, len: 6, ..BASE };
    let inp = inputs(c, 1, DType::F32);
    let ts = tensors(&inp);
    let (u, delta, a, b, cc) = (&ts[0], &ts[1], &ts[2], &ts[3], &ts[4]);
    let p = ScanParams::default();
    let err = |r: mamba_ssm::Result<mamba_ssm::ScanOutput>| r.err().expect("expected an error").to_string();
    let bad_delta = delta.narrow(2, 0, 5).unwrap();
    let msg = err(selective_scan(u, &bad_delta, a, b, cc, &p, None));
    assert!(
        msg.contains("`delta`") && msg.contains("(batch, dim, len) = (2, 4, 6)") && msg.contains("[2, 4, 5]"),
        "{msg}"
    );
    let msg = err(selective_scan(u, delta, &a.t().unwrap(), b, cc, &p, None));
    assert!(msg.contains("`A`") && msg.contains("(dim, state)"), "{msg}");
    let msg = err(selective_scan(u, delta, a, b, &cc.narrow(1, 0, 2).unwrap(), &p, None));
    assert!(msg.contains("`C`"), "{msg}");
    let grouped = b.reshape((2, 1, 5, 6)).unwrap().repeat((1, 3, 1, 1)).unwrap();
    let msg = err(selective_scan(u, delta, a, &grouped, &grouped, &p, None));
    assert!(msg.contains("groups (3) must divide dim (4)"), "{msg}");
    let msg = err(selective_scan(&u.to_dtype(DType::U32).unwrap(), delta, a, b, cc, &p, None));
    assert!(msg.contains("`u`") && msg.contains("U32"), "{msg}");
    let d = Tensor::zeros(5, DType::F32, &CPU).unwrap();
    let msg = err(selective_scan(u, delta, a, b, cc, &ScanParams { d: Some(&d), ..p }, None));
    assert!(msg.contains("`D`") && msg.contains("(dim) = (4)"), "{msg}");
    let h0 = Tensor::zeros((2, 4), DType::F32, &CPU).unwrap();
    let msg = err(selective_scan(u, delta, a, b, cc, &p, Some(&h0)));
    assert!(msg.contains("`initial_state`"), "{msg}");
    let msg = err(selective_scan(&u.unsqueeze(0).unwrap(), delta, a, b, cc, &p, None));
    assert!(msg.contains("`u`") && msg.contains("rank 3"), "{msg}");
    assert!(matches!(selective_scan(u, &bad_delta, a, b, cc, &p, None), Err(Error::Shape { tensor: "delta", .. })));
}

#[test]
fn empty_dimensions_do_not_panic() {
    for (batch, dim, state) in [(0, 4, 3), (2, 0, 3), (2, 4, 0)] {
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &CPU).unwrap();
        let (u, a, b) = (t(&[batch, dim, 5]), t(&[dim, state]), t(&[batch, state, 5]));
        let out = selective_scan(&u, &u, &a, &b, &b, &ScanParams::default(), None).unwrap();
        assert_eq!(out.y.dims(), &[batch, dim, 5]);
        assert_eq!(out.last_state.dims(), &[batch, dim, state]);
    }
    let u = Tensor::zeros((1, 2, 0), DType::F32, &CPU).unwrap();
    let (a, b) =
        (Tensor::zeros((2, 3), DType::F32, &CPU).unwrap(), Tensor::zeros((1, 3, 0), DType::F32, &CPU).unwrap());
    let msg = selective_scan(&u, &u, &a, &b, &b, &ScanParams::default(), None).err().unwrap().to_string();
    assert!(msg.contains("`u`") && msg.contains("length"), "{msg}");
}
