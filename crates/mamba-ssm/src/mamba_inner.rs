//! One route of the Mamba-1 mixer as one op, as mamba_ssm's `mamba_inner_fn` does it (with
//! checkpoint_lvl 1): from xz as in_proj makes it, (batch, len, 2 d_inner) in sequence order,
//! to the gated output in sequence order. Conv + SiLU, x_proj, dt_proj, the selective scan with
//! softplus, D skip and z gate run in one forward pass, and the backward pass is written by hand:
//! it recomputes the conv output and delta instead of keeping them.
//!
//! A route visits the positions in the order `order[t]`; the op reads and writes through that
//! index, so a reversed or permuted route needs no gathered copy of its input or output.
//!
//! Per batch row the kernel works channel-major, (channels, len), the layout of the scan:
//!   x[c, t] = xz[order[t], c],  u = silu(conv(x)),  x_dbl = x_proj · u  (dt_rank + 2 state, len),
//!   delta = dt_proj · x_dbl[..dt_rank],  y = scan(u, delta, A, B = x_dbl[dt_rank..], C, D),
//!   out[order[t], c] = y[c, t] silu(xz[order[t], d_inner + c]).

use crate::conv::{silu_grad, silu_in_place};
use crate::cpu::{gemm, sum_in_order, zeros, Flat, FlatOp2, Mat, View3};
use crate::error::{argument, check, dims, Result};
use crate::gate::{gate_grad_span, gate_span};
use crate::math::{madd, simd_fn, Real};
use crate::selective_scan::{compute_dtype, Dims, ScanOp};
use crate::{causal_conv1d, causal_conv1d_ref, selective_scan, selective_scan_ref, ScanParams};
use candle_core::{Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::any::Any;
use std::sync::Mutex;

/// The parameters of one route's SSM, with transformers' names and shapes.
#[derive(Clone, Copy, Debug)]
pub struct InnerWeights<'a> {
    /// conv1d.weight: (d_inner, 1, d_conv).
    pub conv_weight: &'a Tensor,
    /// conv1d.bias: (d_inner).
    pub conv_bias: Option<&'a Tensor>,
    /// x_proj.weight: (dt_rank + 2 d_state, d_inner).
    pub x_proj: &'a Tensor,
    /// dt_proj.weight: (d_inner, dt_rank).
    pub dt_proj: &'a Tensor,
    /// dt_proj.bias: (d_inner), added to delta before the softplus.
    pub dt_bias: &'a Tensor,
    /// A_log: (d_inner, d_state); A = -exp(A_log).
    pub a_log: &'a Tensor,
    /// D: (d_inner).
    pub d: &'a Tensor,
}

/// The output of one route.
#[derive(Debug, Clone)]
pub struct InnerOutput {
    /// The gated output in sequence order: (batch, len, d_inner).
    pub y: Tensor,
    /// The SSM state after the route's last step: (batch, d_inner, d_state).
    pub last_state: Tensor,
    /// The conv's last d_conv inputs in route order, zeros in front of a short sequence:
    /// (batch, d_inner, d_conv).
    pub conv_state: Tensor,
}

/// The sizes of the op.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    batch: usize,
    len: usize,
    /// d_inner.
    di: usize,
    /// d_conv.
    k: usize,
    /// dt_rank.
    r: usize,
    /// d_state.
    n: usize,
}

impl Sizes {
    /// Rows of x_dbl: dt_rank + 2 d_state.
    fn rows(&self) -> usize {
        self.r + 2 * self.n
    }
}

