//! Scan kernels against loops over time of candle ops: `candle_steps` is this crate's reference
//! (`selective_scan_ref`, one `selective_state_update_ref` per step), `candle_transformers_style`
//! the way candle-transformers' Mamba computes the scan.
//!
//! `cargo bench -p mamba-ssm --bench scan` (2 threads; see docs/benchmarks.md). Throughput is in
//! state updates (batch x dim x len x state for the selective scan, batch x len x heads x headdim
//! x state for the SSD).

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use mamba_ssm::{
    causal_conv1d, mamba2_inner, mamba3_chunk_scan, mamba3_chunk_scan_ref, mamba_inner, selective_scan,
    selective_scan_ref, set_cpu_isa, ssd_chunk_scan, ssd_chunk_scan_ref, CpuIsa, InnerWeights, Mamba2Weights,
    Mamba3Inputs, Mamba3State, ScanOutput, ScanParams, SsdParams,
};
use std::time::Duration;

/// The allocator of the `mamba` binary, whose training these kernels run in: the system
/// allocator maps and clears fresh pages for every large buffer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rand(shape: &[usize], lo: f64, hi: f64) -> Tensor {
    Tensor::rand(lo as f32, hi as f32, shape, &Device::Cpu).unwrap()
}

type ScanFn =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, &ScanParams, Option<&Tensor>) -> mamba_ssm::Result<ScanOutput>;

/// A Mamba block's scan: D skip, z gate, delta bias and softplus; inputs are Vars so the forward
/// pass records what the backward pass needs, as in training.
struct Scan {
    vars: Vec<Var>,
}

impl Scan {
    fn new(dim: usize, state: usize, len: usize) -> Self {
        let shapes: [(&[usize], f64, f64); 8] = [
            (&[1, dim, len], -1.0, 1.0),
            (&[1, dim, len], -3.0, 0.0),
            (&[dim, state], -4.0, -0.5),
            (&[1, state, len], -1.0, 1.0),
            (&[1, state, len], -1.0, 1.0),
            (&[dim], -1.0, 1.0),
            (&[1, dim, len], -2.0, 2.0),
            (&[dim], -1.0, 0.0),
        ];
        Self { vars: shapes.iter().map(|&(s, lo, hi)| Var::from_tensor(&rand(s, lo, hi)).unwrap()).collect() }
    }

    /// Runs `scan`; with `train` the inputs are Vars and the forward pass keeps what the
    /// backward pass needs, otherwise it runs as inference does.
    fn run(&self, scan: ScanFn, train: bool) -> Tensor {
        let t: Vec<Tensor> =
            self.vars.iter().map(|v| if train { v.as_tensor().clone() } else { v.as_detached_tensor() }).collect();
        let t: Vec<&Tensor> = t.iter().collect();
        let p = ScanParams { d: Some(t[5]), z: Some(t[6]), delta_bias: Some(t[7]), delta_softplus: true };
        scan(t[0], t[1], t[2], t[3], t[4], &p, None).unwrap().y
    }
}

/// The scan as candle-transformers' Mamba writes it: exp(delta A) and delta B u materialised for
/// the whole sequence as (batch, dim, len, state) tensors, then a loop over time of a multiply-add
/// and a matrix-vector product. D, z, delta_bias and softplus in candle ops around it.
fn candle_transformers_style(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
    _h0: Option<&Tensor>,
) -> mamba_ssm::Result<ScanOutput> {
    let (batch, dim, len) = u.dims3()?;
    let n = a.dim(1)?;
    let dt = mamba_ssm::softplus(&delta.broadcast_add(&p.delta_bias.unwrap().reshape((1, dim, 1))?)?)?.unsqueeze(3)?;
    let delta_a = dt.broadcast_mul(&a.reshape((1, dim, 1, n))?)?.exp()?;
    let delta_b_u =
        dt.broadcast_mul(&b.transpose(1, 2)?.reshape((batch, 1, len, n))?)?.broadcast_mul(&u.unsqueeze(3)?)?;
    let mut h = Tensor::zeros((batch, dim, n), u.dtype(), u.device())?;
    let mut ys = Vec::with_capacity(len);
    for t in 0..len {
        h = ((h * delta_a.narrow(2, t, 1)?.squeeze(2)?)? + delta_b_u.narrow(2, t, 1)?.squeeze(2)?)?;
        ys.push(h.matmul(&c.narrow(2, t, 1)?)?.squeeze(2)?); // (batch, dim)
    }
    let y = (Tensor::stack(&ys, 2)? + u.broadcast_mul(&p.d.unwrap().reshape((1, dim, 1))?)?)?;
    let y = (y * p.z.unwrap().silu()?)?;
    Ok(ScanOutput { y, last_state: h })
}

