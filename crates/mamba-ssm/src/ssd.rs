//! Mamba-2 SSD (state-space duality, scalar A per head): the chunked scan, its quadratic
//! (attention-like) form, the single-token step and the reference recurrence, all from candle
//! ops, so candle differentiates them (the chunked form keeps only one state per chunk).
//!
//! Per head h with group g(h), state h_t of shape (headdim, state), dt = clamp(softplus(dt + dt_bias)):
//!   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t,    y_t *= silu(z_t)

use crate::error::{argument, check, dims, Result};
use crate::gate::silu_gate;
use crate::ssd_cpu::SsdOp;
use crate::{softplus, ScanOutput};
use candle_core::{DType, Tensor, D};

/// The optional parts of the SSD scan, as in `mamba_chunk_scan_combined`.
#[derive(Clone, Copy)]
pub struct SsdParams<'a> {
    /// Skip connection, (heads) or (heads, headdim).
    pub d: Option<&'a Tensor>,
    /// Gate y * silu(z), shaped like x.
    pub z: Option<&'a Tensor>,
    /// Added to dt before the softplus, (heads).
    pub dt_bias: Option<&'a Tensor>,
    pub dt_softplus: bool,
    /// dt is clamped to [lo, hi] after the softplus; (0, inf) leaves it alone.
    pub dt_limit: (f64, f64),
}

impl Default for SsdParams<'_> {
    fn default() -> Self {
        Self { d: None, z: None, dt_bias: None, dt_softplus: false, dt_limit: (0.0, f64::INFINITY) }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Sizes {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub headdim: usize,
    pub groups: usize,
    pub state: usize,
}

fn check_inputs(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &SsdParams,
    h0: Option<&Tensor>,
) -> Result<Sizes> {
    let [batch, len, heads, headdim] = dims("x", x, ["batch", "len", "heads", "headdim"])?;
    if len == 0 {
        return Err(argument("x", "the sequence length must be at least 1"));
    }
    check("dt", dt, &[("batch", batch), ("len", len), ("heads", heads)])?;
    check("A", a, &[("heads", heads)])?;
    let [_, _, groups, state] = dims("B", b, ["batch", "len", "groups", "state"])?;
    let bc = [("batch", batch), ("len", len), ("groups", groups), ("state", state)];
    check("B", b, &bc)?;
    check("C", c, &bc)?;
    if groups == 0 || heads % groups != 0 {
        return Err(argument("B", format!("groups ({groups}) must divide heads ({heads})")));
    }
    if let Some(d) = p.d {
        if d.rank() == 2 {
            check("D", d, &[("heads", heads), ("headdim", headdim)])?;
        } else {
            check("D", d, &[("heads", heads)])?;
        }
    }
    if let Some(z) = p.z {
        check("z", z, &[("batch", batch), ("len", len), ("heads", heads), ("headdim", headdim)])?;
    }
    if let Some(bias) = p.dt_bias {
        check("dt_bias", bias, &[("heads", heads)])?;
    }
    if let Some(h0) = h0 {
        check("initial_states", h0, &[("batch", batch), ("heads", heads), ("headdim", headdim), ("state", state)])?;
    }
    if p.dt_limit.0.is_nan() || p.dt_limit.1.is_nan() || p.dt_limit.0 > p.dt_limit.1 {
        return Err(argument("dt_limit", format!("lower bound {} above upper bound {}", p.dt_limit.0, p.dt_limit.1)));
    }
    Ok(Sizes { batch, len, heads, headdim, groups, state })
}

/// The signature of [`ssd_chunk_scan`] and [`ssd_chunk_scan_ref`].
pub(crate) type ChunkScan =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, usize, &SsdParams, Option<&Tensor>) -> Result<ScanOutput>;

/// [`check_inputs`] and the chunk size of the chunked forms.
#[allow(clippy::too_many_arguments)]
fn check_chunked(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk_size: usize,
    p: &SsdParams,
    h0: Option<&Tensor>,
) -> Result<Sizes> {
    let s = check_inputs(x, dt, a, b, c, p, h0)?;
    if chunk_size == 0 {
        return Err(argument("chunk_size", "must be at least 1"));
    }
    Ok(s)
}

