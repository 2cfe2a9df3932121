//! Mamba-2's SSD chunked scan on the CPU, forward and backward, as one op over chunks of
//! `CHUNK` steps: within a chunk the quadratic form as matrix products (the `gemm` crate),
//! between chunks the states.
//!
//! Per head, over one chunk, with cum_t = A (dt_1 + ... + dt_t) and K the chunk's last step:
//!   y_i = sum_{j <= i} (C_i . B_j) e^(cum_i - cum_j) dt_j x_j  +  e^(cum_i) S C_i
//!   S'  = e^(cum_K) S  +  sum_j e^(cum_K - cum_j) dt_j x_j B_j^T
//! where S is the (headdim, state) state at the chunk's start and S' the one at its end. Every
//! exponent is <= 0 for A < 0, so nothing overflows. The forward pass runs in three passes:
//! each chunk's own term of S' (parallel over chunks and heads), S from chunk to chunk
//! (elementwise), then the outputs (parallel over chunks, C B^T once per group). The backward
//! pass mirrors them: the state gradients from the last chunk back, then every input's gradient,
//! parallel over chunks again.

use crate::cpu::{gemm, zeros, Mat};
use crate::math::{madd, simd_fn, Plain, Real};
use crate::ssd::Sizes;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Steps per chunk, as in the CUDA kernels: the quadratic part costs CHUNK multiply-adds per
/// step and element of x, the state parts headdim x state, whatever the chunk.
const CHUNK: usize = 64;

/// The scan as a candle op over (x, effective dt, [A | D? | B | C | h0?]), all contiguous, to
/// the flat [y | final state], y with the skip D x (D per head and headdim) added. When a
/// backward pass may follow (`keep`), the op keeps the state at every chunk's start for it in
/// `kept`: (chunks + 1, batch, heads, headdim, state), slot-major.
///
/// With `log_decays`, the decays are their own input: the pack starts with one log decay per
/// step and head, (batch, len, heads) like dt, in place of A, and dt only weighs the inputs
/// (h_t = e^(log_decay_t) h_{t-1} + dt_t x_t B_t^T). Mamba-3's trapezoid is two such scans.
pub(crate) struct SsdOp {
    pub s: Sizes,
    pub log_decays: bool,
    pub has_d: bool,
    pub has_h0: bool,
    pub keep: bool,
    pub kept: Mutex<Option<CpuStorage>>,
}

/// The inputs, unpacked.
struct In<'a, T> {
    x: &'a [T],
    dt: &'a [T],
    /// A per head, or with `log_decays` the log decay per (batch, step, head).
    a: &'a [T],
    /// (heads, headdim).
    d: Option<&'a [T]>,
    b: &'a [T],
    c: &'a [T],
    h0: Option<&'a [T]>,
}

/// One head's view of one chunk: its first step, its length, dt and cum over its steps.
struct Chunk<T> {
    t0: usize,
    k: usize,
    dt: Vec<T>,
    cum: Vec<T>,
}

impl<T: Real> Chunk<T> {
    /// cum_K: the log of the decay over the whole chunk.
    fn total(&self) -> T {
        self.cum[self.k - 1]
    }
}

impl SsdOp {
    pub fn chunks(&self) -> usize {
        self.s.len.div_ceil(CHUNK)
    }

    pub fn x_len(&self) -> usize {
        self.s.batch * self.s.len * self.s.heads * self.s.headdim
    }

    /// Elements of one slot: the states of every batch row and head.
    pub fn slot_len(&self) -> usize {
        self.s.batch * self.s.heads * self.s.headdim * self.s.state
    }

    pub fn out_len(&self) -> usize {
        self.x_len() + self.slot_len()
    }

    /// The decays' share of the pack: A per head, or a log decay per step and head.
    fn decay_len(&self) -> usize {
        match self.log_decays {
            true => self.s.batch * self.s.len * self.s.heads,
            false => self.s.heads,
        }
    }

    fn head_state(&self) -> usize {
        self.s.headdim * self.s.state
    }

    fn group_of(&self, h: usize) -> usize {
        h / (self.s.heads / self.s.groups)
    }

