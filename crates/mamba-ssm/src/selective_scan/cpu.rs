//! The CPU kernel: blocks of channels in lanes, time in tiles and chunks, the forward recurrence
//! and the backward pass that recomputes each chunk from the states the forward pass kept.

use super::{Dims, ScanOp};
use crate::cpu::{
    add_lane_sums, cpu_storages, flat, for_writing, plan, split_items, store_tile, transpose_last, View3,
};
use crate::math::{madd, simd_fn, Isa, Lanes, Real, LANES};
use candle_core::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Time steps between the states the forward pass keeps for the backward pass.
const CHUNK: usize = 32;
/// Time steps the forward pass loads at once: long contiguous reads from each row of a block of a
/// (batch, dim, len) input keep the hardware prefetchers ahead.
const TILE: usize = 8 * CHUNK;
/// Time steps whose decays are computed together before the recurrence uses them.
const SUB: usize = 8;
/// States whose adjoints the backward pass carries together through a chunk (in registers).
const GROUP: usize = 4;

/// The packed parameters, unpacked.
struct Params<'a, T> {
    a: &'a [T],
    /// B and C transposed to (batch, groups, len, state): a time step's values are contiguous.
    bt: Vec<T>,
    ct: Vec<T>,
    d: Option<&'a [T]>,
    bias: Option<&'a [T]>,
    h0: Option<&'a [T]>,
}

