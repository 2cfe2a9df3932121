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
//!
//! MIMO of rank r (`Mamba3Inputs::mimo`): each token carries r queries and keys, and r values
//! and gates made from its one x and z by per-head weights, v_{t,j} = x_t * mimo_x[h, j] and
//! z_{t,j} = z_t * mimo_z[h, j]. H adds the r outer products v k^T of a token, each rank reads
//! y_{t,j} = (H_t q_{t,j} + D v_{t,j}) * silu(z_{t,j}), and y_t = sum_j y_{t,j} * mimo_o[h, j].
//! MIMO rotates the pairs (i, i + state / 2), as mamba_ssm's MIMO layer and kernel do. SISO is
//! rank 1 with unit weights, and every function here computes both the same way.

use crate::error::{argument, check, dims, Result};
use crate::gate::silu_gate;
use crate::ssd::per_head;
use candle_core::{DType, Tensor, D};
use std::f64::consts::PI;

/// The inputs of a Mamba-3 scan. Q is C and K is B, as the layer hands them over.
#[derive(Clone, Copy)]
pub struct Mamba3Inputs<'a> {
    /// (batch, len, groups, state); MIMO (batch, len, rank, groups, state).
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    /// (batch, len, heads, headdim): the layer's x.
    pub v: &'a Tensor,
    /// A dt, dt and the trapezoid's mix before its sigmoid: (batch, heads, len).
    pub adt: &'a Tensor,
    pub dt: &'a Tensor,
    pub trap: &'a Tensor,
    /// Added to the queries and keys before the rotation: (heads, state); MIMO (heads, rank, state).
    pub q_bias: &'a Tensor,
    pub k_bias: &'a Tensor,
    /// Rotation rates, before pi tanh: (batch, len, heads, angles), 2 angles <= state.
    pub angles: &'a Tensor,
    /// Skip connection, (heads).
    pub d: Option<&'a Tensor>,
    /// Gate y * silu(z), shaped like v.
    pub z: Option<&'a Tensor>,
    /// MIMO's weights; None is SISO.
    pub mimo: Option<Mimo<'a>>,
}

/// MIMO's per-head, per-rank weights of the values, the gates and the outputs: (heads, rank,
/// headdim) each.
#[derive(Clone, Copy)]
pub struct Mimo<'a> {
    pub x: &'a Tensor,
    pub z: &'a Tensor,
    /// None: y keeps a rank dim, (batch, len, rank, heads, headdim), for a norm of each rank's
    /// output before they are summed (the layer's out-proj norm).
    pub o: Option<&'a Tensor>,
}

/// What a Mamba-3 scan carries from one token to the next.
#[derive(Debug, Clone)]
pub struct Mamba3State {
    /// The rotation angles, in [0, 2 pi): (batch, heads, angles).
    pub angle: Tensor,
    /// H: (batch, heads, headdim, state).
    pub ssm: Tensor,
    /// The last token's rotated, biased key: (batch, heads, state); MIMO (batch, heads, rank,
    /// state).
    pub k: Tensor,
    /// The last token's value (MIMO: its x, before the rank's weights): (batch, heads, headdim).
    pub v: Tensor,
}

impl Mamba3State {
    /// The state of sequences not yet started, of (batch, heads, headdim, state, angles) and, for
    /// MIMO, that rank.
    pub fn zeros(
        [batch, heads, headdim, state, angles]: [usize; 5],
        mimo_rank: Option<usize>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let k = match mimo_rank {
            Some(rank) => vec![batch, heads, rank, state],
            None => vec![batch, heads, state],
        };
        Ok(Self {
            angle: Tensor::zeros((batch, heads, angles), dtype, device)?,
            ssm: Tensor::zeros((batch, heads, headdim, state), dtype, device)?,
            k: Tensor::zeros(k, dtype, device)?,
            v: Tensor::zeros((batch, heads, headdim), dtype, device)?,
        })
    }
}

pub struct Mamba3Output {
    /// Shaped like v (MIMO without output weights: with a rank dim after len).
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
    /// 1 for SISO.
    pub rank: usize,
    pub mimo: bool,
}

impl Mamba3Sizes {
    /// A state of zeros: no token seen.
    fn empty(&self, dtype: DType, device: &candle_core::Device) -> Result<Mamba3State> {
        let Self { batch, heads, headdim, state, angles, rank, mimo, .. } = *self;
        Mamba3State::zeros([batch, heads, headdim, state, angles], mimo.then_some(rank), dtype, device)
    }

