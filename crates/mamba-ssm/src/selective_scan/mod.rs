//! Mamba-1 selective scan (S6): the API and its checks, and the custom op that dispatches to the
//! CPU kernel (`cpu`) or the GPU one (`cuda`); `reference` holds the plain loop of steps that the
//! tests hold both to.
//!
//! Per channel d and state index n, with dt = softplus(delta + delta_bias) (each part optional):
//!   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,    y_t = C_t . h_t + D u_t,    y_t *= silu(z_t)

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod reference;

pub(crate) use reference::{finish_step, step_delta};
pub use reference::{selective_scan_ref, selective_state_update_ref};

use crate::error::{argument, check, dims, Result};
use crate::gate::silu_gate;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use cpu::{bwd_tensors, run_fwd};
use std::any::Any;
use std::sync::Mutex;

/// The optional parts of the selective scan, as in the reference `selective_scan_ref`.
#[derive(Clone, Copy, Default)]
pub struct ScanParams<'a> {
    /// Skip connection, (dim).
    pub d: Option<&'a Tensor>,
    /// Gate, (batch, dim, len) for the scan and (batch, dim) for a step: y * silu(z).
    pub z: Option<&'a Tensor>,
    /// Added to delta before the softplus, (dim).
    pub delta_bias: Option<&'a Tensor>,
    pub delta_softplus: bool,
}

/// y: (batch, dim, len), last_state: (batch, dim, state), both differentiable.
pub struct ScanOutput {
    pub y: Tensor,
    pub last_state: Tensor,
}

/// Sizes shared by the checks, the packing and the kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub state: usize,
    pub groups: usize,
}

struct Checked {
    dims: Dims,
    /// B and C as (batch, groups, state, len).
    b: Tensor,
    c: Tensor,
}

fn check_inputs(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
    h0: Option<&Tensor>,
) -> Result<Checked> {
    let [batch, dim, len] = dims("u", u, ["batch", "dim", "len"])?;
    if len == 0 {
        return Err(argument("u", "the sequence length must be at least 1"));
    }
    let bdl = [("batch", batch), ("dim", dim), ("len", len)];
    check("delta", delta, &bdl)?;
    let [_, state] = dims("A", a, ["dim", "state"])?;
    check("A", a, &[("dim", dim), ("state", state)])?;
    let groups = match b.rank() {
        4 => b.dim(1)?,
        _ => 1,
    };
    let grouped = [("batch", batch), ("groups", groups), ("state", state), ("len", len)];
    let (b, c) = if b.rank() == 4 {
        check("B", b, &grouped)?;
        check("C", c, &grouped)?;
        (b.clone(), c.clone())
    } else {
        check("B", b, &[("batch", batch), ("state", state), ("len", len)])?;
        check("C", c, &[("batch", batch), ("state", state), ("len", len)])?;
        (b.unsqueeze(1)?, c.unsqueeze(1)?)
    };
    if groups == 0 || dim % groups != 0 {
        return Err(argument("B", format!("groups ({groups}) must divide dim ({dim})")));
    }
    for (name, t) in [("D", p.d), ("delta_bias", p.delta_bias)] {
        if let Some(t) = t {
            check(name, t, &[("dim", dim)])?;
        }
    }
    if let Some(z) = p.z {
        check("z", z, &bdl)?;
    }
    if let Some(h0) = h0 {
        check("initial_state", h0, &[("batch", batch), ("dim", dim), ("state", state)])?;
    }
    Ok(Checked { dims: Dims { batch, dim, len, state, groups }, b, c })
}

/// Checks the inputs of a decoding step: (batch, dim, state, groups), groups 1 for 2-d B and C.
pub(crate) fn check_step(
    state: &Tensor,
    x: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
) -> Result<(usize, usize, usize, usize)> {
    let [batch, dim, n] = dims("state", state, ["batch", "dim", "state"])?;
    let bd = [("batch", batch), ("dim", dim)];
    check("x", x, &bd)?;
    check("delta", delta, &bd)?;
    check("A", a, &[("dim", dim), ("state", n)])?;
    let groups = if b.rank() == 3 {
        let groups = b.dim(1)?;
        if groups == 0 || dim % groups != 0 {
            return Err(argument("B", format!("groups ({groups}) must divide dim ({dim})")));
        }
        check("B", b, &[("batch", batch), ("groups", groups), ("state", n)])?;
        check("C", c, &[("batch", batch), ("groups", groups), ("state", n)])?;
        groups
    } else {
        check("B", b, &[("batch", batch), ("state", n)])?;
        check("C", c, &[("batch", batch), ("state", n)])?;
        1
    };
    if let Some(bias) = p.delta_bias {
        check("delta_bias", bias, &[("dim", dim)])?;
    }
    if let Some(d) = p.d {
        check("D", d, &[("dim", dim)])?;
    }
    if let Some(z) = p.z {
        check("z", z, &bd)?;
    }
    Ok((batch, dim, n, groups))
}

