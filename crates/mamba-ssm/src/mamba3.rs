//! Mamba-3's scan (SISO; arXiv 2603.15569): a trapezoidal discretization, which mixes each
//! token's input with the previous one's, and a data-dependent rotation of the keys and queries
//! (a complex-valued state written as real pairs). Layouts and names are those of mamba_ssm's
//! `mamba3_siso_combined`. Per batch element and head h, with group g(h) = h / (heads / groups):
//!
//!   phi_t = (phi_{t-1} + dt_t pi tanh(angles_t)) mod 2 pi            (one angle per rotated pair)
//!   q_t = R(phi_t) (Q_t[g] + q_bias[h]),   k_t = R(phi_t) (K_t[g] + k_bias[h])
//!   lambda_t = sigmoid(trap_t),  alpha_t = exp(adt_t)
//!   H_t = alpha_t H_{t-1} + (1 - lambda_t) dt_t alpha_t v_{t-1} k_{t-1}^T + lambda_t dt_t v_t k_t^T
//!   y_t = (H_t q_t + D v_t) * silu(z_t)
//!
//! R rotates the pairs (2i, 2i + 1) for i < angles and leaves the other state dims alone.

use crate::error::{argument, check, dims, Result};
use crate::gate::silu_gate;
use crate::ssd::per_head;
use candle_core::{DType, Tensor, D};
use std::f64::consts::PI;

/// The inputs of a Mamba-3 scan. Q is C and K is B, as the layer hands them over.
#[derive(Clone, Copy)]
pub struct Mamba3Inputs<'a> {
    /// (batch, len, groups, state).
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    /// (batch, len, heads, headdim): the layer's x.
    pub v: &'a Tensor,
    /// A dt, dt and the trapezoid's mix before its sigmoid: (batch, heads, len).
    pub adt: &'a Tensor,
    pub dt: &'a Tensor,
    pub trap: &'a Tensor,
    /// Added to the queries and keys before the rotation: (heads, state).
    pub q_bias: &'a Tensor,
    pub k_bias: &'a Tensor,
    /// Rotation rates, before pi tanh: (batch, len, heads, angles), 2 angles <= state.
    pub angles: &'a Tensor,
    /// Skip connection, (heads).
    pub d: Option<&'a Tensor>,
    /// Gate y * silu(z), shaped like v.
    pub z: Option<&'a Tensor>,
}

/// What a Mamba-3 scan carries from one token to the next.
#[derive(Debug, Clone)]
pub struct Mamba3State {
    /// The rotation angles, in [0, 2 pi): (batch, heads, angles).
    pub angle: Tensor,
    /// H: (batch, heads, headdim, state).
    pub ssm: Tensor,
    /// The last token's rotated, biased key: (batch, heads, state).
    pub k: Tensor,
    /// The last token's value: (batch, heads, headdim).
    pub v: Tensor,
}