    /// A SISO key-shaped tensor with its rank dim (of 1) at `dim`; MIMO's as it is.
    fn ranked(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        Ok(if self.mimo { t.clone() } else { t.unsqueeze(dim)? })
    }

    /// A state's key as the scans hold keys, (batch, rank, heads, state).
    fn keys_in(&self, k: &Tensor) -> Result<Tensor> {
        Ok(if self.mimo { k.transpose(1, 2)? } else { k.unsqueeze(1)? })
    }

    /// The inverse of `keys_in`.
    fn keys_out(&self, k: Tensor) -> Result<Tensor> {
        Ok(if self.mimo { k.transpose(1, 2)?.contiguous()? } else { k.squeeze(1)? })
    }

    /// Queries or keys (.., [rank,] groups, state) with the rank dim at `rank_dim`, per head and
    /// biased: (.., rank, heads, state).
    fn biased(&self, t: &Tensor, bias: &Tensor, rank_dim: usize) -> Result<Tensor> {
        let t = per_head(&self.ranked(t, rank_dim)?, rank_dim + 1, self.heads)?;
        Ok(t.broadcast_add(&self.ranked(bias, 1)?.transpose(0, 1)?)?)
    }

    /// Rotates the rotated pairs of x's last dim by phi (which broadcasts to x's other dims).
    fn rotate(&self, x: &Tensor, phi: &Tensor) -> Result<Tensor> {
        if self.mimo {
            rotate_halves(x, phi)
        } else {
            rotate(x, phi)
        }
    }
}

