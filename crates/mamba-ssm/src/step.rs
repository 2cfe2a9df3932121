//! One decoding step of either scan as a single pass over the state: each state row is read once,
//! decayed, given its input, written and read out, where the candle-op versions (`*_ref`) make
//! five passes with broadcast temporaries as large as the state (Mamba-2's is 24 x 64 x 128 per
//! layer for mamba2-130m). Forward only, for decoding: training goes through the scans.
//! CPU f32/f64, and on a GPU (feature `cuda`) f32/bf16 through kernels/state_update.cu; other
//! dtypes and devices take the candle-op versions.

use crate::error::Result;
use crate::math::{madd, simd_fn, Real};
use crate::selective_scan::{check_step, finish_step, selective_state_update_ref, step_delta, ScanParams};
use crate::ssd::{check_ssd_step, effective_dt, finish, ssd_state_update_ref, SsdParams};
use candle_core::{DType, Tensor, WithDType};
use rayon::prelude::*;

simd_fn! {
    /// One state row: new = h * decay + xdt * B and y = new · C, with decay = exp(dt * A[i]) per
    /// state index (Mamba-1, `a` one row of A) or one `decay` for the whole row (`a` empty).
    fn step_row<T, S>(h: &[T], new: &mut [T], y: &mut T, xdt: T, dt: T, a: &[T], decay: T, b: &[T], c: &[T]) {
        const ACC: usize = 8;
        let mut acc = [T::ZERO; ACC];
        let n = h.len();
        let full = n - n % ACC;
        let mut one = |i: usize, lane: &mut T| {
            let d = if a.is_empty() { decay } else { (dt * a[i]).exp::<S>() };
            let v = madd::<T, S>(xdt, b[i], h[i] * d);
            new[i] = v;
            *lane = madd::<T, S>(v, c[i], *lane);
        };
        for i0 in (0..full).step_by(ACC) {
            for (l, lane) in acc.iter_mut().enumerate() {
                one(i0 + l, lane);
            }
        }
        let mut tail = T::ZERO;
        for i in full..n {
            one(i, &mut tail);
        }
        for v in acc {
            tail += v;
        }
        *y = tail;
    }
}

/// The contiguous data of a CPU tensor.
fn data<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

fn fused<T: WithDType>(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == T::DTYPE
}

/// One decoding step of the selective scan: returns (y (batch, dim), new state (batch, dim,
/// state)). state: (batch, dim, state); x, delta: (batch, dim); a: (dim, state); b, c: (batch,
/// state) or (batch, groups, state); z in `p` is (batch, dim). Not differentiable on the CPU in
/// f32/f64 (see [`selective_state_update_ref`]).
pub fn selective_state_update(
    state: &Tensor,
    x: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if state.device().is_cuda() && matches!(state.dtype(), DType::F32 | DType::BF16) {
        let (batch, dim, n, groups) = check_step(state, x, delta, a, b, c, p)?;
        let args = crate::cuda::StepArgs {
            batch: batch as i32,
            rows: dim as i32,
            state: n as i32,
            groups: groups as i32,
            headdim: 1,
        };
        let (y, new) = cuda_step(args, false, state, x, &step_delta(delta, p)?, a, b, c)?;
        return Ok((finish_step(y.reshape((batch, dim))?, x, p)?, new));
    }
    match state.dtype() {
        DType::F32 if fused::<f32>(x) => selective_step::<f32>(state, x, delta, a, b, c, p),
        DType::F64 if fused::<f64>(x) => selective_step::<f64>(state, x, delta, a, b, c, p),
        _ => selective_state_update_ref(state, x, delta, a, b, c, p),
    }
}

fn selective_step<T: Real>(
    state: &Tensor,
    x: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &ScanParams,
) -> Result<(Tensor, Tensor)> {
    let (batch, dim, n, groups) = check_step(state, x, delta, a, b, c, p)?;
    let dt = step_delta(delta, p)?;
    let (h, x_v, dt_v, a_v) = (data::<T>(state)?, data::<T>(x)?, data::<T>(&dt)?, data::<T>(a)?);
    let (b_v, c_v) = (data::<T>(b)?, data::<T>(c)?);
    let mut new = vec![T::ZERO; h.len()];
    let mut y = vec![T::ZERO; batch * dim];
    let per_group = dim / groups;
    new.par_chunks_mut(n).zip(y.par_iter_mut()).enumerate().for_each(|(row, (new, y))| {
        let (bi, d) = (row / dim, row % dim);
        let bc = (bi * groups + d / per_group) * n..(bi * groups + d / per_group + 1) * n;
        let (xdt, dt) = (x_v[row] * dt_v[row], dt_v[row]);
        let a_row = &a_v[d * n..(d + 1) * n];
        step_row(&h[row * n..(row + 1) * n], new, y, xdt, dt, a_row, T::ZERO, &b_v[bc.clone()], &c_v[bc]);
    });
    let dev = state.device();
    let y = finish_step(Tensor::from_vec(y, (batch, dim), dev)?, x, p)?;
    Ok((y, Tensor::from_vec(new, (batch, dim, n), dev)?))
}

