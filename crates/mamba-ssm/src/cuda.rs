//! The CUDA side of the custom ops (feature `cuda`): the sources in `kernels/` compiled at run
//! time by NVRTC (through the cudarc that candle re-exports), once per process, loaded once per
//! device by candle, and launched on the device's stream. Inputs must be contiguous except the
//! conv's x (strided); f32 and bf16, computing in f32 (see docs/kernels.md).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, WithDType};
use std::sync::OnceLock;

/// `$run::<T>(args...)` for the element type of `$dtype` (f32 or bf16).
macro_rules! by_dtype {
    ($op:literal, $dtype:expr, $run:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $run::<f32>($($arg),*),
            DType::BF16 => $run::<half::bf16>($($arg),*),
            dt => bail!("{} on CUDA computes in f32 or bf16, got {dt:?}", $op),
        }
    };
}

/// The `name` and the refusing `cpu_fwd` of an op that exists only on the GPU (a backward pass
/// or decode step whose CPU side is computed another way).
macro_rules! gpu_only {
    ($op:literal) => {
        fn name(&self) -> &'static str {
            $op
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on the GPU only", $op)
        }
    };
}
pub(crate) use gpu_only;

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// A kernel source file of `kernels/`.
#[derive(Clone, Copy)]
pub(crate) enum Module {
    SelectiveScan,
    Ssd,
    Conv,
    Step,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::SelectiveScan => "selective_scan",
            Module::Ssd => "ssd",
            Module::Conv => "causal_conv1d",
            Module::Step => "state_update",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Module::SelectiveScan => include_str!("../../../kernels/selective_scan.cu"),
            Module::Ssd => include_str!("../../../kernels/ssd.cu"),
            Module::Conv => include_str!("../../../kernels/causal_conv1d.cu"),
            Module::Step => include_str!("../../../kernels/state_update.cu"),
        }
    }

    /// The module's PTX, compiled on first use (an NVRTC error is kept and reported each time).
    fn ptx(self) -> Result<&'static str> {
        static CELLS: [OnceLock<std::result::Result<String, String>>; 4] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let compiled = CELLS[self as usize].get_or_init(|| {
            let opts = CompileOptions { options: vec!["--std=c++17".into()], ..Default::default() };
            compile_ptx_with_opts(format!("{COMMON}\n{}", self.source()), opts)
                .map(|ptx| ptx.to_src())
                .map_err(|e| e.to_string())
        });
        match compiled {
            Ok(ptx) => Ok(ptx),
            Err(e) => bail!("kernels/{}.cu does not compile with NVRTC: {e}", self.name()),
        }
    }

    /// Kernel `name` followed by the dtype suffix, loaded on `dev`.
    fn func(self, dev: &CudaDevice, name: &str, dtype: DType) -> Result<CudaFunction> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            dt => bail!("the CUDA kernels compute in f32 or bf16, got {dt:?}"),
        };
        Ok(dev.get_or_load_custom_func(&format!("{name}_{suffix}"), self.name(), self.ptx()?)?.into_cuda_function())
    }
}

/// The libraries a `cuda` build loads when it runs (the NVIDIA driver's libcuda, cuBLAS,
/// cuBLASLt, cuRAND and NVRTC, found the way the dynamic loader finds them) that this machine
/// cannot load: empty where CUDA can start.
pub fn missing_cuda_libraries() -> Vec<&'static str> {
    use candle_core::cuda_backend::cudarc::{cublas, cublaslt, curand, driver, nvrtc};
    // SAFETY: each call only tries to open its library.
    let present = unsafe {
        [
            ("libcuda (the NVIDIA driver)", driver::sys::is_culib_present()),
            ("libcublas", cublas::sys::is_culib_present()),
            ("libcublasLt", cublaslt::sys::is_culib_present()),
            ("libcurand", curand::sys::is_culib_present()),
            ("libnvrtc", nvrtc::sys::is_culib_present()),
        ]
    };
    present.into_iter().filter(|(_, found)| !found).map(|(name, _)| name).collect()
}

