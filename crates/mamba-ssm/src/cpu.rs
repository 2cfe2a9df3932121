//! Plumbing shared by the CPU kernels: strided views of candle storage, the split of the channels
//! into work items for rayon, and block-of-lanes tile loads and stores.

use crate::math::{simd_fn, Isa, Lanes, Real, LANES};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A read-only 3-d view of CPU storage with arbitrary strides: candle hands kernels transposed and
/// offset tensors, and reading them in place saves a copy of the largest inputs.
#[derive(Clone, Copy)]
pub(crate) struct View3<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 3],
    len: [usize; 3],
}

impl<'a, T: Real> View3<'a, T> {
    pub fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let stride = layout.stride();
        if stride.len() != 3 {
            candle_core::bail!("expected a 3-d tensor, got shape {:?}", layout.shape());
        }
        let d = layout.dims();
        Ok(Self {
            data: T::cpu_storage_as_slice(storage)?,
            offset: layout.start_offset(),
            stride: [stride[0], stride[1], stride[2]],
            len: [d[0], d[1], d[2]],
        })
    }

    pub fn from_slice(data: &'a [T], dims: [usize; 3]) -> Self {
        Self { data, offset: 0, stride: [dims[1] * dims[2], dims[2], 1], len: dims }
    }

    /// Length of the last dimension.
    pub fn row_len(&self) -> usize {
        self.len[2]
    }

    /// Row (i, j, ..) of the last dimension: borrowed when it is contiguous, else gathered into `buf`.
    pub fn row<'b>(&'b self, i: usize, j: usize, buf: &'b mut Vec<T>) -> &'b [T] {
        let start = self.offset + i * self.stride[0] + j * self.stride[1];
        if self.stride[2] == 1 {
            return &self.data[start..start + self.len[2]];
        }
        buf.clear();
        buf.extend((0..self.len[2]).map(|k| self.data[start + k * self.stride[2]]));
        buf
    }

    #[inline(always)]
    pub fn at(&self, i: usize, j: usize, k: usize) -> T {
        self.data[self.offset + i * self.stride[0] + j * self.stride[1] + k * self.stride[2]]
    }

    /// Reads rows `row0 .. row0 + width` (middle index), columns `t0 .. t0 + tile.len()` of matrix
    /// `i` into a lane-major tile; lanes past `width` are zero.
    pub fn load_tile(&self, i: usize, row0: usize, width: usize, t0: usize, tile: &mut [Lanes<T>]) {
        let [_, s1, s2] = self.stride;
        let base = self.offset + i * self.stride[0] + row0 * s1 + t0 * s2;
        if width < LANES {
            for row in tile.iter_mut() {
                row[width..].fill(T::ZERO);
            }
        }
        if s1 == 1 {
            // Channels contiguous, (batch, len, dim) storage: a time step is one copy.
            for (k, row) in tile.iter_mut().enumerate() {
                row[..width].copy_from_slice(&self.data[base + k * s2..][..width]);
            }
        } else if s2 == 1 {
            rows_into_tile(self.data, base, s1, width, tile);
        } else {
            for w in 0..width {
                for (k, row) in tile.iter_mut().enumerate() {
                    row[w] = self.data[base + w * s1 + k * s2];
                }
            }
        }
    }
}

/// Binds each tensor's CPU storage and layout, `(storage, layout) = tensor`, or fails with a
/// message naming the op: the custom ops' backward passes run on the CPU only.
macro_rules! cpu_storages {
    ($op:expr; $(($s:ident, $l:ident) = $t:expr),+ $(,)?) => {
        $(let ($s, $l) = $t.storage_and_layout();)+
        $(let candle_core::Storage::Cpu($s) = &*$s else {
            candle_core::bail!("{} backward runs on the CPU only", $op);
        };)+
    };
}
pub(crate) use cpu_storages;

/// A two-input op whose CPU passes read both inputs, and the gradient of its result, as
/// contiguous f32 or f64 slices. [`Flat`] makes it a candle `CustomOp2`: the dispatch on the
/// float type and the tensor plumbing.
pub(crate) trait FlatOp2 {
    const NAME: &'static str;
    /// The result's shape for a first input laid out as `a`.
    fn out_shape(&self, a: &Layout) -> Shape;
    fn fwd<T: Real>(&self, a: &[T], b: &[T]) -> Vec<T>;
    /// (da, db) for the gradient g of the flat result.
    fn bwd<T: Real>(&self, a: &[T], b: &[T], g: &[T]) -> Result<(Vec<T>, Vec<T>)>;
}

