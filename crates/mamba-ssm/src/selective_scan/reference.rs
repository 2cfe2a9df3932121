//! The reference: one decoding step from candle ops, and the scan as a loop of those steps.

use super::{check_inputs, check_step, Checked, Dims, ScanOutput, ScanParams};
use crate::error::Result;
use crate::softplus;
use candle_core::Tensor;

/// One decoding step from candle ops, on any device and differentiable: the reference for
/// [`crate::selective_state_update`] (same arguments) and the step of [`selective_scan_ref`].
pub fn selective_state_update_ref(
    state: &Tensor,
    x: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
) -> Result<(Tensor, Tensor)> {
    let (batch, dim, n, _) = check_step(state, x, delta, a, b, c, p)?;
    let (b, c) = if b.rank() == 3 {
        let groups = b.dim(1)?;
        let per_group = |t: &Tensor| -> Result<Tensor> {
            Ok(t.unsqueeze(2)?.broadcast_as((batch, groups, dim / groups, n))?.reshape((batch, dim, n))?)
        };
        (per_group(b)?, per_group(c)?)
    } else {
        (b.unsqueeze(1)?.broadcast_as((batch, dim, n))?, c.unsqueeze(1)?.broadcast_as((batch, dim, n))?)
    };
    let dt = step_delta(delta, p)?.unsqueeze(2)?;
    let decay = dt.broadcast_mul(a)?.exp()?;
    let new_state = ((decay * state)? + dt.broadcast_mul(&b)?.broadcast_mul(&x.unsqueeze(2)?)?)?;
    Ok((finish_step((&new_state * c)?.sum(2)?, x, p)?, new_state))
}

/// The dt of a decoding step: delta (+ delta_bias), through softplus when asked. (batch, dim).
pub(crate) fn step_delta(delta: &Tensor, p: &ScanParams) -> Result<Tensor> {
    let mut dt = delta.clone();
    if let Some(bias) = p.delta_bias {
        dt = dt.broadcast_add(bias)?;
    }
    if p.delta_softplus {
        dt = softplus(&dt)?;
    }
    Ok(dt)
}

/// The output of a decoding step from C h: + D x, then * silu(z). (batch, dim).
pub(crate) fn finish_step(mut y: Tensor, x: &Tensor, p: &ScanParams) -> Result<Tensor> {
    if let Some(d) = p.d {
        y = (y + x.broadcast_mul(d)?)?;
    }
    if let Some(z) = p.z {
        y = (y * z.silu()?)?;
    }
    Ok(y)
}

/// The reference scan: [`selective_state_update_ref`] in a loop over time, differentiated by candle.
/// Same arguments and results as [`selective_scan`]; slow, and obviously right.
pub fn selective_scan_ref(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
    initial_state: Option<&Tensor>,
) -> Result<ScanOutput> {
    let Checked { dims, b, c } = check_inputs(u, delta, a, b, c, p, initial_state)?;
    let Dims { batch, dim, len, state: n, .. } = dims;
    let mut h = match initial_state {
        Some(h0) => h0.clone(),
        None => Tensor::zeros((batch, dim, n), u.dtype(), u.device())?,
    };
    let mut ys = Vec::with_capacity(len);
    let step = ScanParams { z: None, ..*p };
    for t in 0..len {
        let at = |x: &Tensor| x.narrow(x.rank() - 1, t, 1).and_then(|x| x.squeeze(x.rank() - 1));
        let (y, next) = selective_state_update_ref(&h, &at(u)?, &at(delta)?, a, &at(&b)?, &at(&c)?, &step)?;
        ys.push(y);
        h = next;
    }
    let mut y = Tensor::stack(&ys, 2)?;
    if let Some(z) = p.z {
        y = (y * z.silu()?)?;
    }
    Ok(ScanOutput { y, last_state: h })
}