fn selective(c: &mut Criterion) {
    let (dim, state) = (1536, 16);
    // The comparisons must compute what the kernel computes.
    let small = Scan::new(40, state, 70);
    for other in [selective_scan_ref as ScanFn, candle_transformers_style] {
        let (y, want) = (small.run(selective_scan, false), small.run(other, false));
        let err = (y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "comparison differs from the kernel by {err}");
    }
    let mut g = c.benchmark_group("selective_scan");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for len in [1024, 4096] {
        let s = Scan::new(dim, state, len);
        g.throughput(Throughput::Elements((dim * len * state) as u64));
        g.bench_with_input(BenchmarkId::new("kernel_fwd", len), &len, |b, _| b.iter(|| s.run(selective_scan, false)));
        g.bench_with_input(BenchmarkId::new("kernel_fwd_bwd", len), &len, |b, _| {
            b.iter(|| s.run(selective_scan, true).sum_all().unwrap().backward().unwrap())
        });
        g.bench_with_input(BenchmarkId::new("candle_steps_fwd", len), &len, |b, _| {
            b.iter(|| s.run(selective_scan_ref, false))
        });
        g.bench_with_input(BenchmarkId::new("candle_transformers_style_fwd", len), &len, |b, _| {
            b.iter(|| s.run(candle_transformers_style, false))
        });
    }
    g.finish();
}

/// The kernel compiled for each instruction set this CPU has, side by side (`set_cpu_isa` switches
/// between them in one process): `cargo bench -p mamba-ssm --bench scan -- instruction_set`.
fn instruction_sets(c: &mut Criterion) {
    let (dim, state, len) = (1536, 16, 4096);
    let s = Scan::new(dim, state, len);
    let mut g = c.benchmark_group("instruction_set");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements((dim * len * state) as u64));
    for isa in [CpuIsa::Avx2, CpuIsa::Avx512].into_iter().filter(|&i| i <= CpuIsa::detect()) {
        let name = format!("{isa:?}").to_lowercase();
        g.bench_function(BenchmarkId::new("kernel_fwd", &name), |b| {
            set_cpu_isa(isa);
            b.iter(|| s.run(selective_scan, false))
        });
        g.bench_function(BenchmarkId::new("kernel_fwd_bwd", &name), |b| {
            set_cpu_isa(isa);
            b.iter(|| s.run(selective_scan, true).sum_all().unwrap().backward().unwrap())
        });
    }
    set_cpu_isa(CpuIsa::Avx512);
    g.finish();
}

type SsdScan = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    usize,
    &SsdParams,
    Option<&Tensor>,
) -> mamba_ssm::Result<mamba_ssm::ScanOutput>;

type Mamba3Scan = fn(&Mamba3Inputs, usize, Option<&Mamba3State>) -> mamba_ssm::Result<mamba_ssm::Mamba3Output>;

fn ssd(c: &mut Criterion) {
    let (len, heads, headdim, state, chunk) = (4096, 24, 64, 128, 256);
    let vars: Vec<Var> = [
        rand(&[1, len, heads, headdim], -1.0, 1.0),
        rand(&[1, len, heads], -3.0, 0.0),
        rand(&[heads], -4.0, -0.5),
        rand(&[1, len, 1, state], -1.0, 1.0),
        rand(&[1, len, 1, state], -1.0, 1.0),
        rand(&[heads], -1.0, 1.0),
        rand(&[heads], -1.0, 0.0),
    ]
    .iter()
    .map(|t| Var::from_tensor(t).unwrap())
    .collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let p = SsdParams { d: Some(t[5]), dt_bias: Some(t[6]), dt_softplus: true, ..Default::default() };
    let mut g = c.benchmark_group("ssd");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements((len * heads * headdim * state) as u64));
    // The kernel beside the same algorithm from candle ops.
    for (name, scan) in [("chunked", ssd_chunk_scan as SsdScan), ("composed", ssd_chunk_scan_ref)] {
        let run = || scan(t[0], t[1], t[2], t[3], t[4], chunk, &p, None).unwrap().y;
        g.bench_function(BenchmarkId::new(format!("{name}_fwd"), len), |b| b.iter(run));
        g.bench_function(BenchmarkId::new(format!("{name}_fwd_bwd"), len), |b| {
            b.iter(|| run().sum_all().unwrap().backward().unwrap())
        });
    }
    g.finish();
}