    fn unpack<'a, T>(&self, x: &'a [T], dt: &'a [T], pack: &'a [T]) -> In<'a, T> {
        let Sizes { batch, len, heads, headdim, groups, state } = self.s;
        let bc = batch * len * groups * state;
        let (a, rest) = pack.split_at(self.decay_len());
        let (d, rest) = rest.split_at(if self.has_d { heads * headdim } else { 0 });
        let (b, rest) = rest.split_at(bc);
        let (c, h0) = rest.split_at(bc);
        In { x, dt, a, d: self.has_d.then_some(d), b, c, h0: self.has_h0.then_some(h0) }
    }

    /// Offset of x (or y, dy, dx) at (batch b, step t, head h).
    fn x_at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.s.len + t) * self.s.heads + h) * self.s.headdim
    }

    /// Offset of B (or C) at (batch b, step t, group g).
    fn bc_at(&self, b: usize, t: usize, g: usize) -> usize {
        ((b * self.s.len + t) * self.s.groups + g) * self.s.state
    }

    /// Steps t0.. of head h of x (or dy) as the rows of a matrix.
    fn x_rows<'a, T>(&self, x: &'a [T], b: usize, t0: usize, h: usize) -> Mat<'a, T> {
        Mat::rows(&x[self.x_at(b, t0, h)..], self.s.heads * self.s.headdim)
    }

    /// Steps t0.. of group g of B (or C) as the rows of a matrix.
    fn bc_rows<'a, T>(&self, bc: &'a [T], b: usize, t0: usize, g: usize) -> Mat<'a, T> {
        Mat::rows(&bc[self.bc_at(b, t0, g)..], self.s.groups * self.s.state)
    }

    fn chunk<T: Real>(&self, inp: &In<T>, b: usize, c: usize, h: usize) -> Chunk<T> {
        let (len, heads) = (self.s.len, self.s.heads);
        let t0 = c * CHUNK;
        let k = CHUNK.min(len - t0);
        let at = |t: usize| (b * len + t0 + t) * heads + h;
        let dt: Vec<T> = (0..k).map(|t| inp.dt[at(t)]).collect();
        // In f64: the exponents are differences of these running sums.
        let mut acc = 0f64;
        let mut sum = |log_decay: f64| {
            acc += log_decay;
            T::from_f64(acc)
        };
        let cum = match self.log_decays {
            true => (0..k).map(|t| sum(inp.a[at(t)].to_f64())).collect(),
            false => dt.iter().map(|&d| sum(d.to_f64() * inp.a[h].to_f64())).collect(),
        };
        Chunk { t0, k, dt, cum }
    }

    /// The k steps of head h from `x` (or dy), each scaled: row t times scale(t).
    fn scaled_rows<T: Real>(
        &self,
        x: &[T],
        b: usize,
        t0: usize,
        k: usize,
        h: usize,
        scale: impl Fn(usize) -> T,
    ) -> Vec<T> {
        let p = self.s.headdim;
        let mut out = Vec::with_capacity(k * p);
        for t in 0..k {
            let w = scale(t);
            out.extend(x[self.x_at(b, t0 + t, h)..][..p].iter().map(|&v| w * v));
        }
        out
    }

    /// C B^T of group g over the k steps from t0: (k, k), row-major.
    fn cb<T: Real>(&self, inp: &In<T>, b: usize, t0: usize, k: usize, g: usize) -> Vec<T> {
        let mut cb = vec![T::ZERO; k * k];
        let n = self.s.state;
        gemm(k, k, n, &mut cb, k, false, self.bc_rows(inp.c, b, t0, g), self.bc_rows(inp.b, b, t0, g).t());
        cb
    }

    /// Cuts a (batch, len, per_step) buffer into its chunks, in (batch, chunk) order.
    fn chunk_parts<'a, T>(&self, buf: &'a mut [T], per_step: usize) -> Vec<&'a mut [T]> {
        buf.chunks_mut(self.s.len * per_step).flat_map(|row| row.chunks_mut(CHUNK * per_step)).collect()
    }

    /// [y | final state], and the states at the chunks' starts.
    pub fn forward<T: Real>(&self, x: &[T], dt: &[T], pack: &[T]) -> (Vec<T>, Vec<T>) {
        let inp = self.unpack(x, dt, pack);
        let mut states = zeros((self.chunks() + 1) * self.slot_len());
        self.pass_states(&inp, &mut states);
        let mut out = zeros::<T>(self.out_len());
        let (y, last) = out.split_at_mut(self.x_len());
        self.outputs(&inp, &states, y);
        last.copy_from_slice(&states[self.chunks() * self.slot_len()..]);
        (out, states)
    }

    /// Fills `states` (chunks + 1 slots) with the state at every chunk's start and the final one.
    fn pass_states<T: Real>(&self, inp: &In<T>, states: &mut [T]) {
        let Sizes { batch, heads, headdim, state, .. } = self.s;
        let (slot, hs) = (self.slot_len(), self.head_state());
        let (first, ends) = states.split_at_mut(slot);
        if let Some(h0) = inp.h0 {
            first.copy_from_slice(h0);
        }
        // Each chunk's own term of the state at its end, sum_j w_j x_j B_j^T.
        ends.par_chunks_mut(hs).enumerate().for_each(|(i, s)| {
            let (c, b, h) = (i / (batch * heads), i / heads % batch, i % heads);
            let ch = self.chunk(inp, b, c, h);
            let total = ch.total();
            let xw = self.scaled_rows(inp.x, b, ch.t0, ch.k, h, |t| (total - ch.cum[t]).exp::<Plain>() * ch.dt[t]);
            let bm = self.bc_rows(inp.b, b, ch.t0, self.group_of(h));
            gemm(headdim, state, ch.k, s, state, false, Mat::rows(&xw, headdim).t(), bm);
        });
        for c in 0..self.chunks() {
            let (done, next) = states.split_at_mut((c + 1) * slot);
            let rows = next[..slot].par_chunks_mut(hs).zip(done[c * slot..].par_chunks(hs));
            rows.enumerate().for_each(|(bh, (s, prev))| {
                let decay = self.chunk(inp, bh / heads, c, bh % heads).total().exp::<Plain>();
                axpy(decay, prev, s);
            });
        }
    }

    /// y from the inputs and the state at every chunk's start.
    fn outputs<T: Real>(&self, inp: &In<T>, states: &[T], y: &mut [T]) {
        let Sizes { heads, headdim, groups, state, .. } = self.s;
        let (chunks, hs, row) = (self.chunks(), self.head_state(), heads * headdim);
        self.chunk_parts(y, row).into_par_iter().enumerate().for_each(|(i, yc)| {
            let (b, c) = (i / chunks, i % chunks);
            let (t0, k) = (c * CHUNK, yc.len() / row);
            for g in 0..groups {
                let cb = self.cb(inp, b, t0, k, g);
                for h in (0..heads).filter(|&h| self.group_of(h) == g) {
                    let ch = self.chunk(inp, b, c, h);
                    let (mut decay, mut l) = (vec![T::ZERO; k * k], vec![T::ZERO; k * k]);
                    decay_lower(&ch.cum, &ch.dt, &cb, &mut decay, &mut l);
                    gemm(
                        k,
                        headdim,
                        k,
                        &mut yc[h * headdim..],
                        row,
                        false,
                        Mat::rows(&l, k),
                        self.x_rows(inp.x, b, t0, h),
                    );
                    let ce = self.scaled_c(inp, b, &ch, g);
                    let s = &states[c * self.slot_len() + (b * heads + h) * hs..][..hs];
                    gemm(
                        k,
                        headdim,
                        state,
                        &mut yc[h * headdim..],
                        row,
                        true,
                        Mat::rows(&ce, state),
                        Mat::rows(s, state).t(),
                    );
                    if let Some(d) = inp.d {
                        let d = &d[h * headdim..][..headdim];
                        for t in 0..k {
                            let yt = &mut yc[t * row + h * headdim..][..headdim];
                            let xt = &inp.x[self.x_at(b, t0 + t, h)..];
                            mul_add_to(d, &xt[..headdim], yt);
                        }
                    }
                }
            }
        });
    }

    /// Rows e^(cum_t) C_t of the chunk, (k, state).
    fn scaled_c<T: Real>(&self, inp: &In<T>, b: usize, ch: &Chunk<T>, g: usize) -> Vec<T> {
        let n = self.s.state;
        let mut out = Vec::with_capacity(ch.k * n);
        for t in 0..ch.k {
            let e = ch.cum[t].exp::<Plain>();
            out.extend(inp.c[self.bc_at(b, ch.t0 + t, g)..][..n].iter().map(|&v| e * v));
        }
        out
    }

    /// (dx, ddt, dpack) for the gradient `grad` of the result, given the kept states.
    pub fn backward<T: Real>(
        &self,
        x: &[T],
        dt: &[T],
        pack: &[T],
        states: &[T],
        grad: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Sizes { batch, len, heads, headdim, groups, state } = self.s;
        let inp = self.unpack(x, dt, pack);
        let (dy, dlast) = grad.split_at(self.x_len());
        let mut ds = zeros(states.len());
        ds[self.chunks() * self.slot_len()..].copy_from_slice(dlast);
        self.pass_state_grads(&inp, dy, &mut ds);
        let (mut dx, mut ddt) = (zeros(x.len()), zeros(dt.len()));
        let (mut db, mut dc) = (zeros(batch * len * groups * state), zeros(batch * len * groups * state));
        // dA per (batch row, chunk) and head, summed below; or the log decays' own gradient.
        let mut da_parts =
            vec![T::ZERO; if self.log_decays { self.decay_len() } else { batch * self.chunks() * heads }];
        let da_chunks: Vec<&mut [T]> = match self.log_decays {
            true => self.chunk_parts(&mut da_parts, heads),
            false => da_parts.chunks_mut(heads).collect(),
        };
        let dd_len = if self.has_d { heads * headdim } else { 0 };
        let mut dd_parts = vec![T::ZERO; batch * self.chunks() * dd_len];
        let parts: Vec<_> = self
            .chunk_parts(&mut dx, heads * headdim)
            .into_iter()
            .zip(self.chunk_parts(&mut ddt, heads))
            .zip(self.chunk_parts(&mut db, groups * state))
            .zip(self.chunk_parts(&mut dc, groups * state))
            .zip(da_chunks)
            .zip(dd_parts.chunks_mut(dd_len.max(1)).map(Some).chain(std::iter::repeat_with(|| None)))
            .map(|(((((dx, ddt), db), dc), da), dd)| Grads { dx, ddt, db, dc, da, dd })
            .collect();
        parts
            .into_par_iter()
            .enumerate()
            .for_each(|(i, g)| self.chunk_grads(&inp, dy, states, &ds, i / self.chunks(), i % self.chunks(), g));
        let sum_parts = |parts: &[T], n: usize| {
            let mut total = vec![T::ZERO; n];
            for part in parts.chunks(n.max(1)) {
                total.iter_mut().zip(part).for_each(|(t, &p)| *t += p);
            }
            total
        };
        let mut dpack = if self.log_decays { da_parts } else { sum_parts(&da_parts, heads) };
        dpack.extend(sum_parts(&dd_parts, dd_len));
        dpack.extend(db);
        dpack.extend(dc);
        if self.has_h0 {
            dpack.extend_from_slice(&ds[..self.slot_len()]);
        }
        (dx, ddt, dpack)
    }

    /// Fills `ds` (chunks + 1 slots, the last the final state's gradient) with the gradient of
    /// the state at every chunk's start (slot 0: h0's).
    fn pass_state_grads<T: Real>(&self, inp: &In<T>, dy: &[T], ds: &mut [T]) {
        let Sizes { batch, heads, headdim, state, .. } = self.s;
        let (chunks, slot, hs) = (self.chunks(), self.slot_len(), self.head_state());
        // What the chunk's outputs add: sum_i e^(cum_i) dy_i C_i^T.
        ds[..chunks * slot].par_chunks_mut(hs).enumerate().for_each(|(i, d)| {
            let (c, b, h) = (i / (batch * heads), i / heads % batch, i % heads);
            let ch = self.chunk(inp, b, c, h);
            let dye = self.scaled_rows(dy, b, ch.t0, ch.k, h, |t| ch.cum[t].exp::<Plain>());
            let cm = self.bc_rows(inp.c, b, ch.t0, self.group_of(h));
            gemm(headdim, state, ch.k, d, state, false, Mat::rows(&dye, headdim).t(), cm);
        });
        for c in (0..chunks).rev() {
            let (upto, after) = ds.split_at_mut((c + 1) * slot);
            let rows = upto[c * slot..].par_chunks_mut(hs).zip(after[..slot].par_chunks(hs));
            rows.enumerate().for_each(|(bh, (d, next))| {
                let decay = self.chunk(inp, bh / heads, c, bh % heads).total().exp::<Plain>();
                axpy(decay, next, d);
            });
        }
    }

    /// Every input's gradient over chunk c of batch row b, given the state gradients `ds`.
    #[allow(clippy::too_many_arguments)]
    fn chunk_grads<T: Real>(&self, inp: &In<T>, dy: &[T], states: &[T], ds: &[T], b: usize, c: usize, out: Grads<T>) {
        let Sizes { heads, headdim: p, groups, state: n, .. } = self.s;
        let (slot, hs, row, bc_row) = (self.slot_len(), self.head_state(), heads * p, groups * n);
        let Grads { dx, ddt: ddt_out, db, dc, da, mut dd } = out;
        let (t0, k) = (c * CHUNK, ddt_out.len() / heads);
        for g in 0..groups {
            let cb = self.cb(inp, b, t0, k, g);
            let mut dcb = vec![T::ZERO; k * k];
            for h in (0..heads).filter(|&h| self.group_of(h) == g) {
                let ch = self.chunk(inp, b, c, h);
                let total = ch.total();
                let s = &states[c * slot + (b * heads + h) * hs..][..hs];
                let ds_end = &ds[(c + 1) * slot + (b * heads + h) * hs..][..hs];
                let (xm, dym) = (self.x_rows(inp.x, b, t0, h), self.x_rows(dy, b, t0, h));
                // dt's gradient as a factor, a_m's directly (`direct`) or as cum_i's (dcum: a_m gets
                // the sum over i >= m).
                let (mut ddt, mut direct, mut dcum) = (vec![T::ZERO; k], vec![T::ZERO; k], vec![T::ZERO; k]);

                // Within the chunk: y_i += sum_j (C_i . B_j) e^(cum_i - cum_j) dt_j x_j.
                let (mut decay, mut l, mut gm) = (vec![T::ZERO; k * k], vec![T::ZERO; k * k], vec![T::ZERO; k * k]);
                decay_lower(&ch.cum, &ch.dt, &cb, &mut decay, &mut l);
                gemm(k, k, p, &mut gm, k, false, dym, xm.t());
                lower_grads(&gm, &cb, &decay, &ch.dt, &mut ddt, &mut direct, &mut dcb);
                gemm(k, p, k, &mut dx[h * p..], row, false, Mat::rows(&l, k).t(), dym);
                if let (Some(d), Some(dd)) = (inp.d, dd.as_deref_mut()) {
                    let (d, dd) = (&d[h * p..][..p], &mut dd[h * p..][..p]);
                    for t in 0..k {
                        let at = self.x_at(b, t0 + t, h);
                        let (xt, dyt, dxt) = (&inp.x[at..][..p], &dy[at..][..p], &mut dx[t * row + h * p..][..p]);
                        mul_add_to(d, dyt, dxt);
                        mul_add_to(dyt, xt, dd);
                    }
                }

                // The chunk's own term of its end state: sum_j e^(cum_K - cum_j) dt_j x_j B_j^T.
                let mut r = vec![T::ZERO; k * p];
                gemm(k, p, n, &mut r, p, false, self.bc_rows(inp.b, b, t0, g), Mat::rows(ds_end, n).t());
                // Its exponent cum_K - cum_j sums the a_m of steps m > j: a_m's share is the sum
                // over j < m, taken directly (as +cum_K and -cum_j it would cancel in f32).
                let mut sum = T::ZERO;
                for t in 0..k {
                    let e = (total - ch.cum[t]).exp::<Plain>();
                    let w = e * ch.dt[t];
                    let (xt, rt) = (&inp.x[self.x_at(b, t0 + t, h)..][..p], &r[t * p..][..p]);
                    let xr = dot(xt, rt);
                    axpy(w, rt, &mut dx[t * row + h * p..][..p]);
                    ddt[t] += e * xr;
                    direct[t] += sum;
                    sum = madd::<T, Plain>(w, xr, sum);
                }
                dcum[k - 1] += total.exp::<Plain>() * dot(s, ds_end);
                let xw = self.scaled_rows(inp.x, b, t0, k, h, |t| (total - ch.cum[t]).exp::<Plain>() * ch.dt[t]);
                gemm(k, n, p, &mut db[g * n..], bc_row, true, Mat::rows(&xw, p), Mat::rows(ds_end, n));

                // From the start state: y_i += e^(cum_i) S C_i.
                let dye = self.scaled_rows(dy, b, t0, k, h, |t| ch.cum[t].exp::<Plain>());
                let mut pm = vec![T::ZERO; k * n];
                gemm(k, n, p, &mut pm, n, false, Mat::rows(&dye, p), Mat::rows(s, n));
                for t in 0..k {
                    let pt = &pm[t * n..][..n];
                    dcum[t] += dot(&inp.c[self.bc_at(b, t0 + t, g)..][..n], pt);
                    dc[t * bc_row + g * n..][..n].iter_mut().zip(pt).for_each(|(d, &v)| *d += v);
                }

                // cum_t = a_1 + ... + a_t, a_t = A dt_t or the log decay given.
                let mut acc = T::ZERO;
                for t in (0..k).rev() {
                    acc += dcum[t];
                    let da_t = acc + direct[t];
                    if self.log_decays {
                        ddt_out[t * heads + h] = ddt[t];
                        da[t * heads + h] = da_t;
                    } else {
                        ddt_out[t * heads + h] = madd::<T, Plain>(da_t, inp.a[h], ddt[t]);
                        da[h] = madd::<T, Plain>(da_t, ch.dt[t], da[h]);
                    }
                }
            }
            // C B^T is shared by the group's heads: its gradient reaches C and B once.
            gemm(k, n, k, &mut dc[g * n..], bc_row, true, Mat::rows(&dcb, k), self.bc_rows(inp.b, b, t0, g));
            gemm(k, n, k, &mut db[g * n..], bc_row, true, Mat::rows(&dcb, k).t(), self.bc_rows(inp.c, b, t0, g));
        }
    }
}

