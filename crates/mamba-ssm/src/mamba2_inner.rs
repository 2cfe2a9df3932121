//! One Mamba-2 mixer route as one op, in the manner of mamba_ssm's
//! `mamba_split_conv1d_scan_combined`: from in_proj's output [z | xBC | dt] (batch, len, ·) to
//! y * silu(z) (batch, len, d_inner), through the causal conv + SiLU of xBC, dt's bias, softplus
//! and limits, the SSD kernel with its D skip, and the gate, then the gated RMSNorm if asked. in_proj's output is read whole and
//! its gradient written whole: the three slices of it that the composition takes each cost a
//! zero-padded copy of the whole tensor in candle's backward pass.
//!
//! The backward pass recomputes the conv and dt and keeps the SSD's chunk states and the
//! ungated y from the forward pass. `mamba2_inner_ref` is the same route from candle ops.

use crate::conv::{silu_grad, silu_in_place};
use crate::cpu::{sum_in_order, zeros, Flat, FlatOp2};
use crate::error::{argument, check, dims, Result};
use crate::gate::{gate_grad_span, gate_span};
use crate::mamba_inner::check_order;
use crate::math::{Plain, Real};
use crate::norm::{norm_row, norm_row_grad};
use crate::ssd::{ChunkScan, Sizes, SsdParams};
use crate::ssd_cpu::{mul_add_to, SsdOp};
use crate::{causal_conv1d, silu_gate, ssd_chunk_scan_ref};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// A Mamba-2 route's own parameters.
#[derive(Clone, Copy)]
pub struct Mamba2Weights<'a> {
    /// (conv_dim, 1, d_conv) or (conv_dim, d_conv), conv_dim = d_inner + 2 groups state.
    pub conv_weight: &'a Tensor,
    pub conv_bias: Option<&'a Tensor>,
    /// (heads).
    pub dt_bias: &'a Tensor,
    /// (heads); A = -exp(A_log).
    pub a_log: &'a Tensor,
    /// (heads).
    pub d: &'a Tensor,
    pub headdim: usize,
    pub groups: usize,
    pub state: usize,
    /// dt is clamped to [lo, hi] after the softplus.
    pub dt_limit: (f64, f64),
    /// The RMSNorm after the gate, over groups of d_inner / groups channels: its weight
    /// (d_inner) and eps.
    pub norm: Option<(&'a Tensor, f64)>,
}

/// The gated output (batch, len, d_inner) and the SSD state after the last step.
pub struct Mamba2Output {
    pub y: Tensor,
    pub last_state: Tensor,
}

/// Sizes of one call: the SSD's, the conv width, and the input's row.
#[derive(Clone, Copy)]
struct Dims {
    s: Sizes,
    width: usize,
    has_bias: bool,
}

impl Dims {
    fn di(&self) -> usize {
        self.s.heads * self.s.headdim
    }
    fn bc(&self) -> usize {
        self.s.groups * self.s.state
    }
    fn conv_dim(&self) -> usize {
        self.di() + 2 * self.bc()
    }
    fn row(&self) -> usize {
        self.di() + self.conv_dim() + self.s.heads
    }
    fn rows(&self) -> usize {
        self.s.batch * self.s.len
    }
}

fn check_inputs(zx: &Tensor, w: &Mamba2Weights, order: Option<&[u32]>) -> Result<Dims> {
    let [batch, len, _] = dims("zxbcdt", zx, ["batch", "len", "d_in_proj"])?;
    let [heads] = dims("A_log", w.a_log, ["heads"])?;
    let (headdim, groups, state) = (w.headdim, w.groups, w.state);
    if len == 0 || headdim == 0 || groups == 0 || heads % groups != 0 {
        return Err(argument("zxbcdt", format!("len {len}, headdim {headdim}, groups {groups} of {heads} heads")));
    }
    let s = Sizes { batch, len, heads, headdim, groups, state };
    let conv_dim = heads * headdim + 2 * groups * state;
    let width = *w.conv_weight.dims().last().unwrap_or(&0);
    let d = Dims { s, width, has_bias: w.conv_bias.is_some() };
    check("zxbcdt", zx, &[("batch", batch), ("len", len), ("d_inner + conv_dim + heads", d.row())])?;
    if w.conv_weight.elem_count() != conv_dim * width || width == 0 {
        return Err(argument("conv_weight", format!("expected (conv_dim, 1, d_conv) with conv_dim {conv_dim}")));
    }
    if let Some(b) = w.conv_bias {
        check("conv_bias", b, &[("conv_dim", conv_dim)])?;
    }
    check("dt_bias", w.dt_bias, &[("heads", heads)])?;
    check("D", w.d, &[("heads", heads)])?;
    if let Some((nw, _)) = w.norm {
        check("norm weight", nw, &[("d_inner", heads * headdim)])?;
    }
    check_order(order, len)?;
    Ok(d)
}

