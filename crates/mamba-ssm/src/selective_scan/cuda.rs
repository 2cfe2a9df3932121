//! The GPU side of the op: its kernels' arguments and the backward pass as an op of its own.

use super::{Dims, ScanOp};
use candle_core::{CustomOp3, Layout, Shape, Tensor};

#[cfg(feature = "cuda")]
impl ScanOp {
    pub(super) fn cuda_args(&self) -> crate::cuda::ScanArgs {
        let Dims { batch, dim, len, state, groups } = self.dims;
        crate::cuda::ScanArgs {
            batch: batch as i32,
            dim: dim as i32,
            len: len as i32,
            state: state as i32,
            groups: groups as i32,
            has_d: self.has_d as i32,
            has_bias: self.has_bias as i32,
            has_h0: self.has_h0 as i32,
            softplus: self.softplus as i32,
        }
    }

    /// The backward pass on the GPU: one kernel from the states the forward pass kept.
    pub(super) fn cuda_bwd(
        &self,
        u: &Tensor,
        delta: &Tensor,
        pack: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use candle_core::cuda_backend::cudarc::driver::CudaSlice;
        let kept = self.checkpoints.lock().unwrap().take().and_then(|b| b.downcast::<CudaSlice<f32>>().ok());
        let Some(checkpoints) = kept else {
            candle_core::bail!("selective-scan: the forward pass kept no states for the backward pass")
        };
        let ud = Tensor::cat(&[u.flatten_all()?, delta.flatten_all()?], 0)?;
        let out = ud.apply_op3(pack, grad, ScanBwdOp { args: self.cuda_args(), checkpoints: *checkpoints })?;
        let Dims { batch, dim, len, .. } = self.dims;
        let n = batch * dim * len;
        let part = |start: usize, size: usize, like: &Tensor| {
            out.narrow(0, start, size)?.reshape(like.shape())?.to_dtype(like.dtype())
        };
        Ok((Some(part(0, n, u)?), Some(part(n, n, delta)?), Some(part(2 * n, pack.elem_count(), pack)?)))
    }
}

/// The GPU backward pass as an op of its own: (u and delta flattened and joined, pack, grad)
/// -> f32 [du | ddelta | dpack].
#[cfg(feature = "cuda")]
struct ScanBwdOp {
    args: crate::cuda::ScanArgs,
    checkpoints: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for ScanBwdOp {
    crate::cuda::gpu_only!("selective-scan-backward");

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::scan_bwd(self.args, &self.checkpoints, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count())))
    }
}
