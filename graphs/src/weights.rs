//! Where graph builders get their weights from, and how weights are laid out in a graph.
//!
//! Graph code asks a [`WeightSource`] for tensors by their canonical checkpoint names
//! (`model.layers.0.self_attn.q_proj.weight`, `vision_model.encoder.layers.3.mlp.fc1.bias`,
//! `mm_projector.0.weight`, …). The source (in `carrot-export`) maps those names to the files a
//! user holds, merges LoRA adapters and returns one float32 tensor at a time, so a graph is
//! written while at most one tensor sits in memory.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::config::DType;

/// A dense float32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Transpose a 2-D tensor: `[rows, cols]` → `[cols, rows]` (other ranks are returned as they are).
    ///
    /// Hugging Face `Linear` weights are stored `[out, in]`; ONNX `MatMul` wants `[in, out]`. Graphs
    /// store transposes with [`Tensor::transposed_bytes`]; this plain float32 one serves small
    /// tensors and checks.
    pub fn transposed(&self) -> Tensor {
        let (rows, cols) = match self.shape.as_slice() {
            [r, c] => (*r, *c),
            _ => return self.clone(),
        };
        let data = (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r, c)))
            .map(|(r, c)| self.data[r * cols + c])
            .collect();
        Tensor {
            shape: vec![cols, rows],
            data,
        }
    }

    /// Little-endian bytes of this tensor converted to `dtype` (round to nearest even).
    pub fn to_bytes(&self, dtype: DType) -> Vec<u8> {
        let mut out = large_vec::<u8>(self.data.len() * dtype.size());
        self.write_bytes(&mut out, dtype);
        out
    }

    /// [`Tensor::to_bytes`] into `dst` (exactly `len() × dtype.size()` bytes), on all threads.
    pub fn write_bytes(&self, dst: &mut [u8], dtype: DType) {
        let size = dtype.size();
        assert_eq!(dst.len(), self.data.len() * size, "byte buffer size");
        dst.par_chunks_mut(CHUNK * size)
            .zip(self.data.par_chunks(CHUNK))
            .for_each(|(d, s)| encode(s, d, dtype));
    }

    /// Little-endian bytes of the transpose of this 2-D tensor in `dtype`, in one pass: what
    /// `transposed().to_bytes(dtype)` gives, without the transposed float32 copy.
    pub fn transposed_bytes(&self, dtype: DType) -> Vec<u8> {
        let rows = match self.shape.as_slice() {
            [r, _] => *r,
            _ => return self.to_bytes(dtype),
        };
        let mut out = large_vec::<u8>(self.data.len() * dtype.size());
        self.scatter_transposed(&mut out, 0, rows, dtype);
        out
    }

    /// Writes this block of rows `[n, cols]`, which starts at row `r0` of a `[rows, cols]`
    /// matrix, into `out`: the bytes of that matrix's transpose `[cols, rows]` in `dtype`.
    ///
    /// Each task owns a band of output rows (= columns of the block) and walks the block in
    /// square tiles, so reads and writes both stay within a few cache lines per row.
    pub fn scatter_transposed(&self, out: &mut [u8], r0: usize, rows: usize, dtype: DType) {
        let (n, cols) = match self.shape.as_slice() {
            [n, c] => (*n, *c),
            _ => return,
        };
        let size = dtype.size();
        assert_eq!(out.len(), rows * cols * size, "transposed output size");
        assert!(r0 + n <= rows, "row block outside the matrix");
        if n == 0 || cols == 0 {
            return;
        }
        let data = &self.data;
        out.par_chunks_mut(TILE * rows * size)
            .enumerate()
            .for_each(|(i, dst)| {
                let c0 = i * TILE;
                let c1 = (c0 + TILE).min(cols);
                let mut tile = [0f32; TILE];
                for t0 in (0..n).step_by(TILE) {
                    let t1 = (t0 + TILE).min(n);
                    for c in c0..c1 {
                        for (k, t) in (t0..t1).enumerate() {
                            tile[k] = data[t * cols + c];
                        }
                        let at = ((c - c0) * rows + r0 + t0) * size;
                        encode(&tile[..t1 - t0], &mut dst[at..at + (t1 - t0) * size], dtype);
                    }
                }
            });
    }
}

/// Side of the square tiles transposes walk in.
const TILE: usize = 32;

/// Elements per parallel conversion task.
const CHUNK: usize = 1 << 16;

/// Writes `values` as little-endian `dtype` into `dst` (exactly `values.len() × size` bytes).
/// Half-precision conversions run through `half`'s slice conversions (F16C where the CPU has it),
/// round to nearest even like the scalar ones.
fn encode(values: &[f32], dst: &mut [u8], dtype: DType) {
    match dtype {
        DType::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(values) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => encode_half::<f16>(values, dst),
        DType::BF16 => encode_half::<bf16>(values, dst),
    }
}

/// [`encode`] for a 16-bit float type `H` (`f16` or `bf16`).
fn encode_half<H: bytemuck::Pod>(values: &[f32], dst: &mut [u8])
where
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    const LANE: usize = 64;
    let mut h = [H::zeroed(); LANE];
    for (d, v) in dst.chunks_mut(2 * LANE).zip(values.chunks(LANE)) {
        let h = &mut h[..v.len()];
        h.convert_from_f32_slice(v);
        for (d, &x) in d.chunks_exact_mut(2).zip(h.iter()) {
            d.copy_from_slice(&bytemuck::cast::<H, u16>(x).to_le_bytes());
        }
    }
}