/// One Mamba-2 route fused (see the module's note). zxbcdt: (batch, len, d_inner + conv_dim +
/// heads) in the route's order. On the CPU this is one op; on a GPU the composition of the
/// CUDA conv and SSD kernels.
pub fn mamba2_inner(zx: &Tensor, w: &Mamba2Weights, order: Option<&[u32]>) -> Result<Mamba2Output> {
    let d = check_inputs(zx, w, order)?;
    if !zx.device().is_cpu() {
        return composed(zx, w, order, d, crate::ssd_chunk_scan);
    }
    let ct = crate::selective_scan::compute_dtype(zx);
    let cast = |t: &Tensor| t.to_dtype(ct).and_then(|t| t.flatten_all());
    let mut pack = vec![cast(w.conv_weight)?];
    if let Some(b) = w.conv_bias {
        pack.push(cast(b)?);
    }
    pack.extend([cast(w.dt_bias)?, cast(w.a_log)?, cast(w.d)?]);
    if let Some((nw, _)) = w.norm {
        pack.push(cast(nw)?);
    }
    let pack = Tensor::cat(&pack, 0)?;
    let zxc = zx.to_dtype(ct)?.contiguous()?;
    let keep = zxc.track_op() || pack.track_op();
    let order = order.map(<[u32]>::to_vec);
    let op = Mamba2Op { d, dt_limit: w.dt_limit, norm_eps: w.norm.map(|n| n.1), order, keep, kept: Mutex::new(None) };
    let out = zxc.apply_op2(&pack, Flat(op))?;
    let s = d.s;
    let n_y = d.rows() * d.di();
    let y = out.narrow(0, 0, n_y)?.reshape((s.batch, s.len, d.di()))?.to_dtype(zx.dtype())?;
    let last = out.narrow(0, n_y, out.elem_count() - n_y)?.reshape((s.batch, s.heads, s.headdim, s.state))?;
    Ok(Mamba2Output { y, last_state: last.to_dtype(zx.dtype())? })
}

/// [`mamba2_inner`] from candle ops: the conv op, the SSD's candle-ops composition and the gate.
pub fn mamba2_inner_ref(zx: &Tensor, w: &Mamba2Weights, order: Option<&[u32]>) -> Result<Mamba2Output> {
    composed(zx, w, order, check_inputs(zx, w, order)?, ssd_chunk_scan_ref)
}

/// The route through candle ops: in_proj's output gathered into the route's order, the route,
/// its output scattered back.
fn composed(zx: &Tensor, w: &Mamba2Weights, order: Option<&[u32]>, d: Dims, scan: ChunkScan) -> Result<Mamba2Output> {
    let Some(order) = order else { return composed_in_order(zx, w, d, scan) };
    let index = |o: &[u32]| Tensor::new(o, zx.device());
    let out = composed_in_order(&zx.index_select(&index(order)?, 1)?, w, d, scan)?;
    let mut inverse = vec![0u32; order.len()];
    for (t, &p) in order.iter().enumerate() {
        inverse[p as usize] = t as u32;
    }
    Ok(Mamba2Output { y: out.y.index_select(&index(&inverse)?, 1)?, last_state: out.last_state })
}