fn check_inputs(x: &Mamba3Inputs, initial: Option<&Mamba3State>) -> Result<Mamba3Sizes> {
    let [batch, len, heads, headdim] = dims("v", x.v, ["batch", "len", "heads", "headdim"])?;
    if len == 0 {
        return Err(argument("v", "the sequence length must be at least 1"));
    }
    let mimo = x.mimo.is_some();
    let (rank, groups, state) = if mimo {
        let [_, _, rank, groups, state] = dims("q", x.q, ["batch", "len", "rank", "groups", "state"])?;
        (rank, groups, state)
    } else {
        let [_, _, groups, state] = dims("q", x.q, ["batch", "len", "groups", "state"])?;
        (1, groups, state)
    };
    let (b, l, r, g, n, h, p) = (
        ("batch", batch),
        ("len", len),
        ("rank", rank),
        ("groups", groups),
        ("state", state),
        ("heads", heads),
        ("headdim", headdim),
    );
    let (qk, bias): (Vec<_>, Vec<_>) =
        if mimo { (vec![b, l, r, g, n], vec![h, r, n]) } else { (vec![b, l, g, n], vec![h, n]) };
    check("q", x.q, &qk)?;
    check("k", x.k, &qk)?;
    if groups == 0 || heads % groups != 0 {
        return Err(argument("q", format!("groups ({groups}) must divide heads ({heads})")));
    }
    if rank == 0 {
        return Err(argument("q", "MIMO's rank must be at least 1"));
    }
    for (name, t) in [("adt", x.adt), ("dt", x.dt), ("trap", x.trap)] {
        check(name, t, &[b, h, l])?;
    }
    check("q_bias", x.q_bias, &bias)?;
    check("k_bias", x.k_bias, &bias)?;
    let [_, _, _, angles] = dims("angles", x.angles, ["batch", "len", "heads", "angles"])?;
    check("angles", x.angles, &[b, l, h, ("angles", angles)])?;
    if 2 * angles > state {
        return Err(argument("angles", format!("{angles} angles rotate more pairs than a state of {state} has")));
    }
    if mimo && !state.is_multiple_of(2) {
        return Err(argument(
            "q",
            format!("MIMO rotates the halves of the state, which needs an even state, not {state}"),
        ));
    }
    if let Some(d) = x.d {
        check("D", d, &[h])?;
    }
    if let Some(z) = x.z {
        check("z", z, &[b, l, h, p])?;
    }
    if let Some(m) = x.mimo {
        for (name, t) in [("mimo_x", Some(m.x)), ("mimo_z", Some(m.z)), ("mimo_o", m.o)] {
            if let Some(t) = t {
                check(name, t, &[h, r, p])?;
            }
        }
    }
    if let Some(s) = initial {
        check("angle state", &s.angle, &[b, h, ("angles", angles)])?;
        check("ssm state", &s.ssm, &[b, h, p, n])?;
        check("k state", &s.k, &if mimo { vec![b, h, r, n] } else { vec![b, h, n] })?;
        check("v state", &s.v, &[b, h, p])?;
    }
    Ok(Mamba3Sizes { batch, len, heads, headdim, groups, state, angles, rank, mimo })
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
/// phi: (.., angles), broadcast to x's other dims.
pub(crate) fn rotate(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    let (state, angles) = (x.dim(D::Minus1)?, phi.dim(D::Minus1)?);
    let mut pairs_shape = x.dims().to_vec();
    *pairs_shape.last_mut().unwrap() = angles;
    pairs_shape.push(2);
    let pairs = x.narrow(D::Minus1, 0, 2 * angles)?.reshape(pairs_shape)?;
    let (x0, x1) =
        (pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?, pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?);
    let [r0, r1] = rotate_pair(&x0, &x1, phi)?;
    let rotated = Tensor::stack(&[r0, r1], D::Minus1)?.flatten_from(D::Minus2)?;
    if 2 * angles == state {
        return Ok(rotated);
    }
    Ok(Tensor::cat(&[rotated, x.narrow(D::Minus1, 2 * angles, state - 2 * angles)?], D::Minus1)?)
}

/// Rotates the pairs (i, i + state / 2) of x's last dim by phi_i, for i < phi's last dim.
fn rotate_halves(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    let (state, angles) = (x.dim(D::Minus1)?, phi.dim(D::Minus1)?);
    let half = state / 2;
    let [r0, r1] = rotate_pair(&x.narrow(D::Minus1, 0, angles)?, &x.narrow(D::Minus1, half, angles)?, phi)?;
    let mut parts = vec![r0];
    if half > angles {
        parts.push(x.narrow(D::Minus1, angles, half - angles)?);
    }
    parts.push(r1);
    if half > angles {
        parts.push(x.narrow(D::Minus1, half + angles, half - angles)?);
    }
    Ok(Tensor::cat(&parts, D::Minus1)?)
}

/// (x0 cos phi - x1 sin phi, x0 sin phi + x1 cos phi).
fn rotate_pair(x0: &Tensor, x1: &Tensor, phi: &Tensor) -> Result<[Tensor; 2]> {
    let (cos, sin) = (phi.cos()?, phi.sin()?);
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok([r0, r1])
}

/// The rank's values or gates, (.., rank, heads, headdim), from one (.., heads, headdim) tensor and
/// MIMO's (heads, rank, headdim) weights; SISO's one rank is the tensor itself.
fn per_rank(t: &Tensor, weights: Option<&Tensor>, rank_dim: usize) -> Result<Tensor> {
    let t = t.unsqueeze(rank_dim)?;
    Ok(match weights {
        Some(w) => t.broadcast_mul(&w.transpose(0, 1)?)?,
        None => t,
    })
}

/// y (.., rank, heads, headdim) with its D skip and gate per rank, summed over the ranks with
/// MIMO's output weights when it has them.
fn finish_ranks(
    mut y: Tensor,
    v: &Tensor,
    x: &Mamba3Inputs,
    z: Option<&Tensor>,
    rank_dim: usize,
    cast: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    if let Some(d) = x.d {
        y = (y + v.broadcast_mul(&cast(d)?.unsqueeze(1)?)?)?;
    }
    if let Some(z) = z {
        let z = per_rank(&cast(z)?, x.mimo.map(|m| cast(m.z)).transpose()?.as_ref(), rank_dim)?;
        y = silu_gate(&y, &z)?;
    }
    Ok(match x.mimo {
        Some(Mimo { o: Some(o), .. }) => y.broadcast_mul(&cast(o)?.transpose(0, 1)?)?.sum(rank_dim)?,
        Some(_) => y,
        None => y.squeeze(rank_dim)?,
    })
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
    // Queries, keys and values per rank: (b, r, h, n | p).
    let key = |t: &Tensor, bias: &Tensor| s.rotate(&s.biased(&token(t)?, bias, 1)?, &angle.unsqueeze(1)?);
    let (q, k) = (key(x.q, x.q_bias)?, key(x.k, x.k_bias)?);
    let x_t = token(x.v)?;
    let values = |x_t: &Tensor| per_rank(x_t, x.mimo.map(|m| m.x), 1);
    let (v, v_prev, k_prev) = (values(&x_t)?, values(&state.v)?, s.keys_in(&state.k)?);
    let lambda = sigmoid(&trap)?;
    let alpha = adt.exp()?;
    let beta = ((lambda.affine(-1.0, 1.0)? * &dt)? * &alpha)?;
    let gamma = (&lambda * &dt)?;
    // sum over the ranks of v k^T, weighted per head: (b, h, p, n).
    let outer = |v: &Tensor, k: &Tensor, w: &Tensor| -> Result<Tensor> {
        let vk = v.permute((0, 2, 3, 1))?.contiguous()?.matmul(&k.transpose(1, 2)?.contiguous()?)?;
        Ok(vk.broadcast_mul(&w.unsqueeze(2)?.unsqueeze(3)?)?)
    };
    let decay = alpha.unsqueeze(2)?.unsqueeze(3)?;
    let ssm = ((state.ssm.broadcast_mul(&decay)? + outer(&v_prev, &k_prev, &beta)?)? + outer(&v, &k, &gamma)?)?;
    // H q per rank: (b, h, p, r) -> (b, r, h, p).
    let y = ssm.matmul(&q.permute((0, 2, 3, 1))?.contiguous()?)?.permute((0, 3, 1, 2))?;
    let z = x.z.map(token).transpose()?;
    let y = finish_ranks(y, &v, x, z.as_ref(), 1, |t| Ok(t.clone()))?;
    Ok((y.unsqueeze(1)?, Mamba3State { angle, ssm, k: s.keys_out(k)?, v: x_t }))
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
///
/// MIMO's ranks become positions: the scan runs over len x rank positions, a token's ranks in a
/// row with its decay on the first, so that a rank sees every earlier token's ranks and its own
/// token's ranks up to itself; the token's later ranks, which H_t holds too, are added from a
/// rank x rank product per token.
pub fn mamba3_chunk_scan_ref(
    x: &Mamba3Inputs,
    chunk_size: usize,
    initial: Option<&Mamba3State>,
) -> Result<Mamba3Output> {
    chunk_scan(x, chunk_size, initial, crate::ssd::chunked)
}

/// [`mamba3_chunk_scan_ref`] with its chunked scan on the CPU kernel of SSD (forward and a
/// hand-written backward; the trapezoid's two halves as one doubled batch, each step's log decay
/// an input of its own), the rotation, the trapezoid's weights and the gate from candle ops
/// around it. Off the CPU, the candle-op form. The kernel chunks by 64 steps whatever
/// `chunk_size` (the chunking changes only rounding).
pub fn mamba3_chunk_scan(x: &Mamba3Inputs, chunk_size: usize, initial: Option<&Mamba3State>) -> Result<Mamba3Output> {
    chunk_scan(x, chunk_size, initial, crate::ssd::chunked_kernel)
}

fn chunk_scan(
    x: &Mamba3Inputs,
    chunk_size: usize,
    initial: Option<&Mamba3State>,
    chunked: crate::ssd::Chunked,
) -> Result<Mamba3Output> {
    let s = check_inputs(x, initial)?;
    if chunk_size == 0 {
        return Err(argument("chunk_size", "must be at least 1"));
    }
    let (batch, len, rank) = (s.batch, s.len, s.rank);
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
    // Queries, keys and values per rank: (b, l, r, h, n | p).
    let key = |t: &Tensor, bias: &Tensor| s.rotate(&s.biased(&cast(t)?, &cast(bias)?, 2)?, &phi.unsqueeze(2)?);
    let (q, k) = (key(x.q, x.q_bias)?, key(x.k, x.k_bias)?);
    let x_v = cast(x.v)?;
    let mimo_x = x.mimo.map(|m| cast(m.x)).transpose()?;
    let v = per_rank(&x_v, mimo_x.as_ref(), 2)?;
    let lambda = sigmoid(&trap)?;
    let gamma = (&lambda * &dt)?;
    let beta = ((lambda.affine(-1.0, 1.0)? * &dt)? * adt.exp()?)?;
    // The previous token's keys and values at each position: the state's, then the sequence's.
    let previous = |state: Tensor, t: &Tensor| -> Result<Tensor> {
        let earlier = [state.unsqueeze(1)?, t.narrow(1, 0, len - 1)?];
        Ok(Tensor::cat(&earlier[..if len > 1 { 2 } else { 1 }], 1)?)
    };
    let k_prev = previous(s.keys_in(&initial.k)?, &k)?;
    let v_prev = previous(per_rank(&initial.v, mimo_x.as_ref(), 1)?, &v)?;
    // (b, l, r, ..) -> (b, l r, ..), and a token's weight and decay on its ranks.
    let positions = |t: &Tensor| -> Result<Tensor> {
        let mut shape = vec![batch, len * rank];
        shape.extend_from_slice(&t.dims()[3..]);
        Ok(t.reshape(shape)?)
    };
    let spread = |w: &Tensor| positions(&w.unsqueeze(2)?.broadcast_as((batch, len, rank, s.heads))?);
    // SISO takes adt itself, as before MIMO existed: a reshaped copy would add its gradients in
    // another order.
    let log_decay = match rank {
        1 => adt.clone(),
        _ => positions(&adt.unsqueeze(2)?.pad_with_zeros(2, 0, rank - 1)?)?,
    };
    let both = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
    let h0 = both(&initial.ssm, &initial.ssm.zeros_like()?)?;
    let doubled = crate::ssd::Sizes {
        batch: 2 * batch,
        len: len * rank,
        heads: s.heads,
        headdim: s.headdim,
        groups: s.heads,
        state: s.state,
    };
    let (y2, h2) = chunked(
        &both(&positions(&v)?, &positions(&v_prev)?)?,
        &both(&spread(&gamma)?, &spread(&beta)?)?,
        &both(&log_decay, &log_decay)?,
        &both(&positions(&k)?, &positions(&k_prev)?)?,
        &both(&positions(&q)?, &positions(&q)?)?,
        chunk_size * rank,
        doubled,
        Some(&h0),
    )?;
    let halves = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(0, 0, batch)? + t.narrow(0, batch, batch)?)?) };
    let mut y = halves(&y2)?.reshape((batch, len, rank, s.heads, s.headdim))?;
    if rank > 1 {
        y = (y + later_ranks(&q, &k, &v, &gamma)? + later_ranks(&q, &k_prev, &v_prev, &beta)?)?;
    }
    let y = finish_ranks(y, &v, x, x.z, 2, cast)?;
    let last = |t: &Tensor| t.narrow(1, len - 1, 1).and_then(|t| t.squeeze(1));
    let state =
        Mamba3State { angle: wrap_angle(&last(&phi)?)?, ssm: halves(&h2)?, k: s.keys_out(last(&k)?)?, v: last(&x_v)? };
    let back = |t: Tensor| t.to_dtype(out_dtype);
    Ok(Mamba3Output {
        y: back(y)?,
        state: Mamba3State { angle: back(state.angle)?, ssm: back(state.ssm)?, k: back(state.k)?, v: back(state.v)? },
    })
}

