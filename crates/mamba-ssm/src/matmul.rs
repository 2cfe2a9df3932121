//! x · wᵀ for the projections of a model, with the weight in f32, bf16 or f16 and x and the
//! result in f32.
//!
//! Decoding multiplies one token (a few rows of x) by every weight matrix: a matrix-vector
//! product bound by reading the weight once. candle's CPU matmul reaches about half of this
//! machine's read bandwidth there (measured 8.7 GB/s against 15.7 GB/s for the kernel below on
//! the 50280 x 768 head) and has no bf16 at all. The kernel streams weight rows, widens bf16/f16
//! in registers or L1, and keeps 32 f32 accumulators per row; halving the bytes read is the
//! whole gain of bf16 weights. Many rows (a prompt) go to candle's blocked matmul, which reuses
//! each weight across rows; a half weight is widened to f32 once for it.

use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::math::{cpu_isa, CpuIsa};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Up to this many rows of x go through the kernel.
const KERNEL_ROWS: usize = 16;

/// Weight rows (outputs) per rayon task.
const ROWS_PER_TASK: usize = 64;

/// x (..., k) f32 times w (n, k)ᵀ -> (..., n) f32, with w in f32, bf16 or f16. Differentiable in
/// x and w (the gradient of w in w's dtype).
pub fn weight_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) =
        w.dims2().map_err(|_| Error::Shape { tensor: "w", expected: "(n, k)".into(), got: w.dims().to_vec() })?;
    if x.dims().last() != Some(&k) {
        return Err(Error::Shape { tensor: "x", expected: format!("(..., {k})"), got: x.dims().to_vec() });
    }
    if x.dtype() != DType::F32 || !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Argument {
            name: "x, w",
            message: format!("an f32 x and an f32, bf16 or f16 w are needed, got {:?} and {:?}", x.dtype(), w.dtype()),
        });
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n;
    let x2 = x.reshape(((), k))?;
    let y = if x2.dim(0)? > KERNEL_ROWS || !x.device().is_cpu() {
        weight_matmul_ref(&x2, w)?
    } else {
        x2.contiguous()?.apply_op2(&w.contiguous()?, WeightMatmul)?
    };
    Ok(y.reshape(out_dims)?)
}

/// The reference: widen the weight to f32 and multiply with candle.
pub fn weight_matmul_ref(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?)
}

struct WeightMatmul;

/// A weight element type: dot products of its rows with f32 vectors.
trait Weight: WithDType {
    /// w · x, both of one length; `buf` is scratch of that length.
    fn dot<const FMA: bool>(w: &[Self], x: &[f32], buf: &mut [f32]) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn dot<const FMA: bool>(w: &[f32], x: &[f32], _: &mut [f32]) -> f32 {
        dot::<FMA, f32>(w, x, |v| v)
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn dot<const FMA: bool>(w: &[bf16], x: &[f32], _: &mut [f32]) -> f32 {
        // bf16 is the top half of an f32: widening is a shift, done in registers.
        dot::<FMA, bf16>(w, x, |v: bf16| f32::from_bits((v.to_bits() as u32) << 16))
    }
}

impl Weight for f16 {
    #[inline(always)]
    fn dot<const FMA: bool>(w: &[f16], x: &[f32], buf: &mut [f32]) -> f32 {
        // half widens slices with F16C when the CPU has it.
        w.convert_to_f32_slice(buf);
        dot::<FMA, f32>(buf, x, |v| v)
    }
}

/// Σ widen(w[i]) x[i] with 32 independent accumulators (four AVX2 registers) so that the loop
/// runs at the speed of the loads.
#[inline(always)]
fn dot<const FMA: bool, W: Copy>(w: &[W], x: &[f32], widen: impl Fn(W) -> f32) -> f32 {
    const ACC: usize = 32;
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let mut acc = [0f32; ACC];
    for (wc, xc) in w.chunks_exact(ACC).zip(x.chunks_exact(ACC)) {
        for l in 0..ACC {
            acc[l] = madd(widen(wc[l]), xc[l], acc[l]);
        }
    }
    let tail = w.len() - w.len() % ACC;
    let mut sum = acc.iter().sum::<f32>();
    for (&a, &b) in w[tail..].iter().zip(&x[tail..]) {
        sum = madd(widen(a), b, sum);
    }
    sum
}

/// One task: weight rows `w` against every row of x (rows of length k), into `out` laid out
/// (weight row, x row).
#[inline(always)]
fn block<W: Weight, const FMA: bool>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
    let rows = x.len() / k;
    let mut buf = vec![0f32; k];
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        for (r, o) in o.iter_mut().enumerate() {
            *o = W::dot::<FMA>(wr, &x[r * k..(r + 1) * k], &mut buf);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn block_avx512<W: Weight>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
    block::<W, true>(w, x, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<W: Weight>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
    block::<W, true>(w, x, k, out)
}

/// The block for this CPU: AVX-512 or AVX2 + FMA, as [`cpu_isa`] allows (aarch64 always has FMA).
fn block_dispatch<W: Weight>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (both): `cpu_isa` never names more than the CPU has.
    match cpu_isa() {
        CpuIsa::Avx512 => unsafe { block_avx512(w, x, k, out) },
        CpuIsa::Avx2 => unsafe { block_avx2(w, x, k, out) },
        CpuIsa::Plain => block::<W, false>(w, x, k, out),
    }
    #[cfg(not(target_arch = "x86_64"))]
    block::<W, true>(w, x, k, out)
}

/// (rows, n) = x (rows, k) · w (n, k)ᵀ, one rayon task per block of weight rows.
fn matmul<W: Weight>(w: &[W], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
    // (n, rows), so that each task writes one contiguous block.
    let mut out_t = vec![0f32; n * rows];
    if k > 0 && rows > 0 {
        out_t
            .par_chunks_mut(ROWS_PER_TASK * rows)
            .zip(w.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(o, w)| block_dispatch(w, x, k, o));
    }
    if rows == 1 {
        out_t
    } else {
        crate::cpu::transpose_last(&out_t, 1, n, rows)
    }
}

impl CustomOp2 for WeightMatmul {
    fn name(&self) -> &'static str {
        "weight-matmul"
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
        let w = wl.start_offset()..wl.start_offset() + n * k;
        let out = match ws {
            CpuStorage::F32(v) => matmul(&v[w], x, rows, n, k),
            CpuStorage::BF16(v) => matmul(&v[w], x, rows, n, k),
            CpuStorage::F16(v) => matmul(&v[w], x, rows, n, k),
            other => candle_core::bail!("weight-matmul: a {:?} weight, expected f32, bf16 or f16", other.dtype()),
        };
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    /// dx = dy · w, dw = dyᵀ · x.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = dy.matmul(&w.to_dtype(DType::F32)?)?;
        let dw = dy.t()?.matmul(x)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}