fn composed_in_order(zx: &Tensor, w: &Mamba2Weights, d: Dims, scan: ChunkScan) -> Result<Mamba2Output> {
    let Sizes { batch, len, heads, headdim, groups, state } = d.s;
    let (di, conv_dim) = (d.di(), d.conv_dim());
    let z = zx.narrow(2, 0, di)?;
    let xbc = zx.narrow(2, di, conv_dim)?.transpose(1, 2)?;
    let dt = zx.narrow(2, di + conv_dim, heads)?;
    let conv = causal_conv1d(&xbc, w.conv_weight, w.conv_bias, true)?.transpose(1, 2)?;
    let part = |start: usize, size: usize, shape: &[usize]| conv.narrow(2, start, size)?.reshape(shape);
    let xs = part(0, di, &[batch, len, heads, headdim])?;
    let b = part(di, groups * state, &[batch, len, groups, state])?;
    let c = part(di + groups * state, groups * state, &[batch, len, groups, state])?;
    let a = w.a_log.exp()?.neg()?;
    let p = SsdParams { d: Some(w.d), z: None, dt_bias: Some(w.dt_bias), dt_softplus: true, dt_limit: w.dt_limit };
    let out = scan(&xs, &dt, &a, &b, &c, 64, &p, None)?;
    let mut y = silu_gate(&out.y.reshape((batch, len, di))?, &z)?;
    if let Some((nw, eps)) = w.norm {
        let grouped = y.reshape((batch, len, groups, di / groups))?;
        let ms = grouped.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = grouped.broadcast_div(&(ms + eps)?.sqrt()?)?.reshape((batch, len, di))?;
        y = normed.broadcast_mul(nw)?;
    }
    Ok(Mamba2Output { y, last_state: out.last_state })
}

/// Rows per rayon task where the backward pass sums over rows: fixed blocks, summed in order,
/// so that a run repeats exactly.
const BLOCK: usize = 64;

struct Mamba2Op {
    d: Dims,
    dt_limit: (f64, f64),
    /// The gated RMSNorm's eps, when the op ends with it.
    norm_eps: Option<f64>,
    /// The route: step t of each batch row is position order[t] (None: in sequence order).
    order: Option<Vec<u32>>,
    /// Whether a backward pass may follow: then the forward pass keeps [ungated y | chunk states].
    keep: bool,
    kept: Mutex<Option<(CpuStorage, CpuStorage)>>,
}

/// The parameters, unpacked.
struct Weights<'a, T> {
    /// (d_conv, conv_dim): transposed, so that a time step's taps are contiguous over channels.
    conv_t: Vec<T>,
    conv_b: &'a [T],
    dt_bias: &'a [T],
    a_log: &'a [T],
    d: &'a [T],
    norm_w: Option<&'a [T]>,
}

/// What the conv and dt give the SSD: x (rows, d_inner), the SSD's pack [A | D | B | C], the
/// effective dt (rows, heads), and the conv's pre-activation (rows, conv_dim) when asked.
struct Inputs<T> {
    x: Vec<T>,
    pack: Vec<T>,
    dt: Vec<T>,
    pre: Vec<T>,
}

impl Mamba2Op {
    fn ssd(&self) -> SsdOp {
        SsdOp { s: self.d.s, log_decays: false, has_d: true, has_h0: false, keep: false, kept: Mutex::new(None) }
    }