/// Mamba-3's chunked scan (candle ops, chunks of 64 as its reference defaults to) at the SSD
/// benchmark's shape, beside the SSD kernel and the SSD from candle ops in the same run:
/// `cargo bench -p mamba-ssm --bench scan -- mamba3`. D and z on, no initial state.
fn mamba3(c: &mut Criterion) {
    let (len, heads, headdim, state) = (4096, 24, 64, 128);
    let vars: Vec<Var> = [
        rand(&[1, len, 1, state], -1.0, 1.0),
        rand(&[1, len, 1, state], -1.0, 1.0),
        rand(&[1, len, heads, headdim], -1.0, 1.0),
        rand(&[1, heads, len], -0.3, -0.001),
        rand(&[1, heads, len], 0.001, 0.1),
        rand(&[1, heads, len], -2.0, 2.0),
        rand(&[heads, state], -1.0, 1.0),
        rand(&[heads, state], -1.0, 1.0),
        rand(&[1, len, heads, state / 4], -1.0, 1.0),
        rand(&[heads], -1.0, 1.0),
        rand(&[1, len, heads, headdim], -2.0, 2.0),
    ]
    .iter()
    .map(|t| Var::from_tensor(t).unwrap())
    .collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let x = Mamba3Inputs {
        q: t[0],
        k: t[1],
        v: t[2],
        adt: t[3],
        dt: t[4],
        trap: t[5],
        q_bias: t[6],
        k_bias: t[7],
        angles: t[8],
        d: Some(t[9]),
        z: Some(t[10]),
        mimo: None,
    };
    let mut g = c.benchmark_group("mamba3");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements((len * heads * headdim * state) as u64));
    for (name, scan) in [("mamba3_kernel", mamba3_chunk_scan as Mamba3Scan), ("mamba3_composed", mamba3_chunk_scan_ref)]
    {
        let run = || scan(&x, 64, None).unwrap().y;
        g.bench_function(BenchmarkId::new(format!("{name}_fwd"), len), |b| b.iter(run));
        g.bench_function(BenchmarkId::new(format!("{name}_fwd_bwd"), len), |b| {
            b.iter(|| run().sum_all().unwrap().backward().unwrap())
        });
    }
    // The SSD at the same width: x, dt, A, B, C, z and D of the same sizes.
    let (a, dt_bias) = (Var::from_tensor(&rand(&[heads], -4.0, -0.5)).unwrap(), rand(&[heads], -1.0, 0.0));
    let dt = t[4].transpose(1, 2).unwrap().contiguous().unwrap();
    let p =
        SsdParams { d: Some(t[9]), z: Some(t[10]), dt_bias: Some(&dt_bias), dt_softplus: true, ..Default::default() };
    for (name, scan) in [("ssd_kernel", ssd_chunk_scan as SsdScan), ("ssd_composed", ssd_chunk_scan_ref)] {
        let run = || scan(t[2], &dt, a.as_tensor(), t[1], t[0], 256, &p, None).unwrap().y;
        g.bench_function(BenchmarkId::new(format!("{name}_fwd"), len), |b| b.iter(run));
        g.bench_function(BenchmarkId::new(format!("{name}_fwd_bwd"), len), |b| {
            b.iter(|| run().sum_all().unwrap().backward().unwrap())
        });
    }
    g.finish();
}

/// One route of a Mamba-1 mixer: xz and the route's weights, as Vars.
struct Route {
    vars: Vec<Var>,
    /// batch, len, d_inner, d_state, dt_rank.
    shape: (usize, usize, usize, usize, usize),
}

