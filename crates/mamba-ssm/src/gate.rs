//! The SiLU gate y * silu(z) of both mixers as one parallel pass with its backward (candle's
//! element-wise ops run on one core and call libm's exp).

use crate::error::{check, Result};
use crate::math::{simd_fn, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const SPAN: usize = 1 << 14;

/// y * silu(z) for tensors of one shape; differentiable in both.
pub fn silu_gate(y: &Tensor, z: &Tensor) -> Result<Tensor> {
    let dims: Vec<_> = y.dims().iter().map(|&d| ("", d)).collect();
    check("z", z, &dims)?;
    let z = z.to_dtype(y.dtype())?;
    if !matches!(y.dtype(), DType::F32 | DType::F64) || !y.device().is_cpu() {
        return Ok((y * z.silu()?)?);
    }
    Ok(y.contiguous()?.apply_op2(&z.contiguous()?, SiluGate)?)
}

struct SiluGate;

fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::cpu::flat(s, l)
}

simd_fn! {
    fn gate_span<T, S>(y: &[T], z: &[T], out: &mut [T]) {
        for ((o, &y), &z) in out.iter_mut().zip(y).zip(z) {
            *o = y * z * z.sigmoid::<S>();
        }
    }
}

simd_fn! {
    /// (dy, dz) for the output gradient g; silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z).
    fn gate_grad_span<T, S>(y: &[T], z: &[T], g: &[T], dy: &mut [T], dz: &mut [T]) {
        for i in 0..y.len() {
            let s = z[i].sigmoid::<S>();
            dy[i] = g[i] * z[i] * s;
            dz[i] = g[i] * y[i] * s * (T::ONE + z[i] * (T::ONE - s));
        }
    }
}

fn gate_fwd<T: Real>(y: &[T], z: &[T]) -> Vec<T> {
    let mut out = crate::cpu::zeros(y.len());
    out.par_chunks_mut(SPAN).zip(y.par_chunks(SPAN).zip(z.par_chunks(SPAN))).for_each(|(o, (y, z))| gate_span(y, z, o));
    out
}

fn gate_bwd<T: Real>(y: &[T], z: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut dy, mut dz) = (crate::cpu::zeros(y.len()), crate::cpu::zeros(y.len()));
    let outs = dy.par_chunks_mut(SPAN).zip(dz.par_chunks_mut(SPAN));
    let ins = y.par_chunks(SPAN).zip(z.par_chunks(SPAN)).zip(g.par_chunks(SPAN));
    outs.zip(ins).for_each(|((dy, dz), ((y, z), g))| gate_grad_span(y, z, g, dy, dz));
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
            CpuStorage::F32(_) => CpuStorage::F32(gate_fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?)),
            CpuStorage::F64(_) => CpuStorage::F64(gate_fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?)),
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
        let (sy, ly) = y.storage_and_layout();
        let (sz, lz) = z.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(sy), candle_core::Storage::Cpu(sz), candle_core::Storage::Cpu(sg)) =
            (&*sy, &*sz, &*sg)
        else {
            candle_core::bail!("silu-gate backward runs on the CPU only");
        };
        let dev = y.device();
        let (dy, dz) = match sy {
            CpuStorage::F32(_) => {
                let (a, b) = gate_bwd::<f32>(slice(sy, ly)?, slice(sz, lz)?, slice(sg, lg)?);
                (Tensor::from_vec(a, y.shape(), dev)?, Tensor::from_vec(b, y.shape(), dev)?)
            }
            CpuStorage::F64(_) => {
                let (a, b) = gate_bwd::<f64>(slice(sy, ly)?, slice(sz, lz)?, slice(sg, lg)?);
                (Tensor::from_vec(a, y.shape(), dev)?, Tensor::from_vec(b, y.shape(), dev)?)
            }
            s => candle_core::bail!("silu-gate: unsupported dtype {:?}", s.dtype()),
        };
        Ok((Some(dy), Some(dz)))
    }
}