fn check_inputs(xz: &Tensor, w: &InnerWeights, order: Option<&[u32]>) -> Result<Sizes> {
    let [batch, len, two_di] = dims("xz", xz, ["batch", "len", "2 d_inner"])?;
    if len == 0 {
        return Err(argument("xz", "the sequence length must be at least 1"));
    }
    if two_di % 2 != 0 {
        return Err(argument("xz", format!("the last dimension ({two_di}) must be 2 d_inner, an even number")));
    }
    let di = two_di / 2;
    let k = *w.conv_weight.dims().last().unwrap_or(&0);
    check("conv weight", w.conv_weight, &[("d_inner", di), ("1", 1), ("d_conv", k)])?;
    if k == 0 {
        return Err(argument("conv weight", "the kernel width must be at least 1"));
    }
    let [_, r] = dims("dt_proj", w.dt_proj, ["d_inner", "dt_rank"])?;
    check("dt_proj", w.dt_proj, &[("d_inner", di), ("dt_rank", r)])?;
    let [_, n] = dims("A_log", w.a_log, ["d_inner", "d_state"])?;
    check("A_log", w.a_log, &[("d_inner", di), ("d_state", n)])?;
    check("x_proj", w.x_proj, &[("dt_rank + 2 d_state", r + 2 * n), ("d_inner", di)])?;
    for (name, t) in [("conv bias", w.conv_bias), ("dt_bias", Some(w.dt_bias)), ("D", Some(w.d))] {
        if let Some(t) = t {
            check(name, t, &[("d_inner", di)])?;
        }
    }
    check_order(order, len)?;
    Ok(Sizes { batch, len, di, k, r, n })
}

/// A route's order must visit each of the len positions once.
pub(crate) fn check_order(order: Option<&[u32]>, len: usize) -> Result<()> {
    if let Some(order) = order {
        let mut seen = vec![false; len];
        let ok = order.len() == len
            && order.iter().all(|&p| seen.get_mut(p as usize).is_some_and(|s| !std::mem::replace(s, true)));
        if !ok {
            return Err(argument("order", format!("must be a permutation of 0..{len}")));
        }
    }
    Ok(())
}

/// The route of x given as xz (batch, len, 2 d_inner) in sequence order, through the weights:
/// the fused CPU op (f32 or f64; other float types compute in f32) for batches of at least as
/// many rows as threads, else (a prompt, or a GPU) the composition of the conv and scan kernels. `order` is the route (the identity when `None`). Differentiable
/// in xz and every weight.
pub fn mamba_inner(xz: &Tensor, w: &InnerWeights, order: Option<&[u32]>) -> Result<InnerOutput> {
    let s = check_inputs(xz, w, order)?;
    // The op runs a batch row per task; fewer rows than threads (a prompt) would leave threads
    // idle in its conv and projections, where the composition's ops use them all (measured at
    // mamba-130m's 512-token prefill: 7.0 against 5.9 ms per layer).
    if !xz.device().is_cpu() || s.batch < rayon::current_num_threads() {
        return composed(xz, w, order, false);
    }
    let dt = compute_dtype(xz);
    let cast = |t: &Tensor| Ok::<_, crate::Error>(t.to_dtype(dt)?.flatten_all()?);
    let conv_bias = match w.conv_bias {
        Some(b) => cast(b)?,
        None => Tensor::zeros(s.di, dt, xz.device())?,
    };
    let pack = Tensor::cat(
        &[
            cast(w.conv_weight)?,
            conv_bias,
            cast(w.x_proj)?,
            cast(w.dt_proj)?,
            cast(w.dt_bias)?,
            cast(w.a_log)?,
            cast(w.d)?,
        ],
        0,
    )?;
    let xz_c = xz.to_dtype(dt)?.contiguous()?;
    let op = InnerOp {
        s,
        order: order.map(<[u32]>::to_vec),
        keep: xz_c.track_op() || pack.track_op(),
        saved: Mutex::new(None),
    };
    let out = xz_c.apply_op2(&pack, Flat(op))?;
    let Sizes { batch, len, di, k, n, .. } = s;
    let (ny, ns) = (batch * len * di, batch * di * n);
    let part = |start: usize, size: usize, shape: (usize, usize, usize)| -> Result<Tensor> {
        Ok(out.narrow(0, start, size)?.reshape(shape)?.to_dtype(xz.dtype())?)
    };
    Ok(InnerOutput {
        y: part(0, ny, (batch, len, di))?,
        last_state: part(ny, ns, (batch, di, n))?,
        conv_state: part(ny + ns, batch * di * k, (batch, di, k))?,
    })
}

/// The reference: the same route composed of candle ops and the plain-loop conv and scan
/// references (gather, conv, projections, scan, scatter), differentiated by candle.
pub fn mamba_inner_ref(xz: &Tensor, w: &InnerWeights, order: Option<&[u32]>) -> Result<InnerOutput> {
    check_inputs(xz, w, order)?;
    composed(xz, w, order, true)
}