/// A [`FlatOp2`] as a candle op: `a.apply_op2(&b, Flat(op))`.
pub(crate) struct Flat<O>(pub O);

impl<O: FlatOp2 + Send + Sync> CustomOp2 for Flat<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.0.fwd::<f32>(flat(s1, l1)?, flat(s2, l2)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.0.fwd::<f64>(flat(s1, l1)?, flat(s2, l2)?)),
            s => candle_core::bail!("{} computes in f32 or f64, got {:?}", O::NAME, s.dtype()),
        };
        Ok((out, self.0.out_shape(l1)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (da, db) = match a.dtype() {
            DType::F32 => flat_bwd2_as::<O, f32>(&self.0, a, b, &grad)?,
            DType::F64 => flat_bwd2_as::<O, f64>(&self.0, a, b, &grad)?,
            dt => candle_core::bail!("{} computes in f32 or f64, got {dt:?}", O::NAME),
        };
        Ok((Some(da), Some(db)))
    }
}

fn flat_bwd2_as<O: FlatOp2, T: Real>(op: &O, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    cpu_storages!(O::NAME; (sa, la) = a, (sb, lb) = b, (sg, lg) = grad);
    let (da, db) = op.bwd::<T>(flat(sa, la)?, flat(sb, lb)?, flat(sg, lg)?)?;
    Ok((Tensor::from_vec(da, a.shape(), a.device())?, Tensor::from_vec(db, b.shape(), b.device())?))
}

/// A vector of zeros written by all threads: glibc clears large reused blocks on one thread.
pub(crate) fn zeros<T: Real>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(T::ZERO, n));
    v
}

/// A buffer for a kernel that writes every element before anything reads it: no zero fill, which
/// is a full pass over the output (7 % of the selective scan's forward time). candle's own CPU
/// ops allocate their outputs the same way (`alloc_uninit`).
///
/// # Safety
/// The caller writes every element before the buffer is read or returned. (Every bit pattern is
/// a valid f32 or f64, the only `Real` types, and no value is read before it is written: what
/// clippy's `uninit_vec` warns of, reading uninitialised values, does not happen.)
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn for_writing<T: Real>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; the caller's contract covers the contents.
    unsafe { v.set_len(n) };
    v
}

/// The contiguous slice of a 1-d packed tensor.
pub(crate) fn flat<'a, T: Real>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => candle_core::bail!("packed parameters must be contiguous"),
    }
}

/// Side of the square blocks the tile transposes move through registers.
const BLOCK: usize = 8;