impl ScanOp {
    fn unpack<'a, T: Real>(&self, pack: &'a [T]) -> Params<'a, T> {
        let Dims { batch, dim, len, state, groups } = self.dims;
        let bc = batch * groups * state * len;
        let (a, rest) = pack.split_at(dim * state);
        let (b, rest) = rest.split_at(bc);
        let (c, mut rest) = rest.split_at(bc);
        let mut take = |present: bool, n: usize| {
            present.then(|| {
                let (head, tail) = rest.split_at(n);
                rest = tail;
                head
            })
        };
        let d = take(self.has_d, dim);
        let bias = take(self.has_bias, dim);
        let h0 = take(self.has_h0, batch * dim * state);
        let bt = transpose_last(b, batch * groups, state, len);
        let ct = transpose_last(c, batch * groups, state, len);
        Params { a, bt, ct, d, bias, h0 }
    }

    fn chunks(&self) -> usize {
        self.dims.len.div_ceil(CHUNK)
    }

    /// Lane-major copies of one block's per-channel parameters: A log2(e) (state), D, delta_bias.
    /// The kernels take exp(dt A) as 2^(dt A log2 e), which saves a multiplication per state.
    fn block_params<T: Real>(&self, p: &Params<T>, c0: usize, width: usize) -> (Vec<Lanes<T>>, Lanes<T>, Lanes<T>) {
        let n = self.dims.state;
        let mut a = vec![[T::ZERO; LANES]; n];
        let (mut d, mut bias) = ([T::ZERO; LANES], [T::ZERO; LANES]);
        for w in 0..width {
            for (s, lanes) in a.iter_mut().enumerate() {
                lanes[w] = p.a[(c0 + w) * n + s] * T::LOG2_E;
            }
            d[w] = p.d.map_or(T::ZERO, |v| v[c0 + w]);
            bias[w] = p.bias.map_or(T::ZERO, |v| v[c0 + w]);
        }
        (a, d, bias)
    }

    /// Loads u and delta for one block and time chunk into the tiles: u, dt, dt * u, and in the
    /// backward pass softplus'(delta + bias).
    #[allow(clippy::too_many_arguments)]
    fn load_inputs<T: Real>(
        &self,
        u: &View3<T>,
        delta: &View3<T>,
        batch: usize,
        c0: usize,
        width: usize,
        t0: usize,
        bias: &Lanes<T>,
        tiles: &mut Tiles<T>,
        grad: bool,
    ) {
        u.load_tile(batch, c0, width, t0, &mut tiles.u);
        delta.load_tile(batch, c0, width, t0, &mut tiles.dt);
        prepare_dt(tiles, bias, self.softplus, grad);
    }

    pub(crate) fn fwd<T: Real>(&self, u: View3<T>, delta: View3<T>, pack: &[T]) -> Vec<T> {
        let Dims { batch, dim, len, state: n, groups } = self.dims;
        let p = self.unpack(pack);
        let items = plan(batch, dim, groups);
        // SAFETY: every block of every item stores its rows of y over all of len, and its last states.
        let mut out = unsafe { for_writing(batch * dim * (len + n)) };
        let (ys, lasts) = out.split_at_mut(batch * dim * len);
        let chunks = self.chunks();
        let mut checkpoints: Vec<Vec<Lanes<T>>> = if self.keep_checkpoints {
            items.iter().map(|it| vec![[T::ZERO; LANES]; it.channels.div_ceil(LANES) * chunks * n]).collect()
        } else {
            vec![Vec::new(); items.len()]
        };
        let y_parts = split_items(ys, &items, len);
        let last_parts = split_items(lasts, &items, n);
        (items.par_iter(), y_parts, last_parts, checkpoints.par_iter_mut()).into_par_iter().for_each(
            |(item, y_rows, last_rows, ckpt)| {
                let mut tiles = Tiles::new(TILE.min(len));
                let mut h = vec![[T::ZERO; LANES]; n];
                let mut decay = vec![[T::ZERO; LANES]; SUB * n];
                let bc = (item.batch * groups + item.group) * len * n;
                for (blk, (c0, width)) in item.blocks().enumerate() {
                    let (a, d, bias) = self.block_params(&p, c0, width);
                    let (rows, off) = (&mut y_rows[(c0 - item.start) * len..], (c0 - item.start) * n);
                    init_state(&mut h, p.h0, item.batch * dim + c0, width, n);
                    for t_tile in (0..len).step_by(TILE) {
                        tiles.resize(TILE.min(len - t_tile));
                        self.load_inputs(&u, &delta, item.batch, c0, width, t_tile, &bias, &mut tiles, false);
                        for k0 in (0..tiles.u.len()).step_by(CHUNK) {
                            let (t0, k1) = (t_tile + k0, (k0 + CHUNK).min(tiles.u.len()));
                            if !ckpt.is_empty() {
                                ckpt[(blk * chunks + t0 / CHUNK) * n..][..n].copy_from_slice(&h);
                            }
                            let (bt, ct) =
                                (&p.bt[bc + t0 * n..][..(k1 - k0) * n], &p.ct[bc + t0 * n..][..(k1 - k0) * n]);
                            let Tiles { u, dt, du, y, .. } = &mut tiles;
                            let inputs = [&u[k0..k1], &dt[k0..k1], &du[k0..k1]];
                            scan_chunk_fwd(&a, &d, inputs, bt, ct, &mut h, &mut decay, &mut y[k0..k1]);
                        }
                        store_tile(&tiles.y, width, rows, len, t_tile);
                    }
                    for w in 0..width {
                        for s in 0..n {
                            last_rows[off + w * n + s] = h[s][w];
                        }
                    }
                }
            },
        );
        if self.keep_checkpoints {
            *self.checkpoints.lock().unwrap() = Some(Box::new(checkpoints));
        }
        out
    }

    /// Gradients (du, ddelta, dpack) from the gradient of the flat result.
    pub(crate) fn bwd<T: Real>(
        &self,
        u: View3<T>,
        delta: View3<T>,
        pack: &[T],
        grad: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { batch, dim, len, state: n, groups } = self.dims;
        let checkpoints = match self.checkpoints.lock().unwrap().take().map(|b| b.downcast::<Vec<Vec<Lanes<T>>>>()) {
            Some(Ok(c)) => *c,
            // The forward pass kept none (or a backward pass already took them): recompute.
            _ => {
                let op = ScanOp { keep_checkpoints: true, checkpoints: Mutex::new(None), ..*self };
                op.fwd(u, delta, pack);
                *op.checkpoints.into_inner().unwrap().unwrap().downcast().unwrap()
            }
        };
        let p = self.unpack(pack);
        let items = plan(batch, dim, groups);
        let chunks = self.chunks();
        let (dy_all, dlast_all) = grad.split_at(batch * dim * len);
        let dy = View3::from_slice(dy_all, [batch, dim, len]);
        // SAFETY: every block stores its rows of du and d(delta) for every chunk.
        let (mut du, mut ddelta) = unsafe { (for_writing(batch * dim * len), for_writing(batch * dim * len)) };
        // Per-batch partial sums of the parameter gradients, summed over the batch at the end.
        let (mut da, mut dd, mut dbias, mut dh0) = (
            vec![T::ZERO; batch * dim * n],
            vec![T::ZERO; batch * dim],
            vec![T::ZERO; batch * dim],
            vec![T::ZERO; batch * dim * n],
        );
        let mut dbc: Vec<(Vec<T>, Vec<T>)> =
            items.iter().map(|_| (vec![T::ZERO; n * len], vec![T::ZERO; n * len])).collect();
        let parts = (
            items.par_iter(),
            checkpoints.par_iter(),
            split_items(&mut du, &items, len),
            split_items(&mut ddelta, &items, len),
            split_items(&mut da, &items, n),
            split_items(&mut dd, &items, 1),
            split_items(&mut dbias, &items, 1),
            split_items(&mut dh0, &items, n),
        );
        parts.into_par_iter().zip(dbc.par_iter_mut()).for_each(
            |((item, ckpt, du_rows, ddelta_rows, da_rows, dd_rows, dbias_rows, dh0_rows), (db_acc, dc_acc))| {
                let blocks: Vec<_> = item.blocks().collect();
                let prm: Vec<_> = blocks.iter().map(|&(c0, width)| self.block_params(&p, c0, width)).collect();
                // The gradient flowing back into each block's state, starting from d(last state).
                let mut g: Vec<Vec<Lanes<T>>> = blocks
                    .iter()
                    .map(|&(c0, width)| {
                        let mut g = vec![[T::ZERO; LANES]; n];
                        init_state(&mut g, Some(dlast_all), item.batch * dim + c0, width, n);
                        g
                    })
                    .collect();
                let mut da_acc = vec![vec![[T::ZERO; LANES]; n]; blocks.len()];
                let mut dd_acc = vec![[T::ZERO; LANES]; blocks.len()];
                let mut dbias_acc = vec![[T::ZERO; LANES]; blocks.len()];
                let mut tiles = Tiles::new(CHUNK.min(len));
                let mut work = BwdWork::new(CHUNK.min(len), n);
                let bc = (item.batch * groups + item.group) * len * n;
                for chunk in (0..chunks).rev() {
                    let (t0, kc) = (chunk * CHUNK, CHUNK.min(len - chunk * CHUNK));
                    tiles.resize(kc);
                    work.resize(kc, n);
                    let (bt, ct) = (&p.bt[bc + t0 * n..][..kc * n], &p.ct[bc + t0 * n..][..kc * n]);
                    for (j, &(c0, width)) in blocks.iter().enumerate() {
                        let (a, d, bias) = &prm[j];
                        self.load_inputs(&u, &delta, item.batch, c0, width, t0, bias, &mut tiles, true);
                        dy.load_tile(item.batch, c0, width, t0, &mut tiles.y);
                        work.h0.copy_from_slice(&ckpt[(j * chunks + chunk) * n..][..n]);
                        let sums = [&mut dd_acc[j], &mut dbias_acc[j]];
                        scan_chunk_bwd(a, d, &mut tiles, bt, ct, &mut g[j], &mut da_acc[j], sums, &mut work);
                        let rows = (c0 - item.start) * len;
                        store_tile(&tiles.y, width, &mut du_rows[rows..], len, t0);
                        store_tile(&work.ddt, width, &mut ddelta_rows[rows..], len, t0);
                    }
                    add_lane_sums(&work.db, kc, n, db_acc, len, t0);
                    add_lane_sums(&work.dc, kc, n, dc_acc, len, t0);
                }
                for (j, &(c0, width)) in blocks.iter().enumerate() {
                    let off = c0 - item.start;
                    for w in 0..width {
                        for s in 0..n {
                            da_rows[(off + w) * n + s] = da_acc[j][s][w];
                            dh0_rows[(off + w) * n + s] = g[j][s][w];
                        }
                        dd_rows[off + w] = dd_acc[j][w];
                        dbias_rows[off + w] = dbias_acc[j][w];
                    }
                }
            },
        );
        // Pack the parameter gradients in the order of the pack.
        let sum_batch = |v: &[T], per: usize| -> Vec<T> {
            let mut s = v[..per].to_vec();
            for row in v.chunks(per).skip(1) {
                s.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
            s
        };
        let mut dpack = sum_batch(&da, dim * n);
        let (mut db, mut dc) = (vec![T::ZERO; batch * groups * n * len], vec![T::ZERO; batch * groups * n * len]);
        for (item, (dbi, dci)) in items.iter().zip(&dbc) {
            let off = (item.batch * groups + item.group) * n * len;
            db[off..off + n * len].iter_mut().zip(dbi).for_each(|(a, &b)| *a += b);
            dc[off..off + n * len].iter_mut().zip(dci).for_each(|(a, &b)| *a += b);
        }
        dpack.extend(db);
        dpack.extend(dc);
        if self.has_d {
            dpack.extend(sum_batch(&dd, dim));
        }
        if self.has_bias {
            dpack.extend(sum_batch(&dbias, dim));
        }
        if self.has_h0 {
            dpack.extend(dh0);
        }
        (du, ddelta, dpack)
    }
}