/// dt after bias, softplus and limits; the heads are the last dimension.
pub(crate) fn effective_dt(dt: &Tensor, p: &SsdParams) -> Result<Tensor> {
    let mut dt = dt.clone();
    if let Some(bias) = p.dt_bias {
        dt = dt.broadcast_add(&bias.to_dtype(dt.dtype())?)?;
    }
    if p.dt_softplus {
        dt = softplus(&dt)?;
    }
    let (lo, hi) = p.dt_limit;
    if lo > 0.0 || hi.is_finite() {
        dt = dt.clamp(lo, hi)?;
    }
    Ok(dt)
}

/// D x, with D of shape (heads) or (heads, headdim) and x (..., heads, headdim).
fn skip(x: &Tensor, d: &Tensor) -> Result<Tensor> {
    let d = if d.rank() == 1 { d.unsqueeze(1)? } else { d.clone() };
    Ok(x.broadcast_mul(&d)?)
}

/// (b, g, ..) per group -> (b, h, ..) per head, head h reading group h / (heads / groups).
pub(crate) fn per_head(t: &Tensor, group_dim: usize, heads: usize) -> Result<Tensor> {
    let groups = t.dim(group_dim)?;
    let mut shape = t.dims().to_vec();
    shape.insert(group_dim + 1, heads / groups);
    let expanded = t.unsqueeze(group_dim + 1)?.broadcast_as(shape.as_slice())?;
    Ok(expanded.flatten(group_dim, group_dim + 1)?)
}

/// Batched matmul over any number of leading dims (candle's CPU matmul takes at most two).
fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let r = a.rank();
    let lead = &a.dims()[..r - 2];
    let (m, n) = (a.dim(r - 2)?, b.dim(r - 1)?);
    let flat = |t: &Tensor| t.flatten_to(r - 3);
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    Ok(flat(a)?.matmul(&flat(b)?)?.reshape(shape)?)
}

/// The within-chunk part of SSD in its quadratic form: y_i = sum_{j <= i} (C_i . B_j)
/// exp(cum_i - cum_j) dt_j x_j. x: (.., h, k, p), dt and cum: (.., h, k), b and c: (.., g, k, n).
fn quadratic(x: &Tensor, dt: &Tensor, cum: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    let rank = x.rank();
    let (heads, k) = (x.dim(rank - 3)?, x.dim(rank - 2)?);
    let cb = per_head(&bmm(c, &b.t()?)?, rank - 3, heads)?;
    let seg = cum.unsqueeze(D::Minus1)?.broadcast_sub(&cum.unsqueeze(D::Minus2)?)?;
    // -inf above the diagonal: exp gives exact zeros and zero gradients there.
    let mask: Vec<f64> = (0..k * k).map(|ij| if ij % k > ij / k { f64::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (k, k), x.device())?.to_dtype(x.dtype())?;
    let decay = seg.broadcast_add(&mask)?.exp()?;
    let m = (cb * decay)?.broadcast_mul(&dt.unsqueeze(D::Minus2)?)?;
    bmm(&m, x)
}

/// The SSD chunked scan (Mamba-2) with gradients for every input.
///
/// x: (batch, len, heads, headdim); dt: (batch, len, heads); a: (heads); b, c: (batch, len,
/// groups, state); initial_states: (batch, heads, headdim, state). Any length. Returns y like x
/// and the final state.
///
/// The scan runs as one op with its own backward pass, in chunks of 64 steps whatever
/// `chunk_size` says (the chunking changes only rounding): on the CPU the kernel of
/// `ssd_cpu.rs`, on a GPU (feature `cuda`) those of kernels/ssd.cu, where bf16 stays bf16.
/// dt's bias, softplus and limits and the z gate are candle ops around it, and on a GPU the D
/// skip too.
/// [`ssd_chunk_scan_ref`] is the same chunked algorithm from candle ops.
#[allow(clippy::too_many_arguments)]
pub fn ssd_chunk_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk_size: usize,
    p: &SsdParams,
    initial_states: Option<&Tensor>,
) -> Result<ScanOutput> {
    let s = check_chunked(x, dt, a, b, c, chunk_size, p, initial_states)?;
    let ct = crate::selective_scan::compute_dtype(x);
    let cast = |t: &Tensor| t.to_dtype(ct);
    let xc = cast(x)?.contiguous()?;
    let dtc = effective_dt(&cast(dt)?, p)?.contiguous()?;
    // The CPU kernel adds the skip D x itself, D per (head, headdim).
    let fused_d = p.d.filter(|_| x.device().is_cpu());
    let mut pack = vec![cast(a)?];
    if let Some(d) = fused_d {
        let d = if d.rank() == 1 { d.unsqueeze(1)?.broadcast_as((s.heads, s.headdim))? } else { d.clone() };
        pack.push(cast(&d)?.flatten_all()?);
    }
    pack.extend([cast(b)?.flatten_all()?, cast(c)?.flatten_all()?]);
    if let Some(h0) = initial_states {
        pack.push(cast(h0)?.flatten_all()?);
    }
    let pack = Tensor::cat(&pack, 0)?;
    let keep = xc.track_op() || dtc.track_op() || pack.track_op();
    // Both ops return the flat [y | final state].
    let out = match x.device() {
        #[cfg(feature = "cuda")]
        d if d.is_cuda() && ct != DType::F64 => gpu::chunk_scan(&xc, &dtc, &pack, s, initial_states.is_some(), keep)?,
        d if d.is_cpu() => {
            let has = (fused_d.is_some(), initial_states.is_some());
            let op = SsdOp { s, log_decays: false, has_d: has.0, has_h0: has.1, keep, kept: Default::default() };
            xc.apply_op3(&dtc, &pack, op)?
        }
        _ => return ssd_chunk_scan_ref(x, dt, a, b, c, chunk_size, p, initial_states),
    };
    let (y, last) = split_flat(&out, x, s)?;
    let y = finish(y, &xc, &SsdParams { d: p.d.filter(|_| fused_d.is_none()), ..*p }, ct)?;
    Ok(ScanOutput { y: y.to_dtype(x.dtype())?, last_state: last.to_dtype(x.dtype())? })
}