/// One (batch row, chunk)'s share of the gradients.
struct Grads<'a, T> {
    dx: &'a mut [T],
    ddt: &'a mut [T],
    db: &'a mut [T],
    dc: &'a mut [T],
    /// dA, per head; with `log_decays`, each step's log decay's, (steps, heads).
    da: &'a mut [T],
    /// dD, per head and headdim, when the op adds D x.
    dd: Option<&'a mut [T]>,
}

/// a . b, in vector-width partial sums.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut out = T::ZERO;
    dot_to(a, b, &mut out);
    out
}

simd_fn! {
    fn dot_to<T, S>(a: &[T], b: &[T], out: &mut T) {
        let mut acc = [T::ZERO; 16];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let mut sum = ca.remainder().iter().zip(cb.remainder()).fold(T::ZERO, |s, (&x, &y)| madd::<T, S>(x, y, s));
        for (x, y) in ca.zip(cb) {
            for i in 0..16 {
                acc[i] = madd::<T, S>(x[i], y[i], acc[i]);
            }
        }
        for v in acc {
            sum += v;
        }
        *out = sum;
    }
}

simd_fn! {
    /// y += a x.
    fn axpy<T, S>(a: T, x: &[T], y: &mut [T]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = madd::<T, S>(a, x, *y);
        }
    }
}