/// Sets a block's lanes of state from rows `first .. first + width` of a (rows, n) buffer, or zero.
fn init_state<T: Real>(h: &mut [Lanes<T>], src: Option<&[T]>, first: usize, width: usize, n: usize) {
    for lanes in h.iter_mut() {
        *lanes = [T::ZERO; LANES];
    }
    if let Some(src) = src {
        for w in 0..width {
            for (s, lanes) in h.iter_mut().enumerate() {
                lanes[w] = src[(first + w) * n + s];
            }
        }
    }
}

/// Per-chunk tiles of one block, lane-major: (chunk len) blocks of lanes each.
struct Tiles<T> {
    u: Vec<Lanes<T>>,
    dt: Vec<Lanes<T>>,
    du: Vec<Lanes<T>>,
    dsp: Vec<Lanes<T>>,
    /// y in the forward pass, dy then du in the backward pass.
    y: Vec<Lanes<T>>,
}

impl<T: Real> Tiles<T> {
    fn new(k: usize) -> Self {
        let z = vec![[T::ZERO; LANES]; k];
        Self { u: z.clone(), dt: z.clone(), du: z.clone(), dsp: z.clone(), y: z }
    }
    fn resize(&mut self, k: usize) {
        for t in [&mut self.u, &mut self.dt, &mut self.du, &mut self.dsp, &mut self.y] {
            t.resize(k, [T::ZERO; LANES]);
        }
    }
}