/// f64 stays f64, and bf16 on a GPU (whose kernels widen it to f32 as they read); every other
/// float type computes in f32.
pub(crate) fn compute_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        DType::F64 => DType::F64,
        DType::BF16 if t.device().is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// The selective scan with its backward (states are recomputed, never stored whole).
///
/// u, delta: (batch, dim, len); a: (dim, state); b, c: (batch, state, len) or
/// (batch, groups, state, len); initial_state: (batch, dim, state). bf16 and f16 inputs are
/// computed in f32 and the outputs cast back.
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
    initial_state: Option<&Tensor>,
) -> Result<ScanOutput> {
    let Checked { dims, b, c } = check_inputs(u, delta, a, b, c, p, initial_state)?;
    let dt = compute_dtype(u);
    let cast = |t: &Tensor| t.to_dtype(dt);
    let mut pack = vec![cast(a)?.flatten_all()?, cast(&b)?.flatten_all()?, cast(&c)?.flatten_all()?];
    for t in [p.d, p.delta_bias, initial_state].into_iter().flatten() {
        pack.push(cast(t)?.flatten_all()?);
    }
    let pack = Tensor::cat(&pack, 0)?;
    let (mut u_c, mut delta_c) = (cast(u)?, cast(delta)?);
    if u.device().is_cuda() {
        // The GPU kernels read whole rows; the CPU kernel reads any strides in place.
        (u_c, delta_c) = (u_c.contiguous()?, delta_c.contiguous()?);
    }
    let op = ScanOp {
        dims,
        has_d: p.d.is_some(),
        has_bias: p.delta_bias.is_some(),
        has_h0: initial_state.is_some(),
        softplus: p.delta_softplus,
        keep_checkpoints: u_c.track_op() || delta_c.track_op() || pack.track_op(),
        checkpoints: Mutex::new(None),
    };
    let out = u_c.apply_op3(&delta_c, &pack, op)?;
    let Dims { batch, dim, len, state, .. } = dims;
    let mut y = out.narrow(0, 0, batch * dim * len)?.reshape((batch, dim, len))?;
    let last_state = out.narrow(0, batch * dim * len, batch * dim * state)?.reshape((batch, dim, state))?;
    if let Some(z) = p.z {
        y = silu_gate(&y, &cast(z)?)?;
    }
    Ok(ScanOutput { y: y.to_dtype(u.dtype())?, last_state: last_state.to_dtype(u.dtype())? })
}

/// The custom op: arguments u, delta and the packed parameters [A | B | C | D? | delta_bias? | h0?];
/// result the flat [y (batch, dim, len) | last state (batch, dim, state)].
pub(crate) struct ScanOp {
    pub dims: Dims,
    pub has_d: bool,
    pub has_bias: bool,
    pub has_h0: bool,
    pub softplus: bool,
    pub keep_checkpoints: bool,
    /// The states at chunk starts from the forward pass, for the backward pass: one
    /// `Vec<Lanes<T>>` per item.
    pub checkpoints: Mutex<Option<Box<dyn Any + Send>>>,
}

impl CustomOp3 for ScanOp {
    fn name(&self) -> &'static str {
        "selective-scan"
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
        let Dims { batch, dim, len, state, .. } = self.dims;
        let out = match s1 {
            CpuStorage::F32(_) => run_fwd::<f32>(self, s1, l1, s2, l2, s3, l3)?,
            CpuStorage::F64(_) => run_fwd::<f64>(self, s1, l1, s2, l2, s3, l3)?,
            s => candle_core::bail!("selective-scan computes in f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from(batch * dim * (len + state))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (out, checkpoints) = crate::cuda::scan_fwd(self.cuda_args(), (s1, l1), (s2, l2), (s3, l3))?;
        if self.keep_checkpoints {
            *self.checkpoints.lock().unwrap() = Some(Box::new(checkpoints));
        }
        let Dims { batch, dim, len, state, .. } = self.dims;
        Ok((out, Shape::from(batch * dim * (len + state))))
    }

    fn bwd(
        &self,
        u: &Tensor,
        delta: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if u.device().is_cuda() {
            return self.cuda_bwd(u, delta, pack, &grad);
        }
        let (du, ddelta, dpack) = match u.dtype() {
            DType::F32 => bwd_tensors::<f32>(self, u, delta, pack, &grad)?,
            DType::F64 => bwd_tensors::<f64>(self, u, delta, pack, &grad)?,
            dt => candle_core::bail!("selective-scan computes in f32 or f64, got {dt:?}"),
        };
        Ok((Some(du), Some(ddelta), Some(dpack)))
    }
}