simd_fn! {
    /// y += a * b, elementwise.
    pub(crate) fn mul_add_to<T, S>(a: &[T], b: &[T], y: &mut [T]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = madd::<T, S>(a, b, *y);
        }
    }
}

simd_fn! {
    /// decay_ij = e^(cum_i - cum_j) and l_ij = cb_ij decay_ij dt_j on and below the diagonal;
    /// both are (k, k) and left as they are (zero) above it.
    fn decay_lower<T, S>(cum: &[T], dt: &[T], cb: &[T], decay: &mut [T], l: &mut [T]) {
        let k = cum.len();
        for i in 0..k {
            let (d, li, cbi) = (&mut decay[i * k..][..=i], &mut l[i * k..][..=i], &cb[i * k..][..=i]);
            for j in 0..=i {
                d[j] = (cum[i] - cum[j]).exp::<S>();
                li[j] = cbi[j] * d[j] * dt[j];
            }
        }
    }
}

simd_fn! {
    /// The within-chunk part's gradients from gm_ij = dy_i . x_j: dt_j, a_m (added to) and
    /// C B^T (added to, summed over the group's heads). With S_ij = gm_ij cb_ij decay_ij dt_j,
    /// a_m's share is the sum of S_ij over i >= m > j, taken as prefix sums of the rows: as
    /// +cum_i and -cum_j per pair it would cancel in f32 (measured: 10x the error of A's
    /// gradient at 64-step chunks).
    fn lower_grads<T, S>(gm: &[T], cb: &[T], decay: &[T], dt: &[T], ddt: &mut [T], da: &mut [T], dcb: &mut [T]) {
        let k = dt.len();
        for i in 0..k {
            let (gi, cbi, di) = (&gm[i * k..][..=i], &cb[i * k..][..=i], &decay[i * k..][..=i]);
            let dcbi = &mut dcb[i * k..][..=i];
            let mut before = T::ZERO;
            for j in 0..=i {
                let gd = gi[j] * di[j];
                let s = gd * cbi[j];
                ddt[j] += s;
                da[j] += before;
                before = madd::<T, S>(s, dt[j], before);
                dcbi[j] = madd::<T, S>(gd, dt[j], dcbi[j]);
            }
        }
    }
}