/// Scratch of the backward pass for one chunk.
struct BwdWork<T> {
    /// The chunk's start state: (state).
    h0: Vec<Lanes<T>>,
    /// One group of states recomputed over the chunk, small enough to stay in L1 between the walk
    /// forward and the walk back: the states before each step and after the last, (k + 1, GROUP),
    /// and exp(dt A) of each step, (k, GROUP).
    h: Vec<Lanes<T>>,
    decay: Vec<Lanes<T>>,
    /// Lane-wise partial sums of dB and dC over the blocks of an item: (k, state).
    db: Vec<Lanes<T>>,
    dc: Vec<Lanes<T>>,
    /// d(dt) through the decay, and sum_n G B (k).
    ddt: Vec<Lanes<T>>,
    s: Vec<Lanes<T>>,
}

impl<T: Real> BwdWork<T> {
    fn new(k: usize, n: usize) -> Self {
        let z = |m: usize| vec![[T::ZERO; LANES]; m];
        Self { h0: z(n), h: z((k + 1) * GROUP), decay: z(k * GROUP), db: z(k * n), dc: z(k * n), ddt: z(k), s: z(k) }
    }
    fn resize(&mut self, k: usize, n: usize) {
        let zero = [T::ZERO; LANES];
        for v in [&mut self.db, &mut self.dc] {
            v.clear();
            v.resize(k * n, zero);
        }
        self.ddt.resize(k, zero);
        self.s.resize(k, zero);
    }
}

simd_fn! {
    /// dt = softplus(delta + bias) (or delta + bias), du = dt u, and softplus' when `grad`.
    /// The branches stay outside the loops so that each loop vectorises.
    fn prepare_dt<T, S>(tiles: &mut Tiles<T>, bias: &Lanes<T>, softplus: bool, grad: bool) {
        let Tiles { u, dt, du, dsp, .. } = tiles;
        for dt in dt.iter_mut() {
            for w in 0..LANES {
                dt[w] += bias[w];
            }
        }
        if grad {
            dsp.copy_from_slice(dt);
        }
        // Flat loops over contiguous values: nested loops over blocks of lanes vectorised with
        // gathers.
        let (dt, dsp) = (dt.as_flattened_mut(), dsp.as_flattened_mut());
        let dt_u = du.as_flattened_mut().iter_mut().zip(dt.iter_mut()).zip(u.as_flattened());
        if softplus {
            for ((d, t), &x) in dt_u {
                *t = t.softplus::<S>();
                *d = *t * x;
            }
        } else {
            for ((d, &mut t), &x) in dt_u {
                *d = t * x;
            }
        }
        if grad && softplus {
            for v in dsp.iter_mut() {
                *v = v.softplus_grad::<S>();
            }
        } else if grad {
            dsp.fill(T::ONE);
        }
    }
}

