//! x · wᵀ with the weight held in bf16 or f16 and x and the result in f32: the projections of a
//! model whose weights are stored in half precision. candle's CPU matmul has no bf16 at all, and
//! decoding one token is a matrix-vector product bound by reading the weight, so halving the
//! bytes read is the whole gain: the kernel widens each weight row to f32 in L1 and never
//! materialises the f32 matrix.

use crate::error::{Error, Result};
use crate::math::{madd, simd_fn};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Up to this many rows of x go through the kernel; more rows amortise widening the whole weight
/// to f32 once and using candle's matmul (blocked for cache reuse across rows).
const KERNEL_ROWS: usize = 16;

/// Weight rows (outputs) per rayon task.
const ROWS_PER_TASK: usize = 64;

/// x (..., k) f32 times w (n, k) ᵀ, w in bf16 or f16 -> (..., n) f32. Forward only.
pub fn half_weight_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) =
        w.dims2().map_err(|_| Error::Shape { tensor: "w", expected: "(n, k)".into(), got: w.dims().to_vec() })?;
    if x.dims().last() != Some(&k) {
        return Err(Error::Shape { tensor: "x", expected: format!("(..., {k})"), got: x.dims().to_vec() });
    }
    if x.dtype() != DType::F32 || !matches!(w.dtype(), DType::BF16 | DType::F16) {
        return Err(Error::Argument {
            name: "x, w",
            message: format!("an f32 x and a bf16 or f16 w are needed, got {:?} and {:?}", x.dtype(), w.dtype()),
        });
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n;
    let x2 = x.reshape(((), k))?;
    let y = if x2.dim(0)? > KERNEL_ROWS || !x.device().is_cpu() {
        x2.matmul(&w.to_dtype(DType::F32)?.t()?)?
    } else {
        x2.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &HalfWeightMatmul)?
    };
    Ok(y.reshape(out_dims)?)
}

struct HalfWeightMatmul;

simd_fn! {
    /// out[r] = w · x[r] for every row r of x (rows of length w.len()).
    fn dot_rows<T, S>(w: &[T], x: &[T], out: &mut [T]) {
        const ACC: usize = 16;
        let k = w.len();
        for (r, o) in out.iter_mut().enumerate() {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [T::ZERO; ACC];
            for (wc, xc) in w.chunks_exact(ACC).zip(xr.chunks_exact(ACC)) {
                for l in 0..ACC {
                    acc[l] = madd::<T, S>(wc[l], xc[l], acc[l]);
                }
            }
            let tail = k - k % ACC;
            let mut sum = T::ZERO;
            for (&a, &b) in w[tail..].iter().zip(&xr[tail..]) {
                sum = madd::<T, S>(a, b, sum);
            }
            for a in acc {
                sum += a;
            }
            *o = sum;
        }
    }
}

/// One task's block of weight rows against all of x, into `out` laid out (weight row, x row).
fn block<W: Copy>(w: &[W], x: &[f32], k: usize, widen: impl Fn(&[W], &mut [f32]), out: &mut [f32]) {
    let rows = x.len() / k.max(1);
    let mut wide = vec![0f32; k];
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        widen(wr, &mut wide);
        dot_rows(&wide, x, o);
    }
}

impl CustomOp2 for HalfWeightMatmul {
    fn name(&self) -> &'static str {
        "half-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, _) = wl.shape().dims2()?;
        let x = &f32::cpu_storage_as_slice(xs)?[xl.start_offset()..][..rows * k];
        // (n, rows) so that each task writes one contiguous block.
        let mut out_t = vec![0f32; n * rows];
        if k > 0 && rows > 0 {
            let chunk = ROWS_PER_TASK * rows;
            match ws {
                CpuStorage::BF16(w) => {
                    let w = &w[wl.start_offset()..][..n * k];
                    out_t
                        .par_chunks_mut(chunk)
                        .zip(w.par_chunks(ROWS_PER_TASK * k))
                        .for_each(|(o, w)| block(w, x, k, |s: &[bf16], d| s.convert_to_f32_slice(d), o));
                }
                CpuStorage::F16(w) => {
                    let w = &w[wl.start_offset()..][..n * k];
                    out_t
                        .par_chunks_mut(chunk)
                        .zip(w.par_chunks(ROWS_PER_TASK * k))
                        .for_each(|(o, w)| block(w, x, k, |s: &[f16], d| s.convert_to_f32_slice(d), o));
                }
                _ => candle_core::bail!("half-weight-matmul: the weight must be bf16 or f16"),
            }
        }
        let out = if rows == 1 { out_t } else { crate::cpu::transpose_last(&out_t, 1, n, rows) };
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

/// The reference: widen the weight and multiply with candle.
pub fn half_weight_matmul_ref(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?)
}