impl CustomOp3 for SsdOp {
    fn name(&self) -> &'static str {
        "ssd-chunk-scan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::cpu::flat;
        fn run<T: Real>(op: &SsdOp, [x, dt, pack]: [&[T]; 3]) -> Vec<T> {
            let (out, states) = op.forward(x, dt, pack);
            if op.keep {
                *op.kept.lock().unwrap() = Some(T::to_cpu_storage_owned(states));
            }
            out
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(run(self, [flat(s1, l1)?, flat(s2, l2)?, flat(s3, l3)?])),
            CpuStorage::F64(_) => CpuStorage::F64(run(self, [flat(s1, l1)?, flat(s2, l2)?, flat(s3, l3)?])),
            s => candle_core::bail!("ssd-chunk-scan computes in f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from(self.out_len())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dt: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(states) = self.kept.lock().unwrap().take() else {
            candle_core::bail!("ssd-chunk-scan: the forward pass kept no states for the backward pass")
        };
        fn run<T: Real>(
            op: &SsdOp,
            states: &CpuStorage,
            [x, dt, pack, grad]: [&Tensor; 4],
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            crate::cpu::cpu_storages!("ssd-chunk-scan"; (sx, lx) = x, (sdt, ldt) = dt, (sp, lp) = pack, (sg, lg) = grad);
            use crate::cpu::flat;
            let states = T::cpu_storage_as_slice(states)?;
            let (dx, ddt, dpack) =
                op.backward::<T>(flat(sx, lx)?, flat(sdt, ldt)?, flat(sp, lp)?, states, flat(sg, lg)?);
            let like = |v: Vec<T>, t: &Tensor| Tensor::from_vec(v, t.shape(), t.device()).map(Some);
            Ok((like(dx, x)?, like(ddt, dt)?, like(dpack, pack)?))
        }
        let grad = grad.contiguous()?;
        let all = [x, dt, pack, &grad];
        match x.dtype() {
            candle_core::DType::F32 => run::<f32>(self, &states, all),
            candle_core::DType::F64 => run::<f64>(self, &states, all),
            d => candle_core::bail!("ssd-chunk-scan computes in f32 or f64, got {d:?}"),
        }
    }
}