simd_fn! {
    /// The recurrence over one chunk for one block of channels: h is carried in and out, y
    /// written. a2 = A log2(e): (state); [u, dt, du]: (k); bt, ct: (k, state) for this block's
    /// group. The decays of SUB steps are computed first, in a loop without dependencies, and
    /// then consumed by the recurrence, which is then only two FMAs per state.
    fn scan_chunk_fwd<T, S>(a2: &[Lanes<T>], d: &Lanes<T>, inputs: [&[Lanes<T>]; 3], bt: &[T], ct: &[T], h: &mut [Lanes<T>], decay: &mut [Lanes<T>], y: &mut [Lanes<T>]) {
        let (n, [u, dt, du]) = (h.len(), inputs);
        for k0 in (0..dt.len()).step_by(SUB) {
            let ks = SUB.min(dt.len() - k0);
            for k in 0..ks {
                for s in 0..n {
                    let dk = &mut decay[k * n + s];
                    for w in 0..LANES {
                        dk[w] = (dt[k0 + k][w] * a2[s][w]).pow2::<S>();
                    }
                }
            }
            for k in 0..ks {
                let kk = k0 + k;
                let mut acc = [T::ZERO; LANES];
                for w in 0..LANES {
                    acc[w] = d[w] * u[kk][w];
                }
                for s in 0..n {
                    let (dk, hn, b, c) = (&decay[k * n + s], &mut h[s], bt[kk * n + s], ct[kk * n + s]);
                    for w in 0..LANES {
                        hn[w] = madd::<T, S>(dk[w], hn[w], du[kk][w] * b);
                        acc[w] = madd::<T, S>(hn[w], c, acc[w]);
                    }
                }
                y[kk] = acc;
            }
        }
    }
}

simd_fn! {
    /// The backward pass over one chunk for one block: recomputes the states from `work.h0`
    /// (the chunk's start state), a group of states at a time, and walks back in time carrying `g` = d(loss)/d(state)
    /// through the decays. Leaves du in tiles.y (which brings dy) and d(delta) in work.ddt;
    /// accumulates dA, dB, dC (lane-wise), and dD and d(delta_bias) in `sums`. a2 = A log2(e).
    fn scan_chunk_bwd<T, S>(a2: &[Lanes<T>], d: &Lanes<T>, tiles: &mut Tiles<T>, bt: &[T], ct: &[T], g: &mut [Lanes<T>], da: &mut [Lanes<T>], sums: [&mut Lanes<T>; 2], work: &mut BwdWork<T>) {
        let [dd, dbias] = sums;
        let n = g.len();
        let kc = tiles.dt.len();
        let BwdWork { h0, h, decay, db, dc, ddt, s: gb } = work;
        // The states in groups of GROUP, each group recomputed forward over the chunk and then
        // walked back, so that its states and decays stay in L1 and its g and dA in registers;
        // the sums over the states (ddt, gb) still add in the order of s.
        ddt.fill([T::ZERO; LANES]);
        gb.fill([T::ZERO; LANES]);
        let steps = [&tiles.dt[..], &tiles.du[..], &tiles.y[..]];
        let mut s0 = 0;
        while s0 + GROUP <= n {
            adjoint::<T, S, GROUP>(s0, a2, steps, bt, ct, h0, h, decay, g, da, db, dc, ddt, gb);
            s0 += GROUP;
        }
        for s0 in s0..n {
            adjoint::<T, S, 1>(s0, a2, steps, bt, ct, h0, h, decay, g, da, db, dc, ddt, gb);
        }
        // a2 carries a factor log2(e) that d(dt) must not.
        for v in ddt.as_flattened_mut() {
            *v /= T::LOG2_E;
        }
        // The parts outside the recurrence: du = (sum_n G B) dt + D dy into tiles.y (which held
        // dy), d(pre-softplus delta) into work.ddt, and the sums for dD and d(delta_bias).
        let Tiles { u, dt, dsp, y, .. } = tiles;
        for k in 0..kc {
            for w in 0..LANES {
                let (dyk, uk, s) = (y[k][w], u[k][w], gb[k][w]);
                y[k][w] = madd::<T, S>(s, dt[k][w], d[w] * dyk);
                let dpre = madd::<T, S>(s, uk, ddt[k][w]) * dsp[k][w];
                ddt[k][w] = dpre;
                dbias[w] += dpre;
                dd[w] = madd::<T, S>(dyk, uk, dd[w]);
            }
        }
    }
}