/// [`ssd_chunk_scan`] from candle ops, differentiated by candle (it keeps one state per chunk):
/// the reference the kernels are tested against, and the path on devices without a kernel.
#[allow(clippy::too_many_arguments)]
pub fn ssd_chunk_scan_ref(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk_size: usize,
    p: &SsdParams,
    initial_states: Option<&Tensor>,
) -> Result<ScanOutput> {
    let s = check_chunked(x, dt, a, b, c, chunk_size, p, initial_states)?;
    let out_dtype = x.dtype();
    let ct = if out_dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let (x, a, b, c) = (x.to_dtype(ct)?, a.to_dtype(ct)?, b.to_dtype(ct)?, c.to_dtype(ct)?);
    let dt = effective_dt(&dt.to_dtype(ct)?, p)?;
    let h0 = initial_states.map(|h0| h0.to_dtype(ct)).transpose()?;
    let (y, last) = chunked(&x, &dt, &dt.broadcast_mul(&a)?, &b, &c, chunk_size, s, h0.as_ref())?;
    let y = finish(y, &x, p, ct)?;
    Ok(ScanOutput { y: y.to_dtype(out_dtype)?, last_state: last.to_dtype(out_dtype)? })
}

/// The signature of [`chunked`] and [`chunked_kernel`]: (x, w, log_decay, b, c, chunk_size,
/// sizes, h0) -> (y, last state).
pub(crate) type Chunked =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, usize, Sizes, Option<&Tensor>) -> Result<(Tensor, Tensor)>;

