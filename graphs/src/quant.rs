//! Weight-only blocked quantization: int4 or int8 codes with one float32 scale and one unsigned
//! zero point per block of consecutive input features.
//!
//! A weight `W [out, in]` is split along `in` into blocks of `block_size` values (the last block of
//! a row may be shorter). Each block stores codes `q ∈ [0, qmax]`, a scale `s` and a zero point
//! `z ∈ [0, qmax]`, and reads back as `ŵ = (q − z) · s` — exactly ONNX `DequantizeLinear` with
//! `block_size` and a zero point, and ONNX Runtime's `MatMulNBits`.
//!
//! The scale of each block is chosen by a small search that minimises the block's squared error
//! instead of plain round-to-nearest on the block's range (as llama.cpp's quantizers do): a handful
//! of candidate scales around the range/`qmax` one, each followed by a least-squares refit of the
//! scale for the codes it produced. The round-to-nearest scale is one of the candidates, so the
//! error is never larger than round-to-nearest's. Blocks are independent, so the result does not
//! depend on how many threads quantize.

use rayon::prelude::*;

use crate::builder::ElemType;

/// Code width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bits {
    Int4,
    Int8,
}

impl Bits {
    /// Largest code.
    pub fn qmax(self) -> u8 {
        match self {
            Bits::Int4 => 15,
            Bits::Int8 => 255,
        }
    }

    /// Bits per code.
    pub fn width(self) -> usize {
        match self {
            Bits::Int4 => 4,
            Bits::Int8 => 8,
        }
    }

    /// ONNX element type of codes and zero points.
    pub fn elem(self) -> ElemType {
        match self {
            Bits::Int4 => ElemType::U4,
            Bits::Int8 => ElemType::U8,
        }
    }
}

/// How weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: Bits,
    /// Consecutive input features sharing one scale and zero point (a power of two ≥ 16 lets
    /// ONNX Runtime fuse `DequantizeLinear → MatMul` into `MatMulNBits`).
    pub block_size: usize,
}

/// A `[rows, cols]` matrix quantized along `cols` in blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    /// `rows · cols` codes, one per byte, row-major.
    pub codes: Vec<u8>,
    /// `rows · blocks` scales, row-major.
    pub scales: Vec<f32>,
    /// `rows · blocks` zero points, row-major.
    pub zero_points: Vec<u8>,
}

/// Candidate scales are `range / (qmax + t)` for these `t` (`t = 0` is round-to-nearest);
/// larger `t` clips the block's extremes for a finer step.
const SCALE_STEPS: [f32; 7] = [0.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0];

/// One block's quantization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockParams {
    pub scale: f32,
    pub zero_point: u8,
}

/// Round half to even for `0 ≤ v < 2²²` with plain float adds (vectorizes without SSE4.1).
#[inline(always)]
fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    (v + MAGIC) - MAGIC
}

/// Lanes of the error sums: a block is summed as `LANES` interleaved partial sums, a shape the
/// compiler turns into SIMD code.
const LANES: usize = 8;

#[inline(always)]
fn code_of(v: f32, inv: f32, z: f32, q: f32) -> f32 {
    let t = v * inv + z;
    let t = if t < 0.0 { 0.0 } else { t };
    let t = if t > q { q } else { t };
    round_small(t)
}

/// Squared error of quantizing `x` with `p`, and the least-squares sums `Σ x·(q − z)`,
/// `Σ (q − z)²` of the codes it gives — without storing the codes.
#[inline(always)]
fn evaluate(x: &[f32], p: BlockParams, qmax: u8) -> (f32, f32, f32) {
    let inv = 1.0 / p.scale;
    let (z, q) = (f32::from(p.zero_point), f32::from(qmax));
    let (mut err, mut num, mut den) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            let v = chunk[l];
            let k = code_of(v, inv, z, q) - z;
            let d = v - k * p.scale;
            err[l] += d * d;
            num[l] += v * k;
            den[l] += k * k;
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let k = code_of(v, inv, z, q) - z;
        let d = v - k * p.scale;
        err[l] += d * d;
        num[l] += v * k;
        den[l] += k * k;
    }
    (err.iter().sum(), num.iter().sum(), den.iter().sum())
}

/// The codes of `x` for `p`.
#[inline(always)]
fn encode(x: &[f32], p: BlockParams, qmax: u8, codes: &mut [u8]) {
    let inv = 1.0 / p.scale;
    let (z, q) = (f32::from(p.zero_point), f32::from(qmax));
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = code_of(v, inv, z, q) as u8;
    }
}