    fn unpack<'a, T: Real>(&self, pack: &'a [T]) -> Weights<'a, T> {
        let (cd, k, h) = (self.d.conv_dim(), self.d.width, self.d.s.heads);
        let (w, rest) = pack.split_at(cd * k);
        let (conv_b, rest) = rest.split_at(if self.d.has_bias { cd } else { 0 });
        let (dt_bias, rest) = rest.split_at(h);
        let (a_log, rest) = rest.split_at(h);
        let (d, norm_w) = rest.split_at(h);
        let conv_t = (0..k).flat_map(|j| (0..cd).map(move |c| w[c * k + j])).collect();
        Weights { conv_t, conv_b, dt_bias, a_log, d, norm_w: self.norm_eps.map(|_| norm_w) }
    }

    /// The conv + SiLU of xBC and dt after bias, softplus and limits, from in_proj's output.
    fn inputs<T: Real>(&self, w: &Weights<T>, zx: &[T], keep_pre: bool) -> Inputs<T> {
        let d = self.d;
        let Sizes { len, heads, headdim, .. } = d.s;
        let (di, bc, cd, row, k) = (d.di(), d.bc(), d.conv_dim(), d.row(), d.width);
        let rows = d.rows();
        let mut pre = zeros::<T>(rows * cd);
        pre.par_chunks_mut(cd).enumerate().with_min_len(8).for_each(|(i, out)| {
            let t = i % len;
            match w.conv_b.is_empty() {
                true => out.fill(T::ZERO),
                false => out.copy_from_slice(w.conv_b),
            }
            // Tap j reads step t - (k - 1) + j of the same batch row.
            for j in (k - 1).saturating_sub(t)..k {
                let src = &zx[(i + j + 1 - k) * row + di..][..cd];
                mul_add_to(&w.conv_t[j * cd..][..cd], src, out);
            }
        });
        let mut act = pre.clone();
        act.par_chunks_mut(cd).with_min_len(8).for_each(|r| silu_in_place(r));
        let a: Vec<T> = w.a_log.iter().map(|&v| -v.exp::<Plain>()).collect();
        let mut pack = a;
        pack.extend(w.d.iter().flat_map(|&v| std::iter::repeat_n(v, headdim)));
        let mut x = Vec::with_capacity(rows * di);
        for r in act.chunks(cd) {
            x.extend_from_slice(&r[..di]);
        }
        for part in [di, di + bc] {
            for r in act.chunks(cd) {
                pack.extend_from_slice(&r[part..part + bc]);
            }
        }
        let (lo, hi) = (T::from_f64(self.dt_limit.0), T::from_f64(self.dt_limit.1));
        let mut dt = Vec::with_capacity(rows * heads);
        for r in zx.chunks(row) {
            let raw = &r[di + cd..][..heads];
            dt.extend(raw.iter().zip(w.dt_bias).map(|(&v, &b)| clamp((v + b).softplus::<Plain>(), lo, hi)));
        }
        Inputs { x, pack, dt, pre: if keep_pre { pre } else { Vec::new() } }
    }
}

fn clamp<T: Real>(v: T, lo: T, hi: T) -> T {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// Rows of a (batch, len, row) buffer moved by the route: `to_route` gathers position order[t]
/// into step t, else step t is scattered back to position order[t].
fn reorder<T: Copy + Default>(src: &[T], len: usize, row: usize, order: &[u32], to_route: bool) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    for (dst, src) in out.chunks_mut(len * row).zip(src.chunks(len * row)) {
        for (t, &p) in order.iter().enumerate() {
            let (a, b) = if to_route { (t, p as usize) } else { (p as usize, t) };
            dst[a * row..][..row].copy_from_slice(&src[b * row..][..row]);
        }
    }
    out
}

impl FlatOp2 for Mamba2Op {
    const NAME: &'static str = "mamba2-inner";

    fn out_shape(&self, _: &Layout) -> Shape {
        let d = self.d;
        Shape::from(d.rows() * d.di() + d.s.batch * d.s.heads * d.s.headdim * d.s.state)
    }

    /// In the route's order, the rows are moved on the way in and out (a copy of each; the
    /// composition gathers and scatters candle tensors, with their backward passes).
    fn fwd<T: Real>(&self, zx: &[T], pack: &[T]) -> Vec<T> {
        let Some(order) = &self.order else { return self.fwd_in_order(zx, pack) };
        let (len, di, row) = (self.d.s.len, self.d.di(), self.d.row());
        let mut out = self.fwd_in_order(&reorder(zx, len, row, order, true), pack);
        let n_y = self.d.rows() * di;
        let y = reorder(&out[..n_y], len, di, order, false);
        out[..n_y].copy_from_slice(&y);
        out
    }

    fn bwd<T: Real>(&self, zx: &[T], pack: &[T], grad: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let Some(order) = &self.order else { return self.bwd_in_order(zx, pack, grad) };
        let (len, di, row) = (self.d.s.len, self.d.di(), self.d.row());
        let n_y = self.d.rows() * di;
        let mut grad_route = reorder(&grad[..n_y], len, di, order, true);
        grad_route.extend_from_slice(&grad[n_y..]);
        let (dzx, dpack) = self.bwd_in_order(&reorder(zx, len, row, order, true), pack, &grad_route)?;
        Ok((reorder(&dzx, len, row, order, false), dpack))
    }
}