impl Route {
    fn new(batch: usize, len: usize, di: usize, n: usize, r: usize) -> Self {
        let k = 4;
        let shapes: [(&[usize], f64, f64); 8] = [
            (&[batch, len, 2 * di], -1.0, 1.0),
            (&[di, 1, k], -0.5, 0.5),
            (&[di], -0.5, 0.5),
            (&[r + 2 * n, di], -0.2, 0.2),
            (&[di, r], -0.5, 0.5),
            (&[di], -3.0, -1.0),
            (&[di, n], 0.0, 2.0),
            (&[di], -1.0, 1.0),
        ];
        let vars = shapes.iter().map(|&(s, lo, hi)| Var::from_tensor(&rand(s, lo, hi)).unwrap()).collect();
        Self { vars, shape: (batch, len, di, n, r) }
    }

    /// The route's gated output, by the fused op or by the composition the mixer ran before it
    /// (a gather for a reversed route, the conv and scan kernels, candle's matmuls, transposes,
    /// a scatter back); with `train` the forward pass keeps what the backward pass needs.
    fn run(&self, fused: bool, order: Option<&[u32]>, train: bool) -> Tensor {
        let t: Vec<Tensor> =
            self.vars.iter().map(|v| if train { v.as_tensor().clone() } else { v.as_detached_tensor() }).collect();
        let (_, len, di, n, r) = self.shape;
        if fused {
            let w = InnerWeights {
                conv_weight: &t[1],
                conv_bias: Some(&t[2]),
                x_proj: &t[3],
                dt_proj: &t[4],
                dt_bias: &t[5],
                a_log: &t[6],
                d: &t[7],
            };
            return mamba_inner(&t[0], &w, order).unwrap().y;
        }
        let index = |o: &[u32]| Tensor::new(o, &Device::Cpu).unwrap();
        let xz = match order {
            Some(o) => t[0].index_select(&index(o), 1).unwrap(),
            None => t[0].clone(),
        };
        let half = |i: usize| xz.narrow(2, i * di, di).unwrap().transpose(1, 2).unwrap();
        let (x, z) = (half(0), half(1));
        let u = causal_conv1d(&x, &t[1], Some(&t[2]), true).unwrap();
        let x_dbl = u.transpose(1, 2).unwrap().broadcast_matmul(&t[3].t().unwrap()).unwrap();
        let dt = x_dbl.narrow(2, 0, r).unwrap().broadcast_matmul(&t[4].t().unwrap()).unwrap().transpose(1, 2).unwrap();
        let part = |i: usize| x_dbl.narrow(2, i, n).unwrap().transpose(1, 2).unwrap();
        let p = ScanParams { d: Some(&t[7]), z: Some(&z), delta_bias: Some(&t[5]), delta_softplus: true };
        let a = t[6].exp().unwrap().neg().unwrap();
        let y = selective_scan(&u, &dt, &a, &part(r), &part(r + n), &p, None).unwrap().y.transpose(1, 2).unwrap();
        match order {
            Some(o) => {
                let mut inverse = vec![0u32; len];
                for (i, &p) in o.iter().enumerate() {
                    inverse[p as usize] = i as u32;
                }
                y.contiguous().unwrap().index_select(&index(&inverse), 1).unwrap()
            }
            None => y,
        }
    }
}