/// The range of a block, widened to contain zero (every representable range does: `ŵ = (q − z)·s`
/// with `0 ≤ z ≤ qmax`).
#[inline(always)]
fn range(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[inline(always)]
fn params_for_scale(lo: f32, scale: f32, qmax: u8) -> BlockParams {
    BlockParams {
        scale,
        zero_point: round_small((-lo / scale).clamp(0.0, f32::from(qmax))) as u8,
    }
}

const EMPTY: BlockParams = BlockParams {
    scale: 1.0,
    zero_point: 0,
};

/// Plain round-to-nearest: `s = (max − min) / qmax`, `z = round(−min / s)`.
pub fn round_to_nearest(x: &[f32], qmax: u8, codes: &mut [u8]) -> BlockParams {
    let (lo, hi) = range(x);
    if hi == lo {
        codes.fill(0);
        return EMPTY;
    }
    let p = params_for_scale(lo, (hi - lo) / f32::from(qmax), qmax);
    encode(x, p, qmax, codes);
    p
}

/// The searched quantization of one block: never a larger squared error than
/// [`round_to_nearest`]. Writes the codes into `codes` (same length as `x`).
pub fn quantize_block(x: &[f32], qmax: u8, codes: &mut [u8]) -> BlockParams {
    quantize_block_inline(x, qmax, codes)
}

/// Quantizes one row block by block, writing its codes, scales and zero points.
fn quantize_row(
    row: &[f32],
    spec: QuantSpec,
    codes: &mut [u8],
    scales: &mut [f32],
    zps: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { quantize_row_avx2(row, spec, codes, scales, zps) };
        return;
    }
    quantize_row_inline(row, spec, codes, scales, zps);
}

/// [`quantize_row`] compiled for AVX2: eight-lane float arithmetic, the same operations in the
/// same order (no fused multiply-add), so the same bits as the portable build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    row: &[f32],
    spec: QuantSpec,
    codes: &mut [u8],
    scales: &mut [f32],
    zps: &mut [u8],
) {
    quantize_row_inline(row, spec, codes, scales, zps);
}

#[inline(always)]
fn quantize_row_inline(
    row: &[f32],
    spec: QuantSpec,
    codes: &mut [u8],
    scales: &mut [f32],
    zps: &mut [u8],
) {
    let qmax = spec.bits.qmax();
    for (b, (x, c)) in row
        .chunks(spec.block_size)
        .zip(codes.chunks_mut(spec.block_size))
        .enumerate()
    {
        let p = quantize_block_inline(x, qmax, c);
        scales[b] = p.scale;
        zps[b] = p.zero_point;
    }
}

#[inline(always)]
fn quantize_block_inline(x: &[f32], qmax: u8, codes: &mut [u8]) -> BlockParams {
    let (lo, hi) = range(x);
    if hi == lo {
        codes.fill(0);
        return EMPTY;
    }
    let mut best = (f32::INFINITY, EMPTY);
    for t in SCALE_STEPS {
        let p = params_for_scale(lo, (hi - lo) / (f32::from(qmax) + t), qmax);
        let (err, num, den) = evaluate(x, p, qmax);
        if err < best.0 {
            best = (err, p);
        }
        // Least-squares scale for the codes this candidate produced, same zero point.
        let refit = BlockParams {
            scale: num / den,
            zero_point: p.zero_point,
        };
        if den > 0.0 && refit.scale.is_finite() && refit.scale > 0.0 {
            let (err, _, _) = evaluate(x, refit, qmax);
            if err < best.0 {
                best = (err, refit);
            }
        }
    }
    encode(x, best.1, qmax, codes);
    best.1
}