/// The chunked algorithm of SSD from candle ops, with the input weights and the log decays
/// apart: h_t = exp(log_decay_t) h_{t-1} + w_t x_t B_t^T, y_t = h_t C_t. x: (b, l, h, p); w and
/// log_decay: (b, l, h); b and c: (b, l, g, n); h0: (b, h, p, n). Returns y like x and the last
/// state. SSD is w = dt, log_decay = dt A; Mamba-3 uses it too. The last chunk is padded with
/// w = log_decay = 0, which leaves the state unchanged.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunked(
    x: &Tensor,
    w: &Tensor,
    log_decay: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk_size: usize,
    s: Sizes,
    h0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let Sizes { batch, len, heads, headdim, groups, state } = s;
    let ct = x.dtype();
    let k = chunk_size.min(len);
    let pad = (k - len % k) % k;
    let chunks = (len + pad) / k;
    let chunked = |t: &Tensor| -> Result<Tensor> {
        let mut shape = vec![batch, chunks, k];
        shape.extend_from_slice(&t.dims()[2..]);
        // (b, l, h|g, ..) -> (b, c, h|g, k, ..)
        Ok(t.pad_with_zeros(1, 0, pad)?.reshape(shape)?.transpose(2, 3)?.contiguous()?)
    };
    let (xc, wc, bc, cc) = (chunked(x)?, chunked(w)?, chunked(b)?, chunked(c)?);
    let cum = chunked(log_decay)?.cumsum(3)?; // (b, c, h, k)
    let y_diag = quadratic(&xc, &wc, &cum, &bc, &cc)?;

    // Each chunk's own contribution to the state at its end: sum_j exp(cum_last - cum_j) w_j x_j B_j^T.
    let last = cum.narrow(3, k - 1, 1)?;
    let weight = (last.broadcast_sub(&cum)?.exp()? * &wc)?;
    let xw = xc.broadcast_mul(&weight.unsqueeze(4)?)?.transpose(3, 4)?; // (b, c, h, p, k)
    let rep = heads / groups;
    let own = xw.contiguous()?.reshape((batch, chunks, groups, rep * headdim, k))?;
    let own = bmm(&own, &bc)?.reshape((batch, chunks, heads, headdim, state))?;

    // Pass the states from chunk to chunk.
    let chunk_decay = last.squeeze(3)?.exp()?; // (b, c, h)
    let mut h = match h0 {
        Some(h0) => h0.clone(),
        None => Tensor::zeros((batch, heads, headdim, state), ct, x.device())?,
    };
    let mut starts = Vec::with_capacity(chunks);
    for ci in 0..chunks {
        starts.push(h.clone());
        let decay = chunk_decay.narrow(1, ci, 1)?.reshape((batch, heads, 1, 1))?;
        h = (h.broadcast_mul(&decay)? + own.narrow(1, ci, 1)?.squeeze(1)?)?;
    }
    let starts = Tensor::stack(&starts, 1)?; // (b, c, h, p, n)

    // What the state at each chunk's start adds to its outputs: exp(cum_i) C_i h_start.
    let y_off = bmm(&cc, &starts.reshape((batch, chunks, groups, rep * headdim, state))?.transpose(3, 4)?)? // (b, c, g, k, rep * p)
        .reshape((batch, chunks, groups, k, rep, headdim))?
        .transpose(3, 4)?
        .reshape((batch, chunks, heads, k, headdim))?
        .broadcast_mul(&cum.exp()?.unsqueeze(4)?)?;
    let y = (y_diag + y_off)?.transpose(2, 3)?.reshape((batch, chunks * k, heads, headdim))?.narrow(1, 0, len)?;
    Ok((y, h))
}

/// [`chunked`] through the CPU kernel of `ssd_cpu.rs` (its own chunks of 64 steps, whatever
/// `chunk_size`: the chunking changes only rounding), with its hand-written backward; the candle
/// ops of [`chunked`] elsewhere. The inputs are as [`chunked`] takes them, in f32 or f64.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunked_kernel(
    x: &Tensor,
    w: &Tensor,
    log_decay: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk_size: usize,
    s: Sizes,
    h0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    if !x.device().is_cpu() {
        return chunked(x, w, log_decay, b, c, chunk_size, s, h0);
    }
    let xc = x.contiguous()?;
    let wc = w.contiguous()?;
    let mut pack = vec![log_decay.flatten_all()?, b.flatten_all()?, c.flatten_all()?];
    pack.extend(h0.map(|h0| h0.flatten_all()).transpose()?);
    let pack = Tensor::cat(&pack, 0)?;
    let keep = xc.track_op() || wc.track_op() || pack.track_op();
    let op = SsdOp { s, log_decays: true, has_d: false, has_h0: h0.is_some(), keep, kept: Default::default() };
    split_flat(&xc.apply_op3(&wc, &pack, op)?, x, s)
}