/// The unfused route: with the plain references (`reference`) or the conv and scan kernels.
fn composed(xz: &Tensor, w: &InnerWeights, order: Option<&[u32]>, reference: bool) -> Result<InnerOutput> {
    let (di, len) = (xz.dim(2)? / 2, xz.dim(1)?);
    let (r, n, k) = (w.dt_proj.dim(1)?, w.a_log.dim(1)?, w.conv_weight.dim(2)?);
    let index = |o: &[u32]| Tensor::new(o, &Device::Cpu)?.to_device(xz.device());
    let routed = match order {
        Some(o) => xz.contiguous()?.index_select(&index(o)?, 1)?,
        None => xz.clone(),
    };
    let (x, z) = (routed.narrow(2, 0, di)?.transpose(1, 2)?, routed.narrow(2, di, di)?.transpose(1, 2)?);
    let u = if reference {
        causal_conv1d_ref(&x, w.conv_weight, w.conv_bias, true)?
    } else {
        causal_conv1d(&x, w.conv_weight, w.conv_bias, true)?
    };
    // The projections may be held in bf16 or f16 (a language model's matrices): widened here.
    let (x_proj, dt_proj) = (w.x_proj.to_dtype(u.dtype())?, w.dt_proj.to_dtype(u.dtype())?);
    let x_dbl = u.transpose(1, 2)?.broadcast_matmul(&x_proj.t()?)?;
    let delta = x_dbl.narrow(2, 0, r)?.broadcast_matmul(&dt_proj.t()?)?.transpose(1, 2)?;
    let (b, c) = (x_dbl.narrow(2, r, n)?.transpose(1, 2)?, x_dbl.narrow(2, r + n, n)?.transpose(1, 2)?);
    let a = w.a_log.exp()?.neg()?;
    let p = ScanParams { d: Some(w.d), z: Some(&z), delta_bias: Some(w.dt_bias), delta_softplus: true };
    let out = if reference {
        selective_scan_ref(&u.contiguous()?, &delta.contiguous()?, &a, &b.contiguous()?, &c.contiguous()?, &p, None)?
    } else {
        selective_scan(&u, &delta, &a, &b, &c, &p, None)?
    };
    let mut y = out.y.transpose(1, 2)?;
    if let Some(o) = order {
        let mut inverse = vec![0u32; o.len()];
        for (i, &p) in o.iter().enumerate() {
            inverse[p as usize] = i as u32;
        }
        y = y.contiguous()?.index_select(&index(&inverse)?, 1)?;
    }
    let conv_state = if len < k { x.pad_with_zeros(2, k - len, 0)? } else { x.narrow(2, len - k, k)? };
    Ok(InnerOutput { y, last_state: out.last_state, conv_state: conv_state.contiguous()? })
}

/// The custom op: arguments xz (batch, len, 2 d_inner), contiguous, and the packed weights
/// [conv weight | conv bias | x_proj | dt_proj | dt_bias | A_log | D]; result the flat
/// [y (batch, len, d_inner) | last state (batch, d_inner, d_state) | conv state (batch, d_inner, d_conv)].
struct InnerOp {
    s: Sizes,
    order: Option<Vec<u32>>,
    /// Whether the forward pass keeps what the backward pass needs.
    keep: bool,
    /// [`Saved`] of the forward pass.
    saved: Mutex<Option<Box<dyn Any + Send>>>,
}

/// What the backward pass takes from the forward pass: x_dbl (batch, rows, len), the scan's
/// ungated output (batch, d_inner, len) and the scan op with its state checkpoints.
struct Saved<T> {
    x_dbl: Vec<T>,
    y: Vec<T>,
    scan: ScanOp,
}

/// The packed weights, unpacked.
struct Weights<'a, T> {
    conv_w: &'a [T],
    conv_b: &'a [T],
    x_proj: &'a [T],
    dt_proj: &'a [T],
    dt_bias: &'a [T],
    a_log: &'a [T],
    d: &'a [T],
}