impl BlockQuantized {
    /// Quantize a row-major `[rows, cols]` matrix along `cols`, rows in parallel.
    ///
    /// # Panics
    /// If `data.len() != rows · cols` or `block_size` is 0 (callers check shapes first).
    pub fn quantize(data: &[f32], rows: usize, cols: usize, spec: QuantSpec) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data and shape disagree");
        assert!(spec.block_size > 0, "block size must be positive");
        let blocks = cols.div_ceil(spec.block_size);
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows * blocks];
        let mut zero_points = vec![0u8; rows * blocks];
        if cols > 0 {
            codes
                .par_chunks_mut(cols)
                .zip(scales.par_chunks_mut(blocks))
                .zip(zero_points.par_chunks_mut(blocks))
                .zip(data.par_chunks(cols))
                .for_each(|(((row_codes, row_scales), row_zps), row)| {
                    quantize_row(row, spec, row_codes, row_scales, row_zps);
                });
        }
        BlockQuantized {
            rows,
            cols,
            spec,
            codes,
            scales,
            zero_points,
        }
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols.div_ceil(self.spec.block_size)
    }

    /// `(q − z) · s` for every element, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (bs, nb) = (self.spec.block_size, self.blocks());
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = r * nb + c / bs;
                let q = i32::from(self.codes[r * self.cols + c]);
                let z = i32::from(self.zero_points[b]);
                out.push((q - z) as f32 * self.scales[b]);
            }
        }
        out
    }

    /// Row layout, for `Gather` of whole rows (an embedding table): codes `[rows, cols]`,
    /// scales and zero points `[rows, blocks]`, codes and zero points packed.
    pub fn row_major(&self) -> PackedLayout {
        PackedLayout {
            codes: pack(&self.codes, self.spec.bits),
            scales: self.scales.clone(),
            zero_points: pack(&self.zero_points, self.spec.bits),
        }
    }

    /// Transposed layout, for `DequantizeLinear(axis=0) → MatMul` on `Wᵀ [cols, rows]`: codes
    /// `[cols, rows]`, scales and zero points `[blocks, rows]`, codes and zero points packed.
    pub fn transposed(&self) -> PackedLayout {
        let nb = self.blocks();
        PackedLayout {
            codes: pack(
                &transpose(&self.codes, self.rows, self.cols),
                self.spec.bits,
            ),
            scales: transpose(&self.scales, self.rows, nb),
            zero_points: pack(&transpose(&self.zero_points, self.rows, nb), self.spec.bits),
        }
    }
}

impl BlockQuantized {
    /// ONNX Runtime `MatMulNBits` layout (for `x @ Wᵀ` with `W` this `[rows = N, cols = K]`
    /// matrix): `B [N, blocks, block_size · bits / 8]` with each block's codes packed (a short
    /// last block padded with zero codes), scales `[N · blocks]`, zero points packed per row
    /// (`[N · ceil(blocks · bits / 8)]`, 4-bit ones two per byte, low nibble first).
    pub fn matmul_nbits(&self) -> PackedLayout {
        let (bs, nb, bits) = (self.spec.block_size, self.blocks(), self.spec.bits);
        let codes = if self.cols == nb * bs {
            pack(&self.codes, bits)
        } else {
            let mut padded = vec![0u8; self.rows * nb * bs];
            for r in 0..self.rows {
                let src = &self.codes[r * self.cols..(r + 1) * self.cols];
                padded[r * nb * bs..r * nb * bs + self.cols].copy_from_slice(src);
            }
            pack(&padded, bits)
        };
        let zero_points = self
            .zero_points
            .chunks(nb.max(1))
            .flat_map(|row| pack(row, bits))
            .collect();
        PackedLayout {
            codes,
            scales: self.scales.clone(),
            zero_points,
        }
    }
}

/// Initializer bytes of a quantized weight in one layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedLayout {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<u8>,
}