/// The kernels' flat [y | final state] as y, shaped like `x`, and the final state.
fn split_flat(out: &Tensor, x: &Tensor, s: Sizes) -> Result<(Tensor, Tensor)> {
    let states = s.batch * s.heads * s.headdim * s.state;
    let y = out.narrow(0, 0, x.elem_count())?.reshape(x.shape())?;
    let last = out.narrow(0, out.elem_count() - states, states)?.reshape((s.batch, s.heads, s.headdim, s.state))?;
    Ok((y, last))
}

/// The D skip and the z gate, shared by every form.
pub(crate) fn finish(mut y: Tensor, x: &Tensor, p: &SsdParams, ct: DType) -> Result<Tensor> {
    if let Some(d) = p.d {
        y = (y + skip(x, &d.to_dtype(ct)?)?)?;
    }
    if let Some(z) = p.z {
        y = silu_gate(&y, &z.to_dtype(ct)?)?;
    }
    Ok(y)
}

/// The quadratic (attention-like) form over the whole sequence from a zero state: one
/// (len, len) masked matrix per head. Memory grows with len^2; for tests and short sequences.
pub fn ssd_quadratic(x: &Tensor, dt: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, p: &SsdParams) -> Result<Tensor> {
    check_inputs(x, dt, a, b, c, p, None)?;
    let dt = effective_dt(dt, p)?;
    let heads_first = |t: &Tensor| t.transpose(1, 2).and_then(|t| t.contiguous());
    let dth = heads_first(&dt)?; // (b, h, l)
    let cum = dth.broadcast_mul(&a.unsqueeze(1)?)?.cumsum(2)?;
    let y = quadratic(&heads_first(x)?, &dth, &cum, &heads_first(b)?, &heads_first(c)?)?;
    finish(y.transpose(1, 2)?, x, p, x.dtype())
}

/// One decoding step from candle ops, on any device and differentiable: the reference for
/// [`crate::ssd_state_update`] (same arguments) and the step of [`ssd_scan_ref`].
pub fn ssd_state_update_ref(
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &SsdParams,
) -> Result<(Tensor, Tensor)> {
    let (batch, heads, ..) = check_ssd_step(h, x, dt, a, b, c)?;
    let dt = effective_dt(dt, p)?;
    let decay = dt.broadcast_mul(a)?.exp()?.reshape((batch, heads, 1, 1))?;
    let (bh, ch) = (per_head(b, 1, heads)?.unsqueeze(2)?, per_head(c, 1, heads)?.unsqueeze(2)?);
    let input = x.broadcast_mul(&dt.unsqueeze(2)?)?.unsqueeze(3)?.broadcast_mul(&bh)?;
    let new = (h.broadcast_mul(&decay)? + input)?;
    let y = new.broadcast_mul(&ch)?.sum(3)?;
    Ok((finish(y, x, p, x.dtype())?, new))
}

/// Checks the inputs of a decoding step: (batch, heads, headdim, state, groups).
pub(crate) fn check_ssd_step(
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let [batch, heads, headdim, state] = dims("state", h, ["batch", "heads", "headdim", "state"])?;
    check("x", x, &[("batch", batch), ("heads", heads), ("headdim", headdim)])?;
    check("dt", dt, &[("batch", batch), ("heads", heads)])?;
    check("A", a, &[("heads", heads)])?;
    let [_, groups, _] = dims("B", b, ["batch", "groups", "state"])?;
    check("B", b, &[("batch", batch), ("groups", groups), ("state", state)])?;
    check("C", c, &[("batch", batch), ("groups", groups), ("state", state)])?;
    if groups == 0 || heads % groups != 0 {
        return Err(argument("B", format!("groups ({groups}) must divide heads ({heads})")));
    }
    Ok((batch, heads, headdim, state, groups))
}