/// `dst[k * ds + i] = src[i * ss + k]` for `i, k < 8`; eight loads, 24 shuffles and eight stores
/// for f32 with AVX (LLVM leaves the plain loop as 64 scalar moves).
#[inline(always)]
fn transpose_block<T: Real, S: Isa>(src: &[T], ss: usize, dst: &mut [T], ds: usize) {
    assert!(src.len() > (BLOCK - 1) * ss + BLOCK - 1 && dst.len() > (BLOCK - 1) * ds + BLOCK - 1);
    #[cfg(target_arch = "x86_64")]
    if S::FMA && T::DTYPE == DType::F32 {
        // SAFETY: the bounds are checked above, and `S::FMA` on x86-64 means that `simd_fn` runs
        // this in its AVX2 or AVX-512 version.
        unsafe { transpose8_f32(src.as_ptr().cast(), ss, dst.as_mut_ptr().cast(), ds) };
        return;
    }
    for i in 0..BLOCK {
        for k in 0..BLOCK {
            dst[k * ds + i] = src[i * ss + k];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8_f32(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
    let lo = |a, b| _mm256_unpacklo_ps(a, b);
    let hi = |a, b| _mm256_unpackhi_ps(a, b);
    let t = [lo(r[0], r[1]), hi(r[0], r[1]), lo(r[2], r[3]), hi(r[2], r[3])];
    let u = [lo(r[4], r[5]), hi(r[4], r[5]), lo(r[6], r[7]), hi(r[6], r[7])];
    let q = |t: [__m256; 4]| {
        [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        ]
    };
    let (a, b) = (q(t), q(u));
    for k in 0..4 {
        _mm256_storeu_ps(dst.add(k * ds), _mm256_permute2f128_ps::<0x20>(a[k], b[k]));
        _mm256_storeu_ps(dst.add((k + 4) * ds), _mm256_permute2f128_ps::<0x31>(a[k], b[k]));
    }
}

simd_fn! {
    /// `tile[k][w] = src[base + w * stride + k]` for `w < width`: a transpose, in 8 x 8 blocks
    /// (element by element, it was a sixth of the scan's forward time).
    fn rows_into_tile<T, S>(src: &[T], base: usize, stride: usize, width: usize, tile: &mut [Lanes<T>]) {
        let (wb, kb) = (width / BLOCK * BLOCK, tile.len() / BLOCK * BLOCK);
        let flat = tile.as_flattened_mut();
        for w0 in (0..wb).step_by(BLOCK) {
            for k0 in (0..kb).step_by(BLOCK) {
                transpose_block::<T, S>(&src[base + w0 * stride + k0..], stride, &mut flat[k0 * LANES + w0..], LANES);
            }
        }
        for w in 0..width {
            let from = if w < wb { kb } else { 0 };
            for (k, row) in tile.iter_mut().enumerate().skip(from) {
                row[w] = src[base + w * stride + k];
            }
        }
    }
}

simd_fn! {
    /// Writes lanes `0 .. width` of a tile into `width` rows of length `row_len` from column `t0`,
    /// `rows[w * row_len + t0 + k] = tile[k][w]`: the inverse of [`rows_into_tile`].
    pub(crate) fn store_tile<T, S>(tile: &[Lanes<T>], width: usize, rows: &mut [T], row_len: usize, t0: usize) {
        let (wb, kb) = (width / BLOCK * BLOCK, tile.len() / BLOCK * BLOCK);
        let flat = tile.as_flattened();
        for w0 in (0..wb).step_by(BLOCK) {
            for k0 in (0..kb).step_by(BLOCK) {
                transpose_block::<T, S>(&flat[k0 * LANES + w0..], LANES, &mut rows[w0 * row_len + t0 + k0..], row_len);
            }
        }
        for w in 0..width {
            let from = if w < wb { kb } else { 0 };
            for (k, lanes) in tile.iter().enumerate().skip(from) {
                rows[w * row_len + t0 + k] = lanes[w];
            }
        }
    }
}

/// A run of consecutive channels of one batch row that one rayon task owns. Channels never
/// straddle a group, so every block of lanes in an item shares its B and C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    pub batch: usize,
    pub group: usize,
    /// First channel (index into `dim`).
    pub start: usize,
    pub channels: usize,
}

impl Item {
    /// The blocks of at most `LANES` channels: (first channel, width).
    pub fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.channels.div_ceil(LANES)).map(|j| (self.start + j * LANES, LANES.min(self.channels - j * LANES)))
    }
}

/// Splits `batch` rows of `groups` groups of `dim / groups` channels into about four items per
/// thread, in (batch, channel) order, so that the items' rows of a (batch, dim, ...) buffer are
/// consecutive.
pub(crate) fn plan(batch: usize, dim: usize, groups: usize) -> Vec<Item> {
    let per_group = dim / groups;
    let blocks = per_group.div_ceil(LANES);
    let wanted = 4 * rayon::current_num_threads();
    let parts = wanted.div_ceil((batch * groups).max(1)).clamp(1, blocks.max(1));
    let mut items = Vec::with_capacity(batch * groups * parts);
    for b in 0..batch {
        for g in 0..groups {
            for p in 0..parts {
                let (first, last) = (p * blocks / parts * LANES, ((p + 1) * blocks / parts * LANES).min(per_group));
                if last > first {
                    items.push(Item { batch: b, group: g, start: g * per_group + first, channels: last - first });
                }
            }
        }
    }
    items
}

/// Cuts `buf` into one slice per item, `per_channel` values for each of its channels.
pub(crate) fn split_items<'a, T>(mut buf: &'a mut [T], items: &[Item], per_channel: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(item.channels * per_channel);
        out.push(head);
        buf = tail;
    }
    out
}