/// The fused Mamba-1 route against the composition it replaced:
/// `cargo bench -p mamba-ssm --bench scan -- mamba_inner`. Training (forward + backward) at the
/// README's Vision Mamba (batch 32, 50 tokens, d_inner 128, d_state 16, dt_rank 4), forward and
/// reverse routes; inference (forward) at mamba-130m's prefill of a 512-token prompt (batch 1,
/// d_inner 1536, dt_rank 48), where `mamba_inner` runs the composition itself (one batch row
/// would leave a thread idle in the fused op): the two rows must be alike.
fn routes(c: &mut Criterion) {
    let vim = Route::new(32, 50, 128, 16, 4);
    let reverse: Vec<u32> = (0..50).rev().collect();
    for order in [None, Some(reverse.as_slice())] {
        let (a, b) = (vim.run(true, order, false), vim.run(false, order, false));
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "the composition differs from the fused op by {err}");
    }
    let mut g = c.benchmark_group("mamba_inner");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements((32 * 50 * 128 * 16) as u64));
    for (name, order) in [("forward", None), ("reverse", Some(reverse.as_slice()))] {
        for (kind, fused) in [("mamba_inner", true), ("composed", false)] {
            g.bench_function(BenchmarkId::new(format!("{kind}_fwd_bwd"), name), |b| {
                b.iter(|| vim.run(fused, order, true).sum_all().unwrap().backward().unwrap())
            });
        }
    }
    let prefill = Route::new(1, 512, 1536, 16, 48);
    g.throughput(Throughput::Elements((512 * 1536 * 16) as u64));
    for (kind, fused) in [("mamba_inner", true), ("composed", false)] {
        g.bench_function(BenchmarkId::new(format!("{kind}_fwd"), "prefill-130m"), |b| {
            b.iter(|| prefill.run(fused, None, false))
        });
    }
    g.finish();
}

/// One route of a Mamba-2 mixer: in_proj's output [z | xBC | dt] and the route's weights, as Vars.
struct Route2 {
    vars: Vec<Var>,
    /// heads, headdim, state.
    shape: (usize, usize, usize),
}

impl Route2 {
    fn new(batch: usize, len: usize, heads: usize, headdim: usize, state: usize) -> Self {
        let di = heads * headdim;
        let conv_dim = di + 2 * state;
        let shapes: [(&[usize], f64, f64); 7] = [
            (&[batch, len, di + conv_dim + heads], -1.0, 1.0),
            (&[conv_dim, 1, 4], -0.5, 0.5),
            (&[conv_dim], -0.5, 0.5),
            (&[heads], -3.0, -1.0),
            (&[heads], 0.0, 2.0),
            (&[heads], -1.0, 1.0),
            (&[di], 0.5, 1.5),
        ];
        let vars = shapes.iter().map(|&(s, lo, hi)| Var::from_tensor(&rand(s, lo, hi)).unwrap()).collect();
        Self { vars, shape: (heads, headdim, state) }
    }

    fn run(&self, train: bool) -> Tensor {
        let t: Vec<Tensor> =
            self.vars.iter().map(|v| if train { v.as_tensor().clone() } else { v.as_detached_tensor() }).collect();
        let (_, headdim, state) = self.shape;
        let w = Mamba2Weights {
            conv_weight: &t[1],
            conv_bias: Some(&t[2]),
            dt_bias: &t[3],
            a_log: &t[4],
            d: &t[5],
            headdim,
            groups: 1,
            state,
            dt_limit: (0.0, f64::INFINITY),
            norm: Some((&t[6], 1e-5)),
        };
        mamba2_inner(&t[0], &w, None).unwrap().y
    }
}

/// A Mamba-1 and a Mamba-2 route at the width of mamba-130m / mamba2-130m (d_inner 1536;
/// Mamba-1 d_state 16, dt_rank 48; Mamba-2 24 heads of 64, state 128, with its gated RMSNorm),
/// both fused ops:
/// `cargo bench -p mamba-ssm --bench scan -- same_width`. Training (forward + backward) at batch
/// 8 x 256 tokens, prefill (forward) of one 512-token prompt.
fn same_width(c: &mut Criterion) {
    let mut g = c.benchmark_group("same_width");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for (name, batch, len, train) in [("train_8x256", 8, 256, true), ("prefill_512", 1, 512, false)] {
        let (m1, m2) = (Route::new(batch, len, 1536, 16, 48), Route2::new(batch, len, 24, 64, 128));
        let step = |y: Tensor| {
            if train {
                y.sum_all().unwrap().backward().unwrap();
            }
        };
        g.bench_function(BenchmarkId::new("mamba1_route", name), |b| b.iter(|| step(m1.run(true, None, train))));
        g.bench_function(BenchmarkId::new("mamba2_route", name), |b| b.iter(|| step(m2.run(train))));
    }
    g.finish();
}

fn two_threads() {
    rayon::ThreadPoolBuilder::new().num_threads(2).build_global().expect("rayon pool");
}

criterion_group!(benches, selective, instruction_sets, ssd, mamba3, routes, same_width);

fn main() {
    two_threads();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
