//! The SiLU gate y * silu(z) of both mixers as one parallel pass with its backward (candle's
//! element-wise ops run on one core and call libm's exp).

use crate::cpu::{cpu_storages, flat, for_writing, View3};
use crate::error::{Error, Result};
use crate::math::{simd_fn, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const SPAN: usize = 1 << 14;

/// y * silu(z) for tensors of one shape; differentiable in both. A 3-d z is read in place
/// whatever its strides (a mixer's z is a transposed slice of in_proj's output).
pub fn silu_gate(y: &Tensor, z: &Tensor) -> Result<Tensor> {
    if z.dims() != y.dims() {
        return Err(Error::Shape {
            tensor: "z",
            expected: format!("the shape of y, {:?}", y.dims()),
            got: z.dims().to_vec(),
        });
    }
    let z = z.to_dtype(y.dtype())?;
    if !matches!(y.dtype(), DType::F32 | DType::F64) || !y.device().is_cpu() {
        return Ok((y * z.silu()?)?);
    }
    let z = if z.rank() == 3 { z } else { z.contiguous()? };
    Ok(y.contiguous()?.apply_op2(&z, SiluGate)?)
}

struct SiluGate;

/// z as rows of its last dimension, with the number of rows per index of its first dimension:
/// a contiguous tensor of any rank is one block of rows, a strided z is 3-d (see `silu_gate`).
fn z_rows<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(View3<'a, T>, usize)> {
    if l.is_contiguous() {
        let data = flat(s, l)?;
        let row = l.dims().last().copied().unwrap_or(1).max(1);
        let rows = data.len() / row;
        Ok((View3::from_slice(data, [1, rows, row]), rows.max(1)))
    } else {
        Ok((View3::new(s, l)?, l.dims()[1]))
    }
}

/// Rows of y per rayon task.
fn min_rows(row: usize) -> usize {
    (SPAN / row.max(1)).max(1)
}

simd_fn! {
    pub(crate) fn gate_span<T, S>(y: &[T], z: &[T], out: &mut [T]) {
        for ((o, &y), &z) in out.iter_mut().zip(y).zip(z) {
            *o = y * z * z.sigmoid::<S>();
        }
    }
}

simd_fn! {
    /// (dy, dz) for the output gradient g; silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z).
    pub(crate) fn gate_grad_span<T, S>(y: &[T], z: &[T], g: &[T], dy: &mut [T], dz: &mut [T]) {
        for i in 0..y.len() {
            let s = z[i].sigmoid::<S>();
            dy[i] = g[i] * z[i] * s;
            dz[i] = g[i] * y[i] * s * (T::ONE + z[i] * (T::ONE - s));
        }
    }
}

fn gate_fwd<T: Real>(y: &[T], (z, mid): (View3<T>, usize)) -> Vec<T> {
    let row = z.row_len();
    // SAFETY: the rows cover `out`, and gate_span writes each of its elements.
    let mut out = unsafe { for_writing(y.len()) };
    let rows = out.par_chunks_mut(row).zip(y.par_chunks(row)).enumerate().with_min_len(min_rows(row));
    rows.for_each_init(Vec::new, |buf, (r, (o, y))| gate_span(y, z.row(r / mid, r % mid, buf), o));
    out
}

/// (dy, dz) for the output gradient g; both contiguous.
fn gate_bwd<T: Real>(y: &[T], (z, mid): (View3<T>, usize), g: &[T]) -> (Vec<T>, Vec<T>) {
    let row = z.row_len();
    // SAFETY: the rows cover both, and gate_grad_span writes each element of both.
    let (mut dy, mut dz) = unsafe { (for_writing(y.len()), for_writing(y.len())) };
    let outs = dy.par_chunks_mut(row).zip(dz.par_chunks_mut(row));
    let rows = outs.zip(y.par_chunks(row).zip(g.par_chunks(row))).enumerate().with_min_len(min_rows(row));
    rows.for_each_init(Vec::new, |buf, (r, ((dy, dz), (y, g)))| {
        gate_grad_span(y, z.row(r / mid, r % mid, buf), g, dy, dz)
    });
    (dy, dz)
}

impl CustomOp2 for SiluGate {
    fn name(&self) -> &'static str {
        "silu-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(gate_fwd::<f32>(flat(s1, l1)?, z_rows(s2, l2)?)),
            CpuStorage::F64(_) => CpuStorage::F64(gate_fwd::<f64>(flat(s1, l1)?, z_rows(s2, l2)?)),
            s => candle_core::bail!("silu-gate: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        cpu_storages!("silu-gate"; (sy, ly) = y, (sz, lz) = z, (sg, lg) = g);
        let dev = y.device();
        let (dy, dz) = match sy {
            CpuStorage::F32(_) => {
                let (a, b) = gate_bwd::<f32>(flat(sy, ly)?, z_rows(sz, lz)?, flat(sg, lg)?);
                (Tensor::from_vec(a, y.shape(), dev)?, Tensor::from_vec(b, y.shape(), dev)?)
            }
            CpuStorage::F64(_) => {
                let (a, b) = gate_bwd::<f64>(flat(sy, ly)?, z_rows(sz, lz)?, flat(sg, lg)?);
                (Tensor::from_vec(a, y.shape(), dev)?, Tensor::from_vec(b, y.shape(), dev)?)
            }
            s => candle_core::bail!("silu-gate: unsupported dtype {:?}", s.dtype()),
        };
        Ok((Some(dy), Some(dz)))
    }
}