impl Mamba2Op {
    fn fwd_in_order<T: Real>(&self, zx: &[T], pack: &[T]) -> Vec<T> {
        let d = self.d;
        let (di, row) = (d.di(), d.row());
        let w = self.unpack(pack);
        let inp = self.inputs(&w, zx, false);
        let ssd = self.ssd();
        let (ungated, states) = ssd.forward(&inp.x, &inp.dt, &inp.pack);
        let mut out = zeros::<T>(ungated.len());
        let (y, last) = out.split_at_mut(d.rows() * di);
        let group = di / d.s.groups;
        let rows_y = y.par_chunks_mut(di).zip(ungated.par_chunks(di)).enumerate().with_min_len(8);
        rows_y.for_each_init(
            || vec![T::ZERO; di],
            |gated, (i, (y, u))| {
                let z = &zx[i * row..][..di];
                match (w.norm_w, self.norm_eps) {
                    (Some(nw), Some(eps)) => {
                        gate_span(u, z, gated);
                        for ((y, g), nw) in y.chunks_mut(group).zip(gated.chunks(group)).zip(nw.chunks(group)) {
                            norm_row(g, nw, eps, y);
                        }
                    }
                    _ => gate_span(u, z, y),
                }
            },
        );
        last.copy_from_slice(&ungated[d.rows() * di..]);
        if self.keep {
            *self.kept.lock().unwrap() = Some((T::to_cpu_storage_owned(ungated), T::to_cpu_storage_owned(states)));
        }
        out
    }