pub struct Mamba3Output {
    /// Shaped like v.
    pub y: Tensor,
    pub state: Mamba3State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mamba3Sizes {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub headdim: usize,
    pub groups: usize,
    pub state: usize,
    pub angles: usize,
}

impl Mamba3Sizes {
    /// A state of zeros: no token seen.
    fn empty(&self, dtype: DType, device: &candle_core::Device) -> Result<Mamba3State> {
        let Self { batch, heads, headdim, state, angles, .. } = *self;
        Ok(Mamba3State {
            angle: Tensor::zeros((batch, heads, angles), dtype, device)?,
            ssm: Tensor::zeros((batch, heads, headdim, state), dtype, device)?,
            k: Tensor::zeros((batch, heads, state), dtype, device)?,
            v: Tensor::zeros((batch, heads, headdim), dtype, device)?,
        })
    }
}

fn check_inputs(x: &Mamba3Inputs, initial: Option<&Mamba3State>) -> Result<Mamba3Sizes> {
    let [batch, len, heads, headdim] = dims("v", x.v, ["batch", "len", "heads", "headdim"])?;
    if len == 0 {
        return Err(argument("v", "the sequence length must be at least 1"));
    }
    let [_, _, groups, state] = dims("q", x.q, ["batch", "len", "groups", "state"])?;
    let qk = [("batch", batch), ("len", len), ("groups", groups), ("state", state)];
    check("q", x.q, &qk)?;
    check("k", x.k, &qk)?;
    if groups == 0 || heads % groups != 0 {
        return Err(argument("q", format!("groups ({groups}) must divide heads ({heads})")));
    }
    for (name, t) in [("adt", x.adt), ("dt", x.dt), ("trap", x.trap)] {
        check(name, t, &[("batch", batch), ("heads", heads), ("len", len)])?;
    }
    check("q_bias", x.q_bias, &[("heads", heads), ("state", state)])?;
    check("k_bias", x.k_bias, &[("heads", heads), ("state", state)])?;
    let [_, _, _, angles] = dims("angles", x.angles, ["batch", "len", "heads", "angles"])?;
    check("angles", x.angles, &[("batch", batch), ("len", len), ("heads", heads), ("angles", angles)])?;
    if 2 * angles > state {
        return Err(argument("angles", format!("{angles} angles rotate more pairs than a state of {state} has")));
    }
    if let Some(d) = x.d {
        check("D", d, &[("heads", heads)])?;
    }
    if let Some(z) = x.z {
        check("z", z, &[("batch", batch), ("len", len), ("heads", heads), ("headdim", headdim)])?;
    }
    if let Some(s) = initial {
        check("angle state", &s.angle, &[("batch", batch), ("heads", heads), ("angles", angles)])?;
        check("ssm state", &s.ssm, &[("batch", batch), ("heads", heads), ("headdim", headdim), ("state", state)])?;
        check("k state", &s.k, &[("batch", batch), ("heads", heads), ("state", state)])?;
        check("v state", &s.v, &[("batch", batch), ("heads", heads), ("headdim", headdim)])?;
    }
    Ok(Mamba3Sizes { batch, len, heads, headdim, groups, state, angles })
}

/// x mod 2 pi in [0, 2 pi); the gradient passes through unchanged (floor has none).
fn wrap_angle(x: &Tensor) -> Result<Tensor> {
    let turns = x.affine(0.5 / PI, 0.0)?.floor()?;
    Ok((x - turns.affine(2.0 * PI, 0.0)?)?)
}

/// The logistic function as 0.5 (1 + tanh(x / 2)), which neither overflows nor loses its gradient.
pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// Rotates the pairs (2i, 2i + 1) of x's last dim by phi_i, for i < phi's last dim; x: (.., state),
/// phi: (.., angles).
pub(crate) fn rotate(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    let (state, angles) = (x.dim(D::Minus1)?, phi.dim(D::Minus1)?);
    let mut pairs_shape = x.dims().to_vec();
    *pairs_shape.last_mut().unwrap() = angles;
    pairs_shape.push(2);
    let pairs = x.narrow(D::Minus1, 0, 2 * angles)?.reshape(pairs_shape)?;
    let (x0, x1) =
        (pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?, pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?);
    let (cos, sin) = (phi.cos()?, phi.sin()?);
    let r0 = ((&x0 * &cos)? - (&x1 * &sin)?)?;
    let r1 = ((&x0 * &sin)? + (&x1 * &cos)?)?;
    let rotated = Tensor::stack(&[r0, r1], D::Minus1)?.flatten_from(D::Minus2)?;
    if 2 * angles == state {
        return Ok(rotated);
    }
    Ok(Tensor::cat(&[rotated, x.narrow(D::Minus1, 2 * angles, state - 2 * angles)?], D::Minus1)?)
}

/// One token from candle ops, on any device and differentiable: the step of decoding, and of
/// [`mamba3_scan_ref`]. `x` holds one token (len 1); returns y (batch, 1, heads, headdim) and the
/// state after it.
pub fn mamba3_state_update_ref(state: &Mamba3State, x: &Mamba3Inputs) -> Result<(Tensor, Mamba3State)> {
    let s = check_inputs(x, Some(state))?;
    if s.len != 1 {
        return Err(argument("v", format!("a step takes one token, not {}", s.len)));
    }
    let token = |t: &Tensor| t.squeeze(1);
    let per_token = |t: &Tensor| t.squeeze(2); // (b, h, 1) -> (b, h)
    let (dt, adt, trap) = (per_token(x.dt)?, per_token(x.adt)?, per_token(x.trap)?);
    let theta = token(x.angles)?.tanh()?.affine(PI, 0.0)?;
    let angle = wrap_angle(&(&state.angle + theta.broadcast_mul(&dt.unsqueeze(2)?)?)?)?;
    let key = |t: &Tensor, bias: &Tensor| rotate(&per_head(&token(t)?, 1, s.heads)?.broadcast_add(bias)?, &angle);
    let (q, k) = (key(x.q, x.q_bias)?, key(x.k, x.k_bias)?);
    let v = token(x.v)?;
    let lambda = sigmoid(&trap)?;
    let alpha = adt.exp()?;
    let beta = ((lambda.affine(-1.0, 1.0)? * &dt)? * &alpha)?;
    let gamma = (&lambda * &dt)?;
    let outer = |v: &Tensor, k: &Tensor, w: &Tensor| -> Result<Tensor> {
        let vk = v.unsqueeze(3)?.broadcast_mul(&k.unsqueeze(2)?)?;
        Ok(vk.broadcast_mul(&w.unsqueeze(2)?.unsqueeze(3)?)?)
    };
    let decay = alpha.unsqueeze(2)?.unsqueeze(3)?;
    let ssm = ((state.ssm.broadcast_mul(&decay)? + outer(&state.v, &state.k, &beta)?)? + outer(&v, &k, &gamma)?)?;
    let mut y = ssm.broadcast_mul(&q.unsqueeze(2)?)?.sum(3)?; // (b, h, p)
    if let Some(d) = x.d {
        y = (y + v.broadcast_mul(&d.unsqueeze(1)?)?)?;
    }
    if let Some(z) = x.z {
        y = silu_gate(&y, &token(z)?)?;
    }
    Ok((y.unsqueeze(1)?, Mamba3State { angle, ssm, k, v }))
}

/// The reference: [`mamba3_state_update_ref`] in a loop over time, differentiated by candle.
/// `initial` continues from an earlier scan's state; `None` starts from zeros.
pub fn mamba3_scan_ref(x: &Mamba3Inputs, initial: Option<&Mamba3State>) -> Result<Mamba3Output> {
    let s = check_inputs(x, initial)?;
    let mut state = match initial {
        Some(state) => state.clone(),
        None => s.empty(x.v.dtype(), x.v.device())?,
    };
    let mut ys = Vec::with_capacity(s.len);
    for t in 0..s.len {
        let at = |v: &Tensor, dim: usize| v.narrow(dim, t, 1);
        let (q, k, v, angles) = (at(x.q, 1)?, at(x.k, 1)?, at(x.v, 1)?, at(x.angles, 1)?);
        let (adt, dt, trap) = (at(x.adt, 2)?, at(x.dt, 2)?, at(x.trap, 2)?);
        let z = x.z.map(|z| at(z, 1)).transpose()?;
        let token =
            Mamba3Inputs { q: &q, k: &k, v: &v, adt: &adt, dt: &dt, trap: &trap, angles: &angles, z: z.as_ref(), ..*x };
        let (y, next) = mamba3_state_update_ref(&state, &token)?;
        ys.push(y);
        state = next;
    }
    Ok(Mamba3Output { y: Tensor::cat(&ys, 1)?, state })
}

/// [`mamba3_scan_ref`] in SSD's chunked form, from candle ops and differentiated by candle (it
/// keeps one state per chunk): the path of training until a kernel exists. The trapezoid's two
/// terms are two SSD inputs under one decay, the token's own (weight lambda dt) and the previous
/// token's (weight (1 - lambda) dt alpha), so one chunked scan over a doubled batch runs both.
/// The angles are summed over the whole sequence and wrapped at the end only.
pub fn mamba3_chunk_scan_ref(
    x: &Mamba3Inputs,
    chunk_size: usize,
    initial: Option<&Mamba3State>,
) -> Result<Mamba3Output> {
    let s = check_inputs(x, initial)?;
    if chunk_size == 0 {
        return Err(argument("chunk_size", "must be at least 1"));
    }
    let out_dtype = x.v.dtype();
    let ct = if out_dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let cast = |t: &Tensor| t.to_dtype(ct);
    let initial = match initial {
        Some(i) => Mamba3State { angle: cast(&i.angle)?, ssm: cast(&i.ssm)?, k: cast(&i.k)?, v: cast(&i.v)? },
        None => s.empty(ct, x.v.device())?,
    };
    // (b, h, l) -> (b, l, h), as the chunked scan takes them.
    let time_first = |t: &Tensor| cast(t)?.transpose(1, 2)?.contiguous();
    let (dt, adt, trap) = (time_first(x.dt)?, time_first(x.adt)?, time_first(x.trap)?);
    let theta = cast(x.angles)?.tanh()?.affine(PI, 0.0)?;
    // Summed along time as the last, contiguous dim (candle's cumsum multiplies by a triangle).
    let increments = theta.broadcast_mul(&dt.unsqueeze(3)?)?.permute((0, 2, 3, 1))?.contiguous()?;
    let phi = increments.cumsum(3)?.permute((0, 3, 1, 2))?.broadcast_add(&initial.angle.unsqueeze(1)?)?;
    let key = |t: &Tensor, bias: &Tensor| rotate(&per_head(&cast(t)?, 2, s.heads)?.broadcast_add(&cast(bias)?)?, &phi);
    let (q, k, v) = (key(x.q, x.q_bias)?, key(x.k, x.k_bias)?, cast(x.v)?);
    let lambda = sigmoid(&trap)?;
    let gamma = (&lambda * &dt)?;
    let beta = ((lambda.affine(-1.0, 1.0)? * &dt)? * adt.exp()?)?;
    // The previous token's key and value at each position: the state's, then the sequence's.
    let previous = |state: &Tensor, t: &Tensor| -> Result<Tensor> {
        let earlier = [state.unsqueeze(1)?, t.narrow(1, 0, s.len - 1)?];
        Ok(Tensor::cat(&earlier[..if s.len > 1 { 2 } else { 1 }], 1)?)
    };
    let (k_prev, v_prev) = (previous(&initial.k, &k)?, previous(&initial.v, &v)?);
    let both = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
    let h0 = both(&initial.ssm, &initial.ssm.zeros_like()?)?;
    let doubled = crate::ssd::Sizes {
        batch: 2 * s.batch,
        len: s.len,
        heads: s.heads,
        headdim: s.headdim,
        groups: s.heads,
        state: s.state,
    };
    let (y2, h2) = crate::ssd::chunked(
        &both(&v, &v_prev)?,
        &both(&gamma, &beta)?,
        &both(&adt, &adt)?,
        &both(&k, &k_prev)?,
        &both(&q, &q)?,
        chunk_size,
        doubled,
        Some(&h0),
    )?;
    let halves = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(0, 0, s.batch)? + t.narrow(0, s.batch, s.batch)?)?) };
    let mut y = halves(&y2)?;
    if let Some(d) = x.d {
        y = (y + v.broadcast_mul(&cast(d)?.unsqueeze(1)?)?)?;
    }
    if let Some(z) = x.z {
        y = silu_gate(&y, &cast(z)?)?;
    }
    let last = |t: &Tensor| t.narrow(1, s.len - 1, 1).and_then(|t| t.squeeze(1));
    let state = Mamba3State { angle: wrap_angle(&last(&phi)?)?, ssm: halves(&h2)?, k: last(&k)?, v: last(&v)? };
    let back = |t: Tensor| t.to_dtype(out_dtype);
    Ok(Mamba3Output {
        y: back(y)?,
        state: Mamba3State { angle: back(state.angle)?, ssm: back(state.ssm)?, k: back(state.k)?, v: back(state.v)? },
    })
}