/// The per-row inputs of the scan, recomputed from xz: x in route order, the conv's
/// pre-activation and u = silu of it, all (d_inner, len).
struct Conv<T> {
    x: Vec<T>,
    pre: Vec<T>,
    u: Vec<T>,
}

/// Time steps transposed together: the channel-major side is written or read in runs of this
/// many, the step rows' cache lines staying in L1 across the channels.
const STEPS: usize = 16;

/// cols[c * len + t] = rows[row(t) * stride + c] for c < width: time-step rows (channels
/// contiguous, in any order) to channel-major.
fn rows_to_cols<T: Copy>(
    rows: &[T],
    stride: usize,
    row: impl Fn(usize) -> usize,
    width: usize,
    len: usize,
    cols: &mut [T],
) {
    for t0 in (0..len).step_by(STEPS) {
        let t1 = (t0 + STEPS).min(len);
        let mut starts = [0; STEPS];
        for (s, t) in starts.iter_mut().zip(t0..t1) {
            *s = row(t) * stride;
        }
        for c in 0..width {
            for (d, &s) in cols[c * len + t0..c * len + t1].iter_mut().zip(&starts) {
                *d = rows[s + c];
            }
        }
    }
}

/// The inverse: rows[row(t) * stride + c] = cols[c * len + t].
fn cols_to_rows<T: Copy>(
    cols: &[T],
    stride: usize,
    row: impl Fn(usize) -> usize,
    width: usize,
    len: usize,
    rows: &mut [T],
) {
    for t0 in (0..len).step_by(STEPS) {
        let t1 = (t0 + STEPS).min(len);
        let mut starts = [0; STEPS];
        for (s, t) in starts.iter_mut().zip(t0..t1) {
            *s = row(t) * stride;
        }
        for c in 0..width {
            for (&v, &s) in cols[c * len + t0..c * len + t1].iter().zip(&starts) {
                rows[s + c] = v;
            }
        }
    }
}

simd_fn! {
    /// One channel of the causal conv: out[t] = bias + sum_j w[j] x[t + j - (k - 1)], the taps
    /// before t = 0 reading zeros.
    fn conv_channel<T, S>(x: &[T], w: &[T], bias: T, out: &mut [T]) {
        out.fill(bias);
        let (k, len) = (w.len(), x.len());
        for (j, &wj) in w.iter().enumerate() {
            let shift = k - 1 - j;
            if shift < len {
                for (o, &v) in out[shift..].iter_mut().zip(x) {
                    *o = madd::<T, S>(wj, v, *o);
                }
            }
        }
    }
}

simd_fn! {
    /// Its backward for d(pre-activation) dp: x[t] feeds out[t + k - 1 - j] through tap j. Sets
    /// dx, adds to dw and db.
    fn conv_channel_grad<T, S>(x: &[T], w: &[T], dp: &[T], dx: &mut [T], dw: &mut [T], db: &mut T) {
        let (k, len) = (w.len(), x.len());
        dx.fill(T::ZERO);
        for (j, &wj) in w.iter().enumerate() {
            let shift = k - 1 - j;
            if shift < len {
                let mut s = T::ZERO;
                for ((d, &g), &xv) in dx.iter_mut().zip(&dp[shift..]).zip(x) {
                    *d = madd::<T, S>(wj, g, *d);
                    s = madd::<T, S>(g, xv, s);
                }
                dw[j] += s;
            }
        }
        let mut s = T::ZERO;
        for &g in dp {
            s += g;
        }
        *db += s;
    }
}