/// Transposes each (rows, cols) matrix of a contiguous (count, rows, cols) buffer to (count, cols, rows).
pub(crate) fn transpose_last<T: Copy + Default>(src: &[T], count: usize, rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    for m in 0..count {
        let (s, d) = (&src[m * rows * cols..][..rows * cols], &mut out[m * rows * cols..][..rows * cols]);
        for r in 0..rows {
            for c in 0..cols {
                d[c * rows + r] = s[r * cols + c];
            }
        }
    }
    out
}

/// Sums the lanes of each block and adds the totals, a (rows, cols) block at a time, into
/// `dst[col * dst_stride + t0 + row]`: the lane-wise partial sums of a chunk become rows of a
/// (state, len) gradient.
pub(crate) fn add_lane_sums<T: Real>(
    lanes: &[Lanes<T>],
    rows: usize,
    cols: usize,
    dst: &mut [T],
    dst_stride: usize,
    t0: usize,
) {
    for r in 0..rows {
        for c in 0..cols {
            let mut s = T::ZERO;
            for v in lanes[r * cols + c] {
                s += v;
            }
            dst[c * dst_stride + t0 + r] += s;
        }
    }
}

/// A strided matrix: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Rows `rs` elements apart, each contiguous: a row-major matrix, or a block of rows of one.
    pub fn rows(data: &'a [T], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    pub fn t(self) -> Self {
        Self { data: self.data, rs: self.cs, cs: self.rs }
    }
}

/// dst (m, n), rows `dst_rs` apart, = lhs (m, k) · rhs (k, n), or dst += lhs · rhs when
/// `accumulate`. One thread: the callers run one rayon task per block of the work.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n);
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(T::ZERO));
        }
        return;
    }
    let last = |a: &Mat<T>, rows: usize, cols: usize| (rows - 1) * a.rs + (cols - 1) * a.cs;
    assert!(lhs.data.len() > last(&lhs, m, k) && rhs.data.len() > last(&rhs, k, n));
    // SAFETY: the assertions keep every index the strides reach inside its slice; f32 and f64
    // (the only `Real`s) are types gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The sum of `parts` (each `len` long), added in their order. Parts computed over fixed pieces
/// of the work (a batch row, a block of rows) then give the same total on every run, where
/// rayon's `fold` sums wherever its threads happened to split the work (training runs were not
/// reproducible with it).
pub(crate) fn sum_in_order<T: Real>(parts: impl IntoIterator<Item = Vec<T>>, len: usize) -> Vec<T> {
    let mut total = vec![T::ZERO; len];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, v)| *t += v);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::{set_cpu_isa, CpuIsa};

    /// The blocked transposes against plain loops: widths and lengths below, at and past
    /// multiples of the block, in f32 and f64, under every instruction set this CPU has.
    fn check_tiles<T: Real>() {
        for isa in [CpuIsa::Plain, CpuIsa::Avx2, CpuIsa::Avx512] {
            set_cpu_isa(isa);
            for (width, len, row_len, t0) in
                [(1, 1, 3, 2), (7, 9, 9, 0), (8, 8, 20, 5), (13, 17, 40, 11), (32, 64, 64, 0)]
            {
                let src: Vec<T> = (0..width * row_len).map(|i| T::from_f64(i as f64 * 0.5 - 3.0)).collect();
                let view = View3::from_slice(&src, [1, width, row_len]);
                let mut tile = vec![[T::from_f64(7.0); LANES]; len];
                view.load_tile(0, 0, width, t0, &mut tile);
                for (k, row) in tile.iter().enumerate() {
                    for (w, &v) in row.iter().enumerate() {
                        let want = if w < width { src[w * row_len + t0 + k] } else { T::ZERO };
                        assert!(v == want, "{isa:?} load ({width}, {len}): [{k}][{w}]");
                    }
                }
                let mut rows = vec![T::from_f64(-1.0); width * row_len];
                store_tile(&tile, width, &mut rows, row_len, t0);
                for (i, (&got, &was)) in rows.iter().zip(&src).enumerate() {
                    let inside = (t0..t0 + len).contains(&(i % row_len));
                    assert!(got == if inside { was } else { T::from_f64(-1.0) }, "{isa:?} store ({width}, {len}): {i}");
                }
            }
        }
        set_cpu_isa(CpuIsa::Avx512);
    }

    #[test]
    fn tiles_load_and_store_in_place() {
        check_tiles::<f32>();
        check_tiles::<f64>();
    }
}