/// Cache-blocked transpose of a row-major `[rows, cols]` matrix.
fn transpose<T: Copy + Default>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    const TILE: usize = 64;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// ONNX packing: 8-bit codes as they are; 4-bit codes two per byte, element `2i` in the low
/// nibble of byte `i`, an odd last element alone in a low nibble.
pub fn pack(codes: &[u8], bits: Bits) -> Vec<u8> {
    match bits {
        Bits::Int8 => codes.to_vec(),
        Bits::Int4 => codes
            .chunks(2)
            .map(|pair| (pair[0] & 0x0f) | (pair.get(1).copied().unwrap_or(0) << 4))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_build_gives_the_portable_build_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            for (bits, bs, cols) in [
                (Bits::Int4, 32, 4096),
                (Bits::Int8, 16, 200),
                (Bits::Int4, 64, 100),
            ] {
                let spec = QuantSpec {
                    bits,
                    block_size: bs,
                };
                let row = weights(cols, cols as u64);
                let nb = cols.div_ceil(bs);
                let mut a = (vec![0u8; cols], vec![0f32; nb], vec![0u8; nb]);
                let mut b = a.clone();
                quantize_row_inline(&row, spec, &mut a.0, &mut a.1, &mut a.2);
                // SAFETY: AVX2 is present (checked above).
                unsafe { quantize_row_avx2(&row, spec, &mut b.0, &mut b.1, &mut b.2) };
                assert_eq!(a.0, b.0);
                assert_eq!(
                    a.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    b.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!(a.2, b.2);
            }
        }
    }

    /// A deterministic stream of roughly normal values (sum of uniforms), with occasional
    /// outliers as real weights have.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|i| {
                let g: f64 = (0..4).map(|_| next()).sum::<f64>() - 2.0;
                let v = g * 0.02;
                (if i % 97 == 13 { v * 8.0 } else { v }) as f32
            })
            .collect()
    }

    fn block_error(x: &[f32], codes: &[u8], p: BlockParams) -> f64 {
        let z = i32::from(p.zero_point);
        x.iter()
            .zip(codes)
            .map(|(&v, &c)| {
                let d = f64::from(v) - f64::from((i32::from(c) - z) as f32 * p.scale);
                d * d
            })
            .sum()
    }

    #[test]
    fn search_never_loses_to_round_to_nearest() {
        for bits in [Bits::Int4, Bits::Int8] {
            let (mut total_rtn, mut total_search) = (0.0, 0.0);
            for seed in 0..400 {
                let x = weights(32, seed);
                let mut a = vec![0; 32];
                let mut b = vec![0; 32];
                let rtn = round_to_nearest(&x, bits.qmax(), &mut a);
                let best = quantize_block(&x, bits.qmax(), &mut b);
                let (ea, eb) = (block_error(&x, &a, rtn), block_error(&x, &b, best));
                // Candidates are ranked in f32; allow for f32 rounding of a tie.
                assert!(
                    eb <= ea * (1.0 + 1e-5),
                    "{bits:?} seed {seed}: search {eb} > rtn {ea}"
                );
                total_rtn += ea;
                total_search += eb;
            }
            // The search pays off on the whole, not only in the odd block.
            assert!(
                total_search < 0.95 * total_rtn,
                "{bits:?}: search {total_search} vs rtn {total_rtn}"
            );
        }
    }

    #[test]
    fn codes_and_zero_points_stay_in_range() {
        let x = weights(1000, 7);
        for bits in [Bits::Int4, Bits::Int8] {
            let spec = QuantSpec {
                bits,
                block_size: 32,
            };
            let q = BlockQuantized::quantize(&x, 10, 100, spec);
            assert_eq!(q.blocks(), 4);
            assert!(q.codes.iter().all(|&c| c <= bits.qmax()));
            assert!(q.zero_points.iter().all(|&z| z <= bits.qmax()));
            assert!(q.scales.iter().all(|&s| s.is_finite() && s > 0.0));
        }
    }

    #[test]
    fn dequantized_error_is_small() {
        let x = weights(64 * 256, 3);
        let norm: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        for (bits, bound) in [(Bits::Int4, 1e-2), (Bits::Int8, 5e-5)] {
            let spec = QuantSpec {
                bits,
                block_size: 32,
            };
            let q = BlockQuantized::quantize(&x, 64, 256, spec);
            let y = q.dequantize();
            let err: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            assert!(
                err / norm < bound,
                "{bits:?}: relative error {}",
                err / norm
            );
        }
    }

    #[test]
    fn constant_and_zero_blocks() {
        let mut c = vec![9; 4];
        let p = quantize_block(&[0.0; 4], 15, &mut c);
        assert_eq!(c, vec![0; 4]);
        assert_eq!((p.zero_point, p.scale), (0, 1.0));
        // A constant non-zero block is represented exactly: range [0, v] contains it.
        let p = quantize_block(&[0.5; 4], 15, &mut c);
        let back = (i32::from(c[0]) - i32::from(p.zero_point)) as f32 * p.scale;
        assert!((back - 0.5).abs() < 1e-6, "{back}");
        let p = quantize_block(&[-0.25; 3], 255, &mut c[..3]);
        let back = (i32::from(c[0]) - i32::from(p.zero_point)) as f32 * p.scale;
        assert!((back + 0.25).abs() < 1e-6, "{back}");
    }

    #[test]
    fn short_last_block() {
        let x = weights(2 * 40, 11);
        let spec = QuantSpec {
            bits: Bits::Int4,
            block_size: 32,
        };
        let q = BlockQuantized::quantize(&x, 2, 40, spec);
        assert_eq!((q.blocks(), q.scales.len()), (2, 4));
        // Row 1's second block holds elements 72..80 alone.
        let mut c = vec![0; 8];
        let p = quantize_block(&x[72..80], 15, &mut c);
        assert_eq!((q.scales[3], q.zero_points[3]), (p.scale, p.zero_point));
        assert_eq!(&q.codes[72..80], &c[..]);
    }

    #[test]
    fn packing_puts_the_first_element_in_the_low_nibble() {
        assert_eq!(pack(&[1, 2, 3, 4, 5], Bits::Int4), vec![0x21, 0x43, 0x05]);
        assert_eq!(pack(&[1, 200], Bits::Int8), vec![1, 200]);
    }

    #[test]
    fn layouts_agree_with_dequantize() {
        let (rows, cols) = (6, 70);
        let x = weights(rows * cols, 5);
        let spec = QuantSpec {
            bits: Bits::Int4,
            block_size: 16,
        };
        let q = BlockQuantized::quantize(&x, rows, cols, spec);
        let y = q.dequantize();
        let nb = q.blocks();
        let nibble = |packed: &[u8], i: usize| (packed[i / 2] >> (4 * (i % 2))) & 0x0f;
        let t = q.transposed();
        let r = q.row_major();
        for row in 0..rows {
            for col in 0..cols {
                // Transposed: element [col, row] of [cols, rows]; block (col / bs) of row `row`.
                let code = nibble(&t.codes, col * rows + row);
                let bi = (col / 16) * rows + row;
                let (s, z) = (t.scales[bi], nibble(&t.zero_points, bi));
                let v = (i32::from(code) - i32::from(z)) as f32 * s;
                assert_eq!(v, y[row * cols + col]);
                // Row-major.
                let code = nibble(&r.codes, row * cols + col);
                let bi = row * nb + col / 16;
                let (s, z) = (r.scales[bi], nibble(&r.zero_points, bi));
                assert_eq!(
                    (i32::from(code) - i32::from(z)) as f32 * s,
                    y[row * cols + col]
                );
            }
        }
    }

    #[test]
    fn matmul_nbits_layout_pads_blocks_and_packs_zero_points_per_row() {
        let (rows, cols) = (3, 40);
        let x = weights(rows * cols, 21);
        let spec = QuantSpec {
            bits: Bits::Int4,
            block_size: 16,
        };
        let q = BlockQuantized::quantize(&x, rows, cols, spec);
        let l = q.matmul_nbits();
        // 3 blocks of 16 per row (the last holds 8 values and 8 zero codes), 8 bytes each.
        assert_eq!(l.codes.len(), rows * 3 * 8);
        assert_eq!(l.scales, q.scales);
        // ceil(3 / 2) = 2 zero-point bytes per row.
        assert_eq!(l.zero_points.len(), rows * 2);
        let nibble = |packed: &[u8], i: usize| (packed[i / 2] >> (4 * (i % 2))) & 0x0f;
        for r in 0..rows {
            for c in 0..48 {
                let got = nibble(&l.codes, r * 48 + c);
                let want = if c < cols { q.codes[r * cols + c] } else { 0 };
                assert_eq!(got, want, "row {r} col {c}");
            }
            for b in 0..3 {
                assert_eq!(nibble(&l.zero_points, r * 4 + b), q.zero_points[r * 3 + b]);
            }
            assert_eq!(nibble(&l.zero_points, r * 4 + 3), 0, "padding nibble");
        }
        let q8 = BlockQuantized::quantize(
            &x,
            rows,
            cols,
            QuantSpec {
                bits: Bits::Int8,
                ..spec
            },
        );
        let l8 = q8.matmul_nbits();
        assert_eq!(
            (l8.codes.len(), l8.zero_points),
            (rows * 48, q8.zero_points.clone())
        );
    }

    #[test]
    fn independent_of_thread_count() {
        let x = weights(64 * 96, 9);
        let spec = QuantSpec {
            bits: Bits::Int4,
            block_size: 32,
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .map(|p| p.install(|| BlockQuantized::quantize(&x, 64, 96, spec)));
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .map(|p| p.install(|| BlockQuantized::quantize(&x, 64, 96, spec)));
        match (one, many) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (a, b) => panic!("thread pools: {:?} {:?}", a.err(), b.err()),
        }
    }
}