    fn bwd_in_order<T: Real>(&self, zx: &[T], pack: &[T], grad: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let d = self.d;
        let Sizes { len, heads, headdim, .. } = d.s;
        let (di, bc, cd, row, k) = (d.di(), d.bc(), d.conv_dim(), d.row(), d.width);
        let rows = d.rows();
        let w = self.unpack(pack);
        let inp = self.inputs(&w, zx, true);
        let kept = self.kept.lock().unwrap().take();
        let recomputed;
        let (ungated, states): (&[T], &[T]) = match &kept {
            Some((u, s)) => (T::cpu_storage_as_slice(u)?, T::cpu_storage_as_slice(s)?),
            // The forward pass kept nothing (or a backward pass took it): run the SSD again.
            None => {
                recomputed = self.ssd().forward(&inp.x, &inp.dt, &inp.pack);
                (&recomputed.0, &recomputed.1)
            }
        };
        let mut dzx = zeros::<T>(zx.len());

        // The norm and the gate: dz into dzx, the gradient of the ungated y (followed by the
        // last state's) into dssd, the norm weight's summed over rows.
        let mut dssd = zeros::<T>(grad.len());
        dssd[rows * di..].copy_from_slice(&grad[rows * di..]);
        let group = di / d.s.groups;
        let dnw_len = if self.norm_eps.is_some() { di } else { 0 };
        let blocks = dzx.par_chunks_mut(BLOCK * row).zip(dssd[..rows * di].par_chunks_mut(BLOCK * di));
        let parts: Vec<Vec<T>> = blocks
            .enumerate()
            .map(|(blk, (dzx_blk, dy_blk))| {
                let mut dnw = vec![T::ZERO; dnw_len];
                let (mut gated, mut dg) = (vec![T::ZERO; dnw_len], vec![T::ZERO; dnw_len]);
                for (r, (dzx_row, dy)) in dzx_blk.chunks_mut(row).zip(dy_blk.chunks_mut(di)).enumerate() {
                    let i = blk * BLOCK + r;
                    let (u, z, g) = (&ungated[i * di..][..di], &zx[i * row..][..di], &grad[i * di..][..di]);
                    match (w.norm_w, self.norm_eps) {
                        (Some(nw), Some(eps)) => {
                            gate_span(u, z, &mut gated);
                            let parts = gated.chunks(group).zip(nw.chunks(group)).zip(g.chunks(group));
                            for (((x, nw), g), (dx, dw)) in parts.zip(dg.chunks_mut(group).zip(dnw.chunks_mut(group))) {
                                norm_row_grad(x, nw, g, eps, dx, dw);
                            }
                            gate_grad_span(u, z, &dg, dy, &mut dzx_row[..di]);
                        }
                        _ => gate_grad_span(u, z, g, dy, &mut dzx_row[..di]),
                    }
                }
                dnw
            })
            .collect();
        let d_norm_w = sum_in_order(parts, dnw_len);
        let (dx, ddt, dpack) = self.ssd().backward(&inp.x, &inp.dt, &inp.pack, states, &dssd);

        // dt: through the limits (no gradient where clamped) and the softplus.
        let (lo, hi) = (T::from_f64(self.dt_limit.0), T::from_f64(self.dt_limit.1));
        // Summed over every step: in f64, as the terms are many and cancel.
        let mut d_dt_bias = vec![0f64; heads];
        for (i, dzx_row) in dzx.chunks_mut(row).enumerate() {
            let raw = &zx[i * row + di + cd..][..heads];
            for h in 0..heads {
                let v = raw[h] + w.dt_bias[h];
                let sp = v.softplus::<Plain>();
                let g = if sp < lo || sp > hi { T::ZERO } else { ddt[i * heads + h] * v.sigmoid::<Plain>() };
                dzx_row[di + cd + h] = g;
                d_dt_bias[h] += g.to_f64();
            }
        }

        // The SiLU after the conv, then the conv itself, its taps transposed.
        let mut dpre = zeros::<T>(rows * cd);
        let (db_all, dc_all) = dpack[heads + heads * headdim..].split_at(rows * bc);
        // The gradient of the conv's activations, a row of [dx | dB | dC], through the SiLU.
        let dpre_rows = dpre.par_chunks_mut(cd).enumerate().with_min_len(8);
        dpre_rows.for_each_init(
            || vec![T::ZERO; cd],
            |g, (i, out)| {
                g[..di].copy_from_slice(&dx[i * di..][..di]);
                g[di..di + bc].copy_from_slice(&db_all[i * bc..][..bc]);
                g[di + bc..].copy_from_slice(&dc_all[i * bc..][..bc]);
                silu_grad(&inp.pre[i * cd..][..cd], g, out);
            },
        );
        dzx.par_chunks_mut(row).enumerate().with_min_len(8).for_each(|(i, dzx_row)| {
            let t = i % len;
            let out = &mut dzx_row[di..di + cd];
            // Input step t feeds output steps t .. t + k - 1 through taps k - 1 .. 0.
            for j in 0..k.min(len - t) {
                mul_add_to(&w.conv_t[(k - 1 - j) * cd..][..cd], &dpre[(i + j) * cd..][..cd], out);
            }
        });
        let parts: Vec<(Vec<T>, Vec<T>)> = (0..rows.div_ceil(BLOCK))
            .into_par_iter()
            .map(|blk| {
                let (mut dw, mut db) = (vec![T::ZERO; k * cd], vec![T::ZERO; cd]);
                for i in blk * BLOCK..rows.min((blk + 1) * BLOCK) {
                    let (t, g) = (i % len, &dpre[i * cd..][..cd]);
                    for j in (k - 1).saturating_sub(t)..k {
                        let src = &zx[(i + j + 1 - k) * row + di..][..cd];
                        mul_add_to(g, src, &mut dw[j * cd..][..cd]);
                    }
                    db.iter_mut().zip(g).for_each(|(b, &v)| *b += v);
                }
                (dw, db)
            })
            .collect();
        let (dw_parts, db_parts): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let (dw_t, dcb) = (sum_in_order(dw_parts, k * cd), sum_in_order(db_parts, cd));

        let mut dwpack: Vec<T> = (0..cd * k).map(|i| dw_t[(i % k) * cd + i / k]).collect();
        if d.has_bias {
            dwpack.extend(dcb);
        }
        dwpack.extend(d_dt_bias.into_iter().map(T::from_f64));
        // A = -exp(A_log): dA_log = dA A.
        dwpack.extend(dpack[..heads].iter().zip(w.a_log).map(|(&g, &a)| -g * a.exp::<Plain>()));
        // D was repeated over headdim for the SSD.
        dwpack.extend(
            dpack[heads..heads + heads * headdim].chunks(headdim).map(|c| c.iter().fold(T::ZERO, |s, &v| s + v)),
        );
        dwpack.extend(d_norm_w);
        Ok((dzx, dwpack))
    }
}