/// The states from `s0` to `s0 + G` over one chunk: recomputed forward from their start states
/// `h0`, then walked back in time, carrying g = d(loss)/d(state) through the decays; dA, dB and
/// dC (lane-wise), and the per-step sums over the states of d(dt) (times log2 e) and of G B.
/// steps = [dt, du, dy]; `hs` ((k + 1, G)) and `decay` ((k, G)) are scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adjoint<T: Real, S: Isa, const G: usize>(
    s0: usize,
    a2: &[Lanes<T>],
    steps: [&[Lanes<T>]; 3],
    bt: &[T],
    ct: &[T],
    h0: &[Lanes<T>],
    hs: &mut [Lanes<T>],
    decay: &mut [Lanes<T>],
    g: &mut [Lanes<T>],
    da: &mut [Lanes<T>],
    db: &mut [Lanes<T>],
    dc: &mut [Lanes<T>],
    ddt: &mut [Lanes<T>],
    gb: &mut [Lanes<T>],
) {
    let [dt, du, dy] = steps;
    let n = g.len();
    hs[..G].copy_from_slice(&h0[s0..s0 + G]);
    for k in 0..dt.len() {
        let (dtk, duk) = (&dt[k], &du[k]);
        let (prev, next) = hs.split_at_mut((k + 1) * G);
        for j in 0..G {
            let (s, b) = (s0 + j, bt[k * n + s0 + j]);
            let (hp, hn, dk) = (&prev[k * G + j], &mut next[j], &mut decay[k * G + j]);
            for w in 0..LANES {
                dk[w] = (dtk[w] * a2[s][w]).pow2::<S>();
                hn[w] = madd::<T, S>(dk[w], hp[w], duk[w] * b);
            }
        }
    }
    let mut gr: [Lanes<T>; G] = std::array::from_fn(|j| g[s0 + j]);
    let mut dar: [Lanes<T>; G] = std::array::from_fn(|j| da[s0 + j]);
    for k in (0..dt.len()).rev() {
        let (dtk, duk, dyk) = (&dt[k], &du[k], &dy[k]);
        let (mut ddt_k, mut gb_k) = (ddt[k], gb[k]);
        for j in 0..G {
            let (s, i, l) = (s0 + j, k * n + s0 + j, k * G + j);
            let (b, c, hp, hn, dk) = (bt[i], ct[i], &hs[l], &hs[l + G], &decay[l]);
            let (dbs, dcs) = (&mut db[i], &mut dc[i]);
            for w in 0..LANES {
                let gt = madd::<T, S>(c, dyk[w], gr[j][w]);
                dcs[w] = madd::<T, S>(dyk[w], hn[w], dcs[w]);
                // d(loss)/d(decay) times the decay: both dt and A see it through dt A.
                let t1 = gt * hp[w] * dk[w];
                ddt_k[w] = madd::<T, S>(t1, a2[s][w], ddt_k[w]);
                dar[j][w] = madd::<T, S>(t1, dtk[w], dar[j][w]);
                gb_k[w] = madd::<T, S>(gt, b, gb_k[w]);
                dbs[w] = madd::<T, S>(gt, duk[w], dbs[w]);
                gr[j][w] = dk[w] * gt;
            }
        }
        (ddt[k], gb[k]) = (ddt_k, gb_k);
    }
    g[s0..s0 + G].copy_from_slice(&gr);
    da[s0..s0 + G].copy_from_slice(&dar);
}

pub(super) fn run_fwd<T: Real>(
    op: &ScanOp,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> candle_core::Result<CpuStorage> {
    Ok(T::to_cpu_storage_owned(op.fwd(View3::new(s1, l1)?, View3::new(s2, l2)?, flat(s3, l3)?)))
}

pub(super) fn bwd_tensors<T: Real>(
    op: &ScanOp,
    u: &Tensor,
    delta: &Tensor,
    pack: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    cpu_storages!("selective-scan"; (su, lu) = u, (sd, ld) = delta, (sp, lp) = pack, (sg, lg) = grad);
    let (du, ddelta, dpack) = op.bwd::<T>(View3::new(su, lu)?, View3::new(sd, ld)?, flat(sp, lp)?, flat(sg, lg)?);
    let Dims { batch, dim, len, .. } = op.dims;
    let dev = u.device();
    Ok((
        Tensor::from_vec(du, (batch, dim, len), dev)?,
        Tensor::from_vec(ddelta, (batch, dim, len), dev)?,
        Tensor::from_vec(dpack, pack.shape(), dev)?,
    ))
}