/// A zeroed vector of `n` elements for a large buffer: the allocation is asked to be backed by
/// transparent huge pages, so filling it takes one page fault per 2 MiB instead of per 4 KiB.
pub fn large_vec<T: bytemuck::Zeroable + Clone>(n: usize) -> Vec<T> {
    let v = vec![T::zeroed(); n];
    #[cfg(target_os = "linux")]
    advise_huge_pages(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &[T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < 4 * HUGE {
        return;
    }
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE changes only how the
        // kernel backs the pages, never their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// A failure to produce a weight; the message names the file and the tensor.
#[derive(thiserror::Error, Debug)]
#[error("{0}")]
pub struct WeightError(pub String);

/// Supplies weights by canonical checkpoint name, one tensor at a time.
pub trait WeightSource {
    fn tensor(&mut self, name: &str) -> Result<Tensor, WeightError>;

    /// The shape of `name`, without converting its data when the source can avoid it.
    fn shape(&mut self, name: &str) -> Result<Vec<usize>, WeightError> {
        Ok(self.tensor(name)?.shape)
    }

    /// Rows `rows` of the 2-D tensor `name` (`[rows.len(), cols]`), for weights too large to
    /// hold in float32 at once; the same values as the corresponding rows of [`Self::tensor`].
    fn rows(&mut self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor, WeightError> {
        let t = self.tensor(name)?;
        slice_rows(&t, name, rows)
    }
}

/// Rows `rows` of a 2-D tensor; the error names `name`.
pub fn slice_rows(
    t: &Tensor,
    name: &str,
    rows: std::ops::Range<usize>,
) -> Result<Tensor, WeightError> {
    match t.shape.as_slice() {
        [r, c] if rows.start <= rows.end && rows.end <= *r => Ok(Tensor::new(
            vec![rows.len(), *c],
            t.data[rows.start * c..rows.end * c].to_vec(),
        )),
        shape => Err(WeightError(format!(
            "rows {rows:?} of `{name}` with shape {shape:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_rectangular() {
        let t = Tensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let u = t.transposed();
        assert_eq!(u.shape, vec![3, 2]);
        assert_eq!(u.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(u.transposed(), t);
    }

    #[test]
    fn transpose_larger_than_block() {
        let (r, c) = (67, 45);
        let t = Tensor::new(vec![r, c], (0..r * c).map(|x| x as f32).collect());
        let u = t.transposed();
        for i in 0..r {
            for j in 0..c {
                assert_eq!(u.data[j * r + i], t.data[i * c + j]);
            }
        }
    }

    #[test]
    fn transposed_bytes_equal_transpose_then_convert() {
        for (r, c) in [(1, 1), (3, 70), (67, 45), (130, 33), (0, 4)] {
            let t = Tensor::new(
                vec![r, c],
                (0..r * c).map(|x| (x as f32).sin() * 3.0).collect(),
            );
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                assert_eq!(
                    t.transposed_bytes(dtype),
                    t.transposed().to_bytes(dtype),
                    "{r}x{c} {dtype:?}"
                );
            }
        }
    }

    #[test]
    fn large_tensors_convert_like_small_ones() {
        // More elements than one parallel chunk, so the chunk seams are crossed.
        let n = 3 * CHUNK + 17;
        let t = Tensor::new(vec![n], (0..n).map(|x| x as f32 * 0.37 - 5.0).collect());
        let bytes = t.to_bytes(DType::F16);
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            assert_eq!(pair, f16::from_f32(t.data[i]).to_le_bytes(), "element {i}");
        }
    }

    #[test]
    fn slice_conversions_round_like_the_scalar_ones() {
        // Ties, the largest finite values, overflow, subnormals and signed zero.
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            5.96e-8,
            2.98e-8,
            6.1e-5,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            3.3895314e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ];
        values.extend((0..1000).map(|i| (i as f32 * 0.731).sin() * 10f32.powi(i % 9 - 4)));
        let mut f16_bytes = vec![0u8; values.len() * 2];
        encode(&values, &mut f16_bytes, DType::F16);
        let mut bf16_bytes = vec![0u8; values.len() * 2];
        encode(&values, &mut bf16_bytes, DType::BF16);
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(
                f16_bytes[2 * i..2 * i + 2],
                f16::from_f32(v).to_le_bytes(),
                "f16 {v}"
            );
            assert_eq!(
                bf16_bytes[2 * i..2 * i + 2],
                bf16::from_f32(v).to_le_bytes(),
                "bf16 {v}"
            );
        }
    }

    #[test]
    fn bytes_in_each_dtype() {
        let t = Tensor::new(vec![2], vec![1.0, -2.5]);
        assert_eq!(
            t.to_bytes(DType::F32),
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
        assert_eq!(t.to_bytes(DType::F16), vec![0x00, 0x3c, 0x00, 0xc1]);
        assert_eq!(t.to_bytes(DType::BF16), vec![0x80, 0x3f, 0x20, 0xc0]);
    }
}