impl InnerOp {
    fn unpack<'a, T>(&self, pack: &'a [T]) -> Weights<'a, T> {
        let Sizes { di, k, r, n, .. } = self.s;
        let mut rest = pack;
        let mut take = |size: usize| {
            let (head, tail) = rest.split_at(size);
            rest = tail;
            head
        };
        Weights {
            conv_w: take(di * k),
            conv_b: take(di),
            x_proj: take(self.s.rows() * di),
            dt_proj: take(di * r),
            dt_bias: take(di),
            a_log: take(di * n),
            d: take(di),
        }
    }

    /// The position the route visits at step t.
    fn pos(&self, t: usize) -> usize {
        self.order.as_ref().map_or(t, |o| o[t] as usize)
    }

    /// Batch row `xz_b` (len, 2 d_inner): x in route order, the conv and u.
    fn conv<T: Real>(&self, w: &Weights<T>, xz_b: &[T]) -> Conv<T> {
        let Sizes { len, di, k, .. } = self.s;
        let mut x = vec![T::ZERO; di * len];
        rows_to_cols(xz_b, 2 * di, |t| self.pos(t), di, len, &mut x);
        let mut pre = vec![T::ZERO; di * len];
        for c in 0..di {
            conv_channel(&x[c * len..][..len], &w.conv_w[c * k..][..k], w.conv_b[c], &mut pre[c * len..][..len]);
        }
        let mut u = pre.clone();
        silu_in_place(&mut u);
        Conv { x, pre, u }
    }

    /// The scan op over the whole batch (one group), keeping its checkpoints when asked.
    fn scan_op(&self, keep_checkpoints: bool) -> ScanOp {
        let Sizes { batch, len, di, n, .. } = self.s;
        ScanOp {
            dims: Dims { batch, dim: di, len, state: n, groups: 1 },
            has_d: true,
            has_bias: true,
            has_h0: false,
            softplus: true,
            keep_checkpoints,
            checkpoints: Mutex::new(None),
        }
    }

    /// The scan's packed parameters [A | B (batch, state, len) | C | D | dt_bias] from x_dbl.
    fn scan_pack<T: Real>(&self, w: &Weights<T>, x_dbl: &[T]) -> Vec<T> {
        let Sizes { len, r, n, .. } = self.s;
        let rows = self.s.rows();
        let mut pack: Vec<T> = w.a_log.iter().map(|&a| -a.exp::<crate::math::Plain>()).collect();
        for first in [r, r + n] {
            for xb in x_dbl.chunks(rows * len) {
                pack.extend_from_slice(&xb[first * len..(first + n) * len]);
            }
        }
        pack.extend_from_slice(w.d);
        pack.extend_from_slice(w.dt_bias);
        pack
    }

    /// Per batch row: u and delta before its bias, both (d_inner, len), and x_dbl (rows, len)
    /// (computed here unless given), with the conv state written to `conv_state` (d_inner, d_conv);
    /// the convs of the rows too when x_dbl is given (the backward pass needs them).
    #[allow(clippy::type_complexity)]
    fn inputs<T: Real>(
        &self,
        w: &Weights<T>,
        xz: &[T],
        x_dbl: Option<&[T]>,
    ) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<Conv<T>>) {
        let Sizes { batch, len, di, k, r, .. } = self.s;
        let rows = self.s.rows();
        let (mut u, mut delta, mut conv_state) =
            (zeros(batch * di * len), zeros(batch * di * len), zeros(batch * di * k));
        let mut xd = match x_dbl {
            Some(v) => v.to_vec(),
            None => zeros(batch * rows * len),
        };
        let compute = x_dbl.is_none();
        let parts = (u.par_chunks_mut(di * len), delta.par_chunks_mut(di * len), xd.par_chunks_mut(rows * len));
        let convs = parts.into_par_iter().zip(conv_state.par_chunks_mut(di * k)).enumerate().filter_map(
            |(b, ((u_b, delta_b, xd_b), cs_b))| {
                let conv = self.conv(w, &xz[b * len * 2 * di..][..len * 2 * di]);
                for c in 0..di {
                    for j in 0..k {
                        // The last k inputs in route order: step len - k + j.
                        if len + j >= k {
                            cs_b[c * k + j] = conv.x[c * len + len + j - k];
                        }
                    }
                }
                if compute {
                    gemm(rows, len, di, xd_b, len, false, Mat::rows(w.x_proj, di), Mat::rows(&conv.u, len));
                }
                gemm(di, len, r, delta_b, len, false, Mat::rows(w.dt_proj, r), Mat::rows(xd_b, len));
                u_b.copy_from_slice(&conv.u);
                (!compute).then_some(conv)
            },
        );
        // In batch-row order (rayon's collect keeps it); empty when x_dbl was computed here.
        let convs = convs.collect();
        (u, delta, xd, conv_state, convs)
    }
}