/// A contiguous input from its storage and layout.
fn contiguous<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{what}: the CUDA kernel needs a contiguous tensor"),
    }
}

/// The selective scan's sizes and switches, as `ScanArgs` in selective_scan.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanArgs {
    pub batch: i32,
    pub dim: i32,
    pub len: i32,
    pub state: i32,
    pub groups: i32,
    pub has_d: i32,
    pub has_bias: i32,
    pub has_h0: i32,
    pub softplus: i32,
}

// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for ScanArgs {}

/// Steps per chunk of the scan kernels (THREADS x ITEMS in selective_scan.cu).
const SCAN_CHUNK: usize = 1024;
const SCAN_THREADS: u32 = 128;

impl ScanArgs {
    fn sizes(&self) -> (usize, usize, usize, usize) {
        (self.batch as usize, self.dim as usize, self.len as usize, self.state as usize)
    }

    /// One block per (batch, channel); the kernels keep one carried state per state index in
    /// shared memory (MAX_STATE in selective_scan.cu).
    fn grid(&self) -> Result<LaunchConfig> {
        if self.state > 256 || self.batch > 65_535 {
            bail!("selective-scan on CUDA: state {} (at most 256), batch {} (at most 65535)", self.state, self.batch);
        }
        Ok(LaunchConfig {
            grid_dim: (self.dim as u32, self.batch as u32, 1),
            block_dim: (SCAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    fn checkpoint_len(&self) -> usize {
        let (batch, dim, len, state) = self.sizes();
        batch * dim * len.div_ceil(SCAN_CHUNK) * state
    }
}

/// Forward: (u, delta, pack) -> flat [y | last state] in their dtype, and the chunk-start states
/// for the backward pass.
pub(crate) fn scan_fwd(
    args: ScanArgs,
    (u, lu): (&CudaStorage, &Layout),
    (delta, ld): (&CudaStorage, &Layout),
    (pack, lp): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: ScanArgs,
        (u, lu): (&CudaStorage, &Layout),
        (delta, ld): (&CudaStorage, &Layout),
        (pack, lp): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let dev = u.device();
        let (batch, dim, len, state) = args.sizes();
        let (u_v, delta_v, pack_v) =
            (contiguous::<T>(u, lu, "u")?, contiguous::<T>(delta, ld, "delta")?, contiguous::<T>(pack, lp, "pack")?);
        // SAFETY: the kernel writes every element of `out`.
        let mut out = unsafe { dev.alloc::<T>(batch * dim * (len + state)) }?;
        let mut checkpoints = dev.alloc_zeros::<f32>(args.checkpoint_len())?;
        let func = Module::SelectiveScan.func(dev, "selective_scan_fwd", T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&u_v).arg(&delta_v).arg(&pack_v).arg(&mut out).arg(&mut checkpoints).arg(&args);
        // SAFETY: the argument list matches the kernel's signature; sizes come from checked shapes.
        unsafe { b.launch(args.grid()?) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), checkpoints))
    }
    by_dtype!("selective-scan", u.dtype(), run(args, (u, lu), (delta, ld), (pack, lp)))
}

/// Backward: from [u | delta] (flat), pack, grad = [dy | d last state] and the forward pass's
/// checkpoints, the flat f32 [du | ddelta | dpack].
pub(crate) fn scan_bwd(
    args: ScanArgs,
    checkpoints: &CudaSlice<f32>,
    (ud, lud): (&CudaStorage, &Layout),
    (pack, lp): (&CudaStorage, &Layout),
    (grad, lg): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: ScanArgs,
        checkpoints: &CudaSlice<f32>,
        (ud, lud): (&CudaStorage, &Layout),
        (pack, lp): (&CudaStorage, &Layout),
        (grad, lg): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = ud.device();
        let (batch, dim, len, _) = args.sizes();
        let n = batch * dim * len;
        let ud_v = contiguous::<T>(ud, lud, "u and delta")?;
        let (u_v, delta_v) = (ud_v.slice(0..n), ud_v.slice(n..2 * n));
        let (pack_v, grad_v) = (contiguous::<T>(pack, lp, "pack")?, contiguous::<T>(grad, lg, "grad")?);
        // du and ddelta are written whole; dpack is accumulated, so it starts at zero.
        let mut out = dev.alloc_zeros::<f32>(2 * n + pack_v.len())?;
        let (mut du, mut rest) = out.split_at_mut(n);
        let (mut ddelta, mut dpack) = rest.split_at_mut(n);
        let func = Module::SelectiveScan.func(dev, "selective_scan_bwd", T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&u_v).arg(&delta_v).arg(&pack_v).arg(checkpoints).arg(&grad_v);
        b.arg(&mut du).arg(&mut ddelta).arg(&mut dpack).arg(&args);
        // SAFETY: as in `scan_fwd`; the three outputs are disjoint parts of `out`.
        unsafe { b.launch(args.grid()?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!("selective-scan", ud.dtype(), run(args, checkpoints, (ud, lud), (pack, lp), (grad, lg)))
}

/// The SSD scan's sizes, as `SsdArgs` in ssd.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SsdArgs {
    pub batch: i32,
    pub len: i32,
    pub heads: i32,
    pub headdim: i32,
    pub groups: i32,
    pub state: i32,
    pub chunks: i32,
    pub has_h0: i32,
}

// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for SsdArgs {}

/// Steps per chunk and threads per block of the SSD kernels (CHUNK, THREADS in ssd.cu).
const SSD_CHUNK: usize = 64;
const SSD_THREADS: u32 = 256;

impl SsdArgs {
    pub(crate) fn new([batch, len, heads, headdim, groups, state]: [usize; 6], has_h0: bool) -> Result<Self> {
        if batch > 65_535 || heads > 65_535 {
            bail!("ssd-chunk-scan on CUDA: batch {batch}, heads {heads} (at most 65535 each)");
        }
        let chunks = len.div_ceil(SSD_CHUNK);
        Ok(Self {
            batch: batch as i32,
            len: len as i32,
            heads: heads as i32,
            headdim: headdim as i32,
            groups: groups as i32,
            state: state as i32,
            chunks: chunks as i32,
            has_h0: has_h0 as i32,
        })
    }

    fn size(&self, parts: &[i32]) -> usize {
        parts.iter().map(|&p| p as usize).product()
    }

    /// Elements of x (and y, dx).
    pub(crate) fn x_len(&self) -> usize {
        self.size(&[self.batch, self.len, self.heads, self.headdim])
    }

    /// Elements of dt (and ddt).
    fn dt_len(&self) -> usize {
        self.size(&[self.batch, self.len, self.heads])
    }

    /// Elements of B (and C).
    fn bc_len(&self) -> usize {
        self.size(&[self.batch, self.len, self.groups, self.state])
    }

    /// A, B and C from the packed [A | B | C | h0?].
    fn abc<'a, T>(&self, pack: &CudaView<'a, T>) -> [CudaView<'a, T>; 3] {
        let (heads, bc) = (self.heads as usize, self.bc_len());
        [pack.slice(0..heads), pack.slice(heads..heads + bc), pack.slice(heads + bc..heads + 2 * bc)]
    }

    /// Elements of a state (batch, heads, headdim, state).
    pub(crate) fn state_len(&self) -> usize {
        self.size(&[self.batch, self.heads, self.headdim, self.state])
    }

    fn per_chunk(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.chunks as u32, self.heads as u32, self.batch as u32),
            block_dim: (SSD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_element(&self) -> LaunchConfig {
        let elements = self.size(&[self.state, self.headdim]);
        LaunchConfig {
            grid_dim: (elements.div_ceil(SSD_THREADS as usize) as u32, self.heads as u32, self.batch as u32),
            block_dim: (SSD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// What the SSD forward pass keeps for the backward pass: each chunk's start state (batch,
/// chunks, heads, state, headdim) and decay (batch, heads, chunks), in f32.
pub(crate) struct SsdKept {
    states: CudaSlice<f32>,
    decay: CudaSlice<f32>,
}

/// Forward: (x, dt, [A | B | C | h0?]) -> flat [y | last state] in their dtype, and the chunk
/// states for the backward pass.
pub(crate) fn ssd_fwd(
    args: SsdArgs,
    (x, lx): (&CudaStorage, &Layout),
    (dt, ldt): (&CudaStorage, &Layout),
    (pack, lp): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, SsdKept)> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: SsdArgs,
        (x, lx): (&CudaStorage, &Layout),
        (dt, ldt): (&CudaStorage, &Layout),
        (pack, lp): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, SsdKept)> {
        let dev = x.device();
        let (x_v, dt_v) = (contiguous::<T>(x, lx, "x")?, contiguous::<T>(dt, ldt, "dt")?);
        let pack_v = contiguous::<T>(pack, lp, "A, B, C and h0")?;
        let [a, b, c] = args.abc(&pack_v);
        // Without h0 the kernel reads no initial state; A stands in for the pointer.
        let h0 = if args.has_h0 != 0 { pack_v.slice(a.len() + b.len() + c.len()..) } else { pack_v.slice(..a.len()) };
        // SAFETY: the kernels write every element of `out`, `states` and `decay`.
        let mut out = unsafe { dev.alloc::<T>(args.x_len() + args.state_len()) }?;
        let (mut y, mut last) = out.split_at_mut(args.x_len());
        let mut states = unsafe { dev.alloc::<f32>(args.chunks as usize * args.state_len()) }?;
        let mut decay = unsafe { dev.alloc::<f32>(args.size(&[args.batch, args.heads, args.chunks])) }?;
        let stream = dev.cuda_stream();
        let func = |name| Module::Ssd.func(dev, name, T::DTYPE);
        // SAFETY (all three launches): the argument lists match the kernels' signatures; sizes
        // come from checked shapes; they run in order on one stream.
        let chunk_state = func("ssd_chunk_state")?;
        let mut l = stream.launch_builder(&chunk_state);
        l.arg(&x_v).arg(&dt_v).arg(&a).arg(&b).arg(&mut states).arg(&mut decay).arg(&args);
        unsafe { l.launch(args.per_chunk()) }.w()?;
        let state_pass = func("ssd_state_pass")?;
        let mut l = stream.launch_builder(&state_pass);
        l.arg(&h0).arg(&mut states).arg(&decay).arg(&mut last).arg(&args);
        unsafe { l.launch(args.per_element()) }.w()?;
        let chunk_out = func("ssd_chunk_out")?;
        let mut l = stream.launch_builder(&chunk_out);
        l.arg(&x_v).arg(&dt_v).arg(&a).arg(&b).arg(&c).arg(&states).arg(&mut y).arg(&args);
        unsafe { l.launch(args.per_chunk()) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), SsdKept { states, decay }))
    }
    by_dtype!("ssd-chunk-scan", x.dtype(), run(args, (x, lx), (dt, ldt), (pack, lp)))
}

/// Backward: from [x | dt] (flat), [A | B | C | h0?], grad = [dy | d last state] and what the
/// forward pass kept, the flat f32 [dx | ddt | dA | dB | dC | dh0?].
pub(crate) fn ssd_bwd(
    args: SsdArgs,
    kept: &SsdKept,
    (xdt, lxdt): (&CudaStorage, &Layout),
    (pack, lp): (&CudaStorage, &Layout),
    (grad, lg): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: SsdArgs,
        kept: &SsdKept,
        (xdt, lxdt): (&CudaStorage, &Layout),
        (pack, lp): (&CudaStorage, &Layout),
        (grad, lg): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = xdt.device();
        let (n, ndt, heads, bc) = (args.x_len(), args.dt_len(), args.heads as usize, args.bc_len());
        let xdt_v = contiguous::<T>(xdt, lxdt, "x and dt")?;
        let (x_v, dt_v) = (xdt_v.slice(0..n), xdt_v.slice(n..n + ndt));
        let pack_v = contiguous::<T>(pack, lp, "A, B, C and h0")?;
        let [a, b, c] = args.abc(&pack_v);
        let grad_v = contiguous::<T>(grad, lg, "grad")?;
        let (dy, dlast) = (grad_v.slice(0..n), grad_v.slice(n..));
        // SAFETY: backward 1 writes every element of `dstates`; dA, dB, dC and ddecay are
        // accumulated, so `out` and `ddecay` start at zero.
        let mut dstates = unsafe { dev.alloc::<f32>(kept.states.len()) }?;
        let mut ddecay = dev.alloc_zeros::<f32>(kept.decay.len())?;
        let mut out = dev.alloc_zeros::<f32>(n + ndt + pack_v.len())?;
        let (mut dx, mut rest) = out.split_at_mut(n);
        let (mut ddt, mut rest) = rest.split_at_mut(ndt);
        let (mut da, mut rest) = rest.split_at_mut(heads);
        let (mut db, mut rest) = rest.split_at_mut(bc);
        let (mut dc, mut dh0) = rest.split_at_mut(bc);
        let stream = dev.cuda_stream();
        let func = |name| Module::Ssd.func(dev, name, T::DTYPE);
        // SAFETY (all three launches): as in `ssd_fwd`; the outputs are disjoint parts of `out`.
        let chunk_dstate = func("ssd_chunk_dstate")?;
        let mut l = stream.launch_builder(&chunk_dstate);
        l.arg(&dt_v).arg(&a).arg(&c).arg(&dy).arg(&mut dstates).arg(&args);
        unsafe { l.launch(args.per_chunk()) }.w()?;
        // Without h0 `dh0` is empty and the kernel writes nothing there.
        let state_pass_bwd = func("ssd_state_pass_bwd")?;
        let mut l = stream.launch_builder(&state_pass_bwd);
        l.arg(&kept.states).arg(&kept.decay).arg(&dlast).arg(&mut dstates).arg(&mut ddecay).arg(&mut dh0).arg(&args);
        unsafe { l.launch(args.per_element()) }.w()?;
        let chunk_bwd = func("ssd_chunk_bwd")?;
        let mut l = stream.launch_builder(&chunk_bwd);
        l.arg(&x_v).arg(&dt_v).arg(&a).arg(&b).arg(&c).arg(&dy).arg(&kept.states).arg(&dstates).arg(&ddecay);
        l.arg(&mut dx).arg(&mut ddt).arg(&mut da).arg(&mut db).arg(&mut dc).arg(&args);
        unsafe { l.launch(args.per_chunk()) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!("ssd-chunk-scan", xdt.dtype(), run(args, kept, (xdt, lxdt), (pack, lp), (grad, lg)))
}

/// The conv's sizes and x's strides, as `ConvArgs` in causal_conv1d.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvArgs {
    pub batch: i32,
    pub channels: i32,
    pub len: i32,
    pub width: i32,
    pub silu: i32,
    pub sb: i64,
    pub sc: i64,
    pub st: i64,
}

// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for ConvArgs {}

impl ConvArgs {
    /// For x of layout `lx` (batch, channels, len), read through its strides.
    pub(crate) fn new(lx: &Layout, width: usize, silu: bool) -> Result<Self> {
        let (batch, channels, len) = lx.shape().dims3()?;
        let st = lx.stride();
        Ok(Self {
            batch: batch as i32,
            channels: channels as i32,
            len: len as i32,
            width: width as i32,
            silu: silu as i32,
            sb: st[0] as i64,
            sc: st[1] as i64,
            st: st[2] as i64,
        })
    }

    fn elements(&self) -> usize {
        self.batch as usize * self.channels as usize * self.len as usize
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// x read from its start offset through its strides.
fn strided<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Forward: (x, weight (channels, width), bias) -> y (batch, channels, len) in x's dtype.
pub(crate) fn conv_fwd(
    args: ConvArgs,
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (bias, lb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: ConvArgs,
        (x, lx): (&CudaStorage, &Layout),
        (w, lw): (&CudaStorage, &Layout),
        (bias, lb): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let (x_v, w_v, b_v) =
            (strided::<T>(x, lx)?, contiguous::<T>(w, lw, "conv weight")?, contiguous::<T>(bias, lb, "conv bias")?);
        // SAFETY: one thread writes each element.
        let mut y = unsafe { dev.alloc::<T>(args.elements()) }?;
        let func = Module::Conv.func(dev, "causal_conv1d_fwd", T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&x_v).arg(&w_v).arg(&b_v).arg(&mut y).arg(&args);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(elementwise(args.elements())) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    by_dtype!("causal-conv1d", x.dtype(), run(args, (x, lx), (w, lw), (bias, lb)))
}

/// Backward: from x, [weight | bias] (flat) and the output gradient g (contiguous), the flat
/// f32 [dx (batch, channels, len) | per channel: d taps (width), d bias].
pub(crate) fn conv_bwd(
    args: ConvArgs,
    (x, lx): (&CudaStorage, &Layout),
    (wb, lwb): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: ConvArgs,
        (x, lx): (&CudaStorage, &Layout),
        (wb, lwb): (&CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let n = args.elements();
        let (channels, width) = (args.channels as usize, args.width as usize);
        let x_v = strided::<T>(x, lx)?;
        let wb_v = contiguous::<T>(wb, lwb, "conv weight and bias")?;
        let (w_v, b_v) = (wb_v.slice(0..channels * width), wb_v.slice(channels * width..));
        let g_v = contiguous::<T>(g, lg, "conv output gradient")?;
        // SAFETY: every element of each buffer is written by its kernel before it is read.
        let mut dpre = unsafe { dev.alloc::<f32>(n) }?;
        let mut out = unsafe { dev.alloc::<f32>(n + channels * (width + 1)) }?;
        let (mut dx, mut dwb) = out.split_at_mut(n);
        let stream = dev.cuda_stream();
        let per_channel =
            LaunchConfig { grid_dim: (channels as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let pre = Module::Conv.func(dev, "causal_conv1d_bwd_pre", T::DTYPE)?;
        let mut b = stream.launch_builder(&pre);
        b.arg(&x_v).arg(&w_v).arg(&b_v).arg(&g_v).arg(&mut dpre).arg(&args);
        // SAFETY (all three launches): the argument lists match the kernels' signatures; they run
        // in order on one stream.
        unsafe { b.launch(elementwise(n)) }.w()?;
        let input = Module::Conv.func(dev, "causal_conv1d_bwd_x", T::DTYPE)?;
        let mut b = stream.launch_builder(&input);
        b.arg(&w_v).arg(&dpre).arg(&mut dx).arg(&args);
        unsafe { b.launch(elementwise(n)) }.w()?;
        let taps = Module::Conv.func(dev, "causal_conv1d_bwd_w", T::DTYPE)?;
        let mut b = stream.launch_builder(&taps);
        b.arg(&x_v).arg(&dpre).arg(&mut dwb).arg(&args);
        unsafe { b.launch(per_channel) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!("causal-conv1d", x.dtype(), run(args, (x, lx), (wb, lwb), (g, lg)))
}

/// A decode step's sizes, as `StepArgs` in state_update.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepArgs {
    pub batch: i32,
    /// Mamba-1: channels; Mamba-2: heads x headdim.
    pub rows: i32,
    pub state: i32,
    pub groups: i32,
    /// Mamba-2: rows per head; Mamba-1: 1.
    pub headdim: i32,
}

// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for StepArgs {}

/// One decode step: (state, [x | dt] flat, [A | B | C] flat with A of `a_len` values) -> flat
/// [y (batch x rows) | new state], in the state's dtype. `ssd`: Mamba-2's step (one decay per
/// head), else Mamba-1's (one per channel and state index).
pub(crate) fn step(
    args: StepArgs,
    ssd: bool,
    a_len: usize,
    (h, lh): (&CudaStorage, &Layout),
    (xdt, lx): (&CudaStorage, &Layout),
    (abc, la): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: StepArgs,
        ssd: bool,
        a_len: usize,
        (h, lh): (&CudaStorage, &Layout),
        (xdt, lx): (&CudaStorage, &Layout),
        (abc, la): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = h.device();
        let rows = args.batch as usize * args.rows as usize;
        let bc = args.batch as usize * args.groups as usize * args.state as usize;
        let h_v = contiguous::<T>(h, lh, "state")?;
        let xdt_v = contiguous::<T>(xdt, lx, "x and dt")?;
        let dt_len = rows / args.headdim as usize; // one dt per head (Mamba-1: per channel)
        let (x_v, dt_v) = (xdt_v.slice(0..rows), xdt_v.slice(rows..rows + dt_len));
        let abc_v = contiguous::<T>(abc, la, "A, B and C")?;
        let (a_v, b_v, c_v) =
            (abc_v.slice(0..a_len), abc_v.slice(a_len..a_len + bc), abc_v.slice(a_len + bc..a_len + 2 * bc));
        // SAFETY: one thread writes each row's y and new state.
        let mut out = unsafe { dev.alloc::<T>(rows + h_v.len()) }?;
        let (mut y, mut new_h) = out.split_at_mut(rows);
        let name = if ssd { "ssd_state_update" } else { "selective_state_update" };
        let func = Module::Step.func(dev, name, T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&h_v).arg(&x_v).arg(&dt_v).arg(&a_v).arg(&b_v).arg(&c_v).arg(&mut y).arg(&mut new_h).arg(&args);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(elementwise(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!("state-update", h.dtype(), run(args, ssd, a_len, (h, lh), (xdt, lx), (abc, la)))
}

/// The conv's decode update: (state (batch, channels, width), x (batch, channels), [weight |
/// bias]) -> [y | new state], in the state's dtype.
pub(crate) fn conv_update(
    batch: usize,
    channels: usize,
    width: usize,
    silu: bool,
    (state, ls): (&CudaStorage, &Layout),
    (x, lx): (&CudaStorage, &Layout),
    (wb, lwb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        args: ConvArgs,
        (state, ls): (&CudaStorage, &Layout),
        (x, lx): (&CudaStorage, &Layout),
        (wb, lwb): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = state.device();
        let (rows, width) = (args.batch as usize * args.channels as usize, args.width as usize);
        let (s_v, x_v) = (contiguous::<T>(state, ls, "conv state")?, contiguous::<T>(x, lx, "x")?);
        let wb_v = contiguous::<T>(wb, lwb, "conv weight and bias")?;
        let taps = args.channels as usize * width;
        let (w_v, b_v) = (wb_v.slice(0..taps), wb_v.slice(taps..));
        // SAFETY: one thread writes each row's y and new state.
        let mut out = unsafe { dev.alloc::<T>(rows * (1 + width)) }?;
        let (mut y, mut new_state) = out.split_at_mut(rows);
        let func = Module::Conv.func(dev, "causal_conv1d_update", T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&s_v).arg(&x_v).arg(&w_v).arg(&b_v).arg(&mut y).arg(&mut new_state).arg(&args);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(elementwise(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    // Only the sizes matter to the update kernel (its inputs are contiguous).
    let args = ConvArgs {
        batch: batch as i32,
        channels: channels as i32,
        len: 1,
        width: width as i32,
        silu: silu as i32,
        sb: 0,
        sc: 0,
        st: 0,
    };
    by_dtype!("causal-conv1d-update", state.dtype(), run(args, (state, ls), (x, lx), (wb, lwb)))
}