/// One decoding step of SSD: state (batch, heads, headdim, state), x (batch, heads, headdim),
/// dt (batch, heads), A (heads), B/C (batch, groups, state); returns (y (batch, heads, headdim),
/// new state). Not differentiable on the CPU in f32/f64 (see [`ssd_state_update_ref`]).
pub fn ssd_state_update(
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &SsdParams,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda() && matches!(h.dtype(), DType::F32 | DType::BF16) {
        let (batch, heads, headdim, n, groups) = check_ssd_step(h, x, dt, a, b, c)?;
        let args = crate::cuda::StepArgs {
            batch: batch as i32,
            rows: (heads * headdim) as i32,
            state: n as i32,
            groups: groups as i32,
            headdim: headdim as i32,
        };
        let (y, new) = cuda_step(args, true, h, x, &effective_dt(dt, p)?, a, b, c)?;
        return Ok((finish(y.reshape((batch, heads, headdim))?, x, p, x.dtype())?, new));
    }
    match h.dtype() {
        DType::F32 if fused::<f32>(x) => ssd_step::<f32>(h, x, dt, a, b, c, p),
        DType::F64 if fused::<f64>(x) => ssd_step::<f64>(h, x, dt, a, b, c, p),
        _ => ssd_state_update_ref(h, x, dt, a, b, c, p),
    }
}

fn ssd_step<T: Real>(
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    p: &SsdParams,
) -> Result<(Tensor, Tensor)> {
    let (batch, heads, headdim, n, groups) = check_ssd_step(h, x, dt, a, b, c)?;
    let dt = effective_dt(dt, p)?;
    let (x_v, dt_v, a_v, b_v, c_v) = (data::<T>(x)?, data::<T>(&dt)?, data::<T>(a)?, data::<T>(b)?, data::<T>(c)?);
    let h_v = data::<T>(h)?;
    let mut new = vec![T::ZERO; h_v.len()];
    let mut y = vec![T::ZERO; batch * heads * headdim];
    let per_group = heads / groups;
    // One task per (batch, head): headdim rows sharing dt, decay, B and C.
    new.par_chunks_mut(headdim * n).zip(y.par_chunks_mut(headdim)).enumerate().for_each(|(bh, (new, y))| {
        let (bi, head) = (bh / heads, bh % heads);
        let g = bi * groups + head / per_group;
        let (b_row, c_row) = (&b_v[g * n..(g + 1) * n], &c_v[g * n..(g + 1) * n]);
        let dt = dt_v[bh];
        let decay = (dt * a_v[head]).exp::<crate::math::Plain>();
        for (pi, (new, y)) in new.chunks_mut(n).zip(y.iter_mut()).enumerate() {
            let row = bh * headdim + pi;
            step_row(&h_v[row * n..(row + 1) * n], new, y, x_v[row] * dt, dt, &[], decay, b_row, c_row);
        }
    });
    let dev = h.device();
    let y = Tensor::from_vec(y, (batch, heads, headdim), dev)?;
    Ok((finish(y, x, p, x.dtype())?, Tensor::from_vec(new, (batch, heads, headdim, n), dev)?))
}

/// A decode step on the GPU (state_update.cu): x, dt, A, B and C joined into two flat tensors
/// of the state's dtype (a custom op takes three); returns y (flat, before D and the gate) and the
/// new state.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn cuda_step(
    args: crate::cuda::StepArgs,
    ssd: bool,
    h: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let flat = |t: &Tensor| t.to_dtype(h.dtype())?.flatten_all();
    let xdt = Tensor::cat(&[flat(x)?, flat(dt)?], 0)?;
    let abc = Tensor::cat(&[flat(a)?, flat(b)?, flat(c)?], 0)?;
    let out = h.contiguous()?.apply_op3(&xdt, &abc, CudaStep { args, ssd, a_len: a.elem_count() })?;
    let rows = x.elem_count();
    Ok((out.narrow(0, 0, rows)?, out.narrow(0, rows, h.elem_count())?.reshape(h.shape())?))
}

#[cfg(feature = "cuda")]
struct CudaStep {
    args: crate::cuda::StepArgs,
    ssd: bool,
    a_len: usize,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp3 for CudaStep {
    crate::cuda::gpu_only!("state-update");

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let rows = (self.args.batch * self.args.rows) as usize;
        let out = crate::cuda::step(self.args, self.ssd, self.a_len, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, candle_core::Shape::from(rows + l1.shape().elem_count())))
    }
}