impl FlatOp2 for InnerOp {
    const NAME: &'static str = "mamba-inner";

    fn out_shape(&self, _: &Layout) -> Shape {
        let Sizes { batch, len, di, k, n, .. } = self.s;
        Shape::from(batch * (len * di + di * n + di * k))
    }

    fn fwd<T: Real>(&self, xz: &[T], pack: &[T]) -> Vec<T> {
        let Sizes { batch, len, di, n, .. } = self.s;
        let w = self.unpack(pack);
        let (u, delta, x_dbl, conv_state, _) = self.inputs(&w, xz, None);
        let scan = self.scan_op(self.keep);
        let mut y = scan.fwd(
            View3::from_slice(&u, [batch, di, len]),
            View3::from_slice(&delta, [batch, di, len]),
            &self.scan_pack(&w, &x_dbl),
        );
        let last_state = y.split_off(batch * di * len);
        let mut out = zeros(batch * len * di);
        out.par_chunks_mut(len * di).enumerate().for_each_init(
            || vec![T::ZERO; len * di],
            |y_rows, (b, out_b)| {
                cols_to_rows(&y[b * di * len..][..di * len], di, |t| t, di, len, y_rows);
                for (t, y_t) in y_rows.chunks(di).enumerate() {
                    let p = self.pos(t);
                    let z = &xz[(b * len + p) * 2 * di + di..][..di];
                    gate_span(y_t, z, &mut out_b[p * di..][..di]);
                }
            },
        );
        debug_assert_eq!(last_state.len(), batch * di * n);
        out.extend(last_state);
        out.extend(conv_state);
        if self.keep {
            *self.saved.lock().unwrap() = Some(Box::new(Saved { x_dbl, y, scan }));
        }
        out
    }