/// The reference: [`ssd_state_update_ref`] in a loop over time, differentiated by candle.
#[allow(clippy::too_many_arguments)]
pub fn ssd_scan_ref(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &SsdParams,
    initial_states: Option<&Tensor>,
) -> Result<ScanOutput> {
    let Sizes { batch, len, heads, headdim, state, .. } = check_inputs(x, dt, a, b, c, p, initial_states)?;
    let mut h = match initial_states {
        Some(h0) => h0.clone(),
        None => Tensor::zeros((batch, heads, headdim, state), x.dtype(), x.device())?,
    };
    let mut ys = Vec::with_capacity(len);
    for t in 0..len {
        let at = |v: &Tensor| v.narrow(1, t, 1).and_then(|v| v.squeeze(1));
        let z = p.z.map(at).transpose()?;
        let step = SsdParams { z: z.as_ref(), ..*p };
        let (y, next) = ssd_state_update_ref(&h, &at(x)?, &at(dt)?, a, &at(b)?, &at(c)?, &step)?;
        ys.push(y);
        h = next;
    }
    Ok(ScanOutput { y: Tensor::stack(&ys, 1)?, last_state: h })
}

/// The scan through the CUDA kernels of kernels/ssd.cu: the `ssd-chunk-scan` op takes x, the
/// effective dt and the packed [A | B | C | h0?] and returns the flat [y | last state].
#[cfg(feature = "cuda")]
mod gpu {
    use super::Sizes;
    use crate::cuda::{ssd_bwd, ssd_fwd, SsdArgs, SsdKept};
    use crate::error::Result;
    use candle_core::{CudaStorage, CustomOp3, Layout, Shape, Tensor};
    use std::sync::Mutex;

    /// The flat [y | last state] of the `ssd-chunk-scan` op.
    pub(super) fn chunk_scan(
        x: &Tensor,
        dt: &Tensor,
        pack: &Tensor,
        s: Sizes,
        has_h0: bool,
        keep: bool,
    ) -> Result<Tensor> {
        let args = SsdArgs::new([s.batch, s.len, s.heads, s.headdim, s.groups, s.state], has_h0)?;
        Ok(x.apply_op3(dt, pack, SsdOp { args, keep, kept: Mutex::new(None) })?)
    }

    struct SsdOp {
        args: SsdArgs,
        /// Whether a backward pass may follow, so the chunk states are worth keeping.
        keep: bool,
        kept: Mutex<Option<SsdKept>>,
    }

    impl CustomOp3 for SsdOp {
        crate::cuda::gpu_only!("ssd-chunk-scan");

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (out, kept) = ssd_fwd(self.args, (s1, l1), (s2, l2), (s3, l3))?;
            if self.keep {
                *self.kept.lock().unwrap() = Some(kept);
            }
            Ok((out, Shape::from(self.args.x_len() + self.args.state_len())))
        }

        fn bwd(
            &self,
            x: &Tensor,
            dt: &Tensor,
            pack: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let Some(kept) = self.kept.lock().unwrap().take() else {
                candle_core::bail!("ssd-chunk-scan: the forward pass kept no states for the backward pass")
            };
            let xdt = Tensor::cat(&[x.flatten_all()?, dt.flatten_all()?], 0)?;
            let out = xdt.apply_op3(pack, &grad.contiguous()?, SsdBwdOp { args: self.args, kept })?;
            let (nx, ndt) = (x.elem_count(), dt.elem_count());
            let part = |start: usize, like: &Tensor| {
                out.narrow(0, start, like.elem_count())?.reshape(like.shape())?.to_dtype(like.dtype())
            };
            Ok((Some(part(0, x)?), Some(part(nx, dt)?), Some(part(nx + ndt, pack)?)))
        }
    }

    /// The backward pass as an op of its own: ([x | dt] flat, pack, [dy | d last state]) -> f32
    /// [dx | ddt | dpack].
    struct SsdBwdOp {
        args: SsdArgs,
        kept: SsdKept,
    }

    impl CustomOp3 for SsdBwdOp {
        crate::cuda::gpu_only!("ssd-chunk-scan-backward");

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = ssd_bwd(self.args, &self.kept, (s1, l1), (s2, l2), (s3, l3))?;
            Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count())))
        }
    }
}