/// What a token's later ranks add to each of its ranks' outputs: sum_{j' > j} w (q_j . k_j') v_j'.
/// q, k: (b, l, r, h, n); v: (b, l, r, h, p); w: (b, l, h). Returns (b, l, r, h, p).
fn later_ranks(q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (batch, len, rank, heads, _) = q.dims5()?;
    // (b, l, r, h, ..) -> (b l h, r, ..): candle's matmul takes one batch dim.
    let heads_first = |t: &Tensor| -> Result<Tensor> {
        let last = t.dim(4)?;
        Ok(t.permute((0, 1, 3, 2, 4))?.reshape((batch * len * heads, rank, last))?)
    };
    let scores = heads_first(q)?.matmul(&heads_first(k)?.transpose(1, 2)?.contiguous()?)?; // (b l h, r, r)
    let later: Vec<f64> = (0..rank * rank).map(|i| if i % rank > i / rank { 1.0 } else { 0.0 }).collect();
    let later = Tensor::from_vec(later, (rank, rank), q.device())?.to_dtype(q.dtype())?;
    let w = w.reshape((batch * len * heads, 1, 1))?;
    let y = scores.broadcast_mul(&later)?.broadcast_mul(&w)?.matmul(&heads_first(v)?)?;
    Ok(y.reshape((batch, len, heads, rank, v.dim(4)?))?.permute((0, 1, 3, 2, 4))?)
}