    /// (dxz, dpack) from the gradient of the flat result.
    fn bwd<T: Real>(&self, xz: &[T], pack: &[T], grad: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let Sizes { batch, len, di, k, r, n } = self.s;
        let rows = self.s.rows();
        let saved = match self.saved.lock().unwrap().take().map(|b| b.downcast::<Saved<T>>()) {
            Some(Ok(s)) => *s,
            // The forward pass kept nothing (or a backward pass took it): run it again.
            _ => {
                let op = InnerOp { keep: true, saved: Mutex::new(None), order: self.order.clone(), ..*self };
                op.fwd(xz, pack);
                *op.saved.into_inner().unwrap().unwrap().downcast().unwrap()
            }
        };
        let w = self.unpack(pack);
        let (g_out, rest) = grad.split_at(batch * len * di);
        let (g_last, g_conv) = rest.split_at(batch * di * n);
        let (u, delta, _, _, convs) = self.inputs(&w, xz, Some(&saved.x_dbl));
        debug_assert_eq!(convs.len(), batch, "one conv per batch row");
        // The gate: dz into dxz, dy (batch, d_inner, len) for the scan.
        let mut dxz = zeros(batch * len * 2 * di);
        let mut dy = zeros(batch * di * len + batch * di * n);
        dy[batch * di * len..].copy_from_slice(g_last);
        dxz.par_chunks_mut(len * 2 * di).zip(dy.par_chunks_mut(di * len)).enumerate().for_each_init(
            || (vec![T::ZERO; len * di], vec![T::ZERO; len * di]),
            |(y_rows, dy_rows), (b, (dxz_b, dy_b))| {
                cols_to_rows(&saved.y[b * di * len..][..di * len], di, |t| t, di, len, y_rows);
                for (t, (y_t, dy_t)) in y_rows.chunks(di).zip(dy_rows.chunks_mut(di)).enumerate() {
                    let p = self.pos(t);
                    let z = &xz[(b * len + p) * 2 * di + di..][..di];
                    let g = &g_out[(b * len + p) * di..][..di];
                    gate_grad_span(y_t, z, g, dy_t, &mut dxz_b[p * 2 * di + di..][..di]);
                }
                rows_to_cols(dy_rows, di, |t| t, di, len, dy_b);
            },
        );
        let dims = [batch, di, len];
        let scan_pack = self.scan_pack(&w, &saved.x_dbl);
        let (du_scan, ddelta, dscan) =
            saved.scan.bwd(View3::from_slice(&u, dims), View3::from_slice(&delta, dims), &scan_pack, &dy);
        drop((u, delta, dy));
        // dscan = [dA | dB (batch, state, len) | dC | dD | d dt_bias].
        let (da, rest) = dscan.split_at(di * n);
        let (db, rest) = rest.split_at(batch * n * len);
        let (dc, rest) = rest.split_at(batch * n * len);
        let (dd, d_dt_bias) = rest.split_at(di);

        // Through the projections and the conv, one batch row per task; the weight gradients
        // of each row, then summed over the rows in order.
        let per_row: Vec<_> = dxz
            .par_chunks_mut(len * 2 * di)
            .zip(convs.into_par_iter())
            .enumerate()
            .map(|(b, (dxz_b, conv))| {
                let (mut dconv, mut dx_proj, mut ddt_proj) =
                    (vec![T::ZERO; di * k + di], vec![T::ZERO; rows * di], vec![T::ZERO; di * r]);
                let x_dbl = &saved.x_dbl[b * rows * len..][..rows * len];
                let ddelta_b = &ddelta[b * di * len..][..di * len];
                // d x_dbl = [dt_projᵀ · d delta; dB; dC].
                let mut dx_dbl = vec![T::ZERO; rows * len];
                gemm(r, len, di, &mut dx_dbl, len, false, Mat::rows(w.dt_proj, r).t(), Mat::rows(ddelta_b, len));
                dx_dbl[r * len..(r + n) * len].copy_from_slice(&db[b * n * len..][..n * len]);
                dx_dbl[(r + n) * len..].copy_from_slice(&dc[b * n * len..][..n * len]);
                gemm(di, r, len, &mut ddt_proj, r, true, Mat::rows(ddelta_b, len), Mat::rows(x_dbl, len).t());
                gemm(rows, di, len, &mut dx_proj, di, true, Mat::rows(&dx_dbl, len), Mat::rows(&conv.u, len).t());
                let mut du = du_scan[b * di * len..][..di * len].to_vec();
                gemm(di, len, rows, &mut du, len, true, Mat::rows(w.x_proj, di).t(), Mat::rows(&dx_dbl, len));
                let mut dpre = vec![T::ZERO; di * len];
                silu_grad(&conv.pre, &du, &mut dpre);
                // The conv: x[t] feeds pre[t + k - 1 - j] through tap j.
                let mut dx = vec![T::ZERO; di * len];
                let g_conv_b = &g_conv[b * di * k..][..di * k];
                let (dw, db) = dconv.split_at_mut(di * k);
                for c in 0..di {
                    let (dp, xc, dxc) = (&dpre[c * len..][..len], &conv.x[c * len..][..len], &mut dx[c * len..][..len]);
                    conv_channel_grad(xc, &w.conv_w[c * k..][..k], dp, dxc, &mut dw[c * k..][..k], &mut db[c]);
                    for j in 0..k {
                        if len + j >= k {
                            dxc[len + j - k] += g_conv_b[c * k + j];
                        }
                    }
                }
                cols_to_rows(&dx, 2 * di, |t| self.pos(t), di, len, dxz_b);
                (dconv, dx_proj, ddt_proj)
            })
            .collect();
        let mut parts = (Vec::new(), Vec::new(), Vec::new());
        for (a, b, c) in per_row {
            parts.0.push(a);
            parts.1.push(b);
            parts.2.push(c);
        }
        let dconv = sum_in_order(parts.0, di * k + di);
        let dx_proj = sum_in_order(parts.1, rows * di);
        let ddt_proj = sum_in_order(parts.2, di * r);
        // d A_log = dA A, with A = -exp(A_log).
        let da_log = da.iter().zip(w.a_log).map(|(&g, &a)| -g * a.exp::<crate::math::Plain>());
        let mut dpack = dconv;
        dpack.extend(dx_proj);
        dpack.extend(ddt_proj);
        dpack.extend_from_slice(d_dt_bias);
        dpack.extend(da_log);
        dpack.extend_from_slice(dd);
        Ok((dxz, dpack))
    }
}
