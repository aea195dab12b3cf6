//! Bicubic resampling that reproduces Pillow's `Image.resize(size, BICUBIC)` bit for bit
//! on 8-bit RGB images.
//!
//! The algorithm, as Pillow defines it:
//!
//! * The filter is the Keys cubic convolution kernel with `a = -0.5`, support 2.
//! * Each axis is handled separately. For an axis going from `in_size` to `out_size` the scale is
//!   `in_size / out_size`; when downscaling the kernel is stretched by that scale (support
//!   `2 × scale`), when upscaling it is left as is (antialiasing only ever widens the kernel).
//! * Output sample `i` is centred at `(i + 0.5) × scale` in input coordinates. Its taps are the input
//!   samples `[trunc(center - support + 0.5), trunc(center + support + 0.5))` clipped to the image;
//!   tap `j` has weight `filter((j - center + 0.5) / filterscale)`, and the weights are divided
//!   by their sum, so edge pixels get renormalised (not mirrored or clamped) kernels.
//! * Weights are converted to signed fixed point with 22 fractional bits, rounding half away
//!   from zero. A pass accumulates `Σ pixel × weight` in a 32-bit integer starting from
//!   `1 << 21` (so the final shift rounds to nearest), shifts right arithmetically by 22 and
//!   clamps to 0..=255.
//! * The intermediate image between the two passes is stored as 8-bit pixels, so the pass order
//!   changes the result. Pillow runs the horizontal pass first, except (since Pillow 13.0) when
//!   the height shrinks by more than twice as many pixels as the width does
//!   (`out_h < in_h && 2 × (in_w - out_w) < in_h - out_h`, which includes every case where the
//!   width grows while the height shrinks); then the vertical pass runs first. See [`PassOrder`].
//! * A pass whose axis keeps its size is skipped entirely (with scale 1 the kernel is the
//!   identity anyway).

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;
const CHANNELS: usize = 3;

/// Keys cubic convolution kernel, `a = -0.5`, evaluated with the same operation order as Pillow.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps for every output sample along one axis.
#[derive(Debug, Clone)]
pub(crate) struct AxisCoeffs {
    /// Maximum number of taps per output sample; `weights` is `out_size × ksize`.
    ksize: usize,
    /// `(first input index, number of taps)` per output sample.
    bounds: Vec<(usize, usize)>,
    /// Weights in Q22 fixed point; unused trailing slots are zero.
    weights: Vec<i32>,
}

impl AxisCoeffs {
    /// Taps for resampling the span `[in0, in1)` of an axis of `in_size` samples onto `out_size`
    /// samples. The span is given in `f32`, like Pillow's resize box.
    pub(crate) fn new(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Self {
        assert!(out_size > 0, "output size must be positive");
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero, like the C cast; negative starts are clamped to 0 after.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xend = ((center + support + 0.5) as i64).min(in_size as i64);
            let count = (xend - xmin).clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;

            let mut sum = 0.0f64;
            for (x, tap) in taps.iter_mut().enumerate().take(count) {
                let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                *tap = w;
                sum += w;
            }
            for (tap, out) in taps.iter().zip(row.iter_mut()).take(count) {
                let w = if sum != 0.0 { tap / sum } else { *tap };
                *out = to_fixed(w);
            }
            bounds.push((xmin, count));
        }
        Self {
            ksize,
            bounds,
            weights,
        }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[out_index];
        let row = &self.weights[out_index * self.ksize..][..count];
        (start, row)
    }

    /// First input index read by any output sample, and one past the last.
    fn input_span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last.max(first))
    }
}

/// Q22 fixed point, rounding half away from zero (then truncating, as a C cast does).
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Round-and-clamp a Q22 accumulator to a byte. The accumulator already holds the `+ 0.5`.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `row0..row0 + rows` of `src` (`src_w` pixels wide).
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row0: usize,
    rows: usize,
    coeffs: &AxisCoeffs,
    out_w: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * CHANNELS];
    let src_stride = src_w * CHANNELS;
    for (y, out_row) in out.chunks_exact_mut(out_w * CHANNELS).enumerate() {
        let in_row = &src[(row0 + y) * src_stride..][..src_stride];
        for (xx, px) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
            let (start, taps) = coeffs.taps(xx);
            let mut acc = [HALF; CHANNELS];
            for (i, &k) in taps.iter().enumerate() {
                let p = &in_row[(start + i) * CHANNELS..][..CHANNELS];
                for c in 0..CHANNELS {
                    acc[c] = acc[c].wrapping_add(i32::from(p[c]).wrapping_mul(k));
                }
            }
            for c in 0..CHANNELS {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass: `src` is `w` pixels wide; `coeffs` index its rows relative to `row_offset`.
fn resample_vertical(
    src: &[u8],
    w: usize,
    row_offset: usize,
    coeffs: &AxisCoeffs,
    out_h: usize,
) -> Vec<u8> {
    let stride = w * CHANNELS;
    let mut out = vec![0u8; stride * out_h];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, taps) = coeffs.taps(yy);
        let start = start - row_offset;
        for (x, px) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
            let mut acc = [HALF; CHANNELS];
            for (i, &k) in taps.iter().enumerate() {
                let p = &src[(start + i) * stride + x * CHANNELS..][..CHANNELS];
                for c in 0..CHANNELS {
                    acc[c] = acc[c].wrapping_add(i32::from(p[c]).wrapping_mul(k));
                }
            }
            for c in 0..CHANNELS {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Which separable pass runs first when both axes change size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PassOrder {
    /// Pillow ≥ 13.0: vertical first when `out_h < in_h && 2 × (in_w - out_w) < in_h - out_h`,
    /// horizontal first otherwise.
    #[default]
    Pillow,
    /// Pillow < 13.0: always horizontal first.
    HorizontalFirst,
    /// Always vertical first.
    VerticalFirst,
}

impl PassOrder {
    fn vertical_first(self, in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
        match self {
            PassOrder::Pillow => {
                out_h < in_h && 2 * (in_w as i64 - out_w as i64) < (in_h - out_h) as i64
            }
            PassOrder::HorizontalFirst => false,
            PassOrder::VerticalFirst => true,
        }
    }
}

/// Resize to exactly `width × height` with Pillow's BICUBIC filter, matching
/// `PIL.Image.resize((width, height), Image.BICUBIC)` (no `reducing_gap`) of Pillow ≥ 13.0
/// pixel for pixel.
///
/// # Panics
/// If `width` or `height` is zero, or the input image is empty.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    resize_bicubic_ordered(img, width, height, PassOrder::Pillow)
}

/// [`resize_bicubic`] with an explicit pass order, e.g. [`PassOrder::HorizontalFirst`] to
/// reproduce Pillow releases before 13.0.
pub fn resize_bicubic_ordered(
    img: &RgbImage,
    width: usize,
    height: usize,
    order: PassOrder,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    assert!(width > 0 && height > 0, "target size must be positive");
    assert!(in_w > 0 && in_h > 0, "cannot resize an empty image");
    let src = img.as_raw().as_slice();
    let out = match (width != in_w, height != in_h) {
        (false, false) => return img.clone(),
        (true, false) => {
            let horiz = AxisCoeffs::new(in_w, 0.0, in_w as f32, width);
            resample_horizontal(src, in_w, 0, in_h, &horiz, width)
        }
        (false, true) => {
            let vert = AxisCoeffs::new(in_h, 0.0, in_h as f32, height);
            resample_vertical(src, in_w, 0, &vert, height)
        }
        (true, true) => {
            let horiz = AxisCoeffs::new(in_w, 0.0, in_w as f32, width);
            let vert = AxisCoeffs::new(in_h, 0.0, in_h as f32, height);
            if order.vertical_first(in_w, in_h, width, height) {
                let tmp = resample_vertical(src, in_w, 0, &vert, height);
                resample_horizontal(&tmp, in_w, 0, height, &horiz, width)
            } else {
                // Only the rows the vertical pass reads need a horizontal pass.
                let (first, last) = vert.input_span();
                let tmp = resample_horizontal(src, in_w, first, last - first, &horiz, width);
                resample_vertical(&tmp, width, first, &vert, height)
            }
        }
    };
    RgbImage::from_raw(width as u32, height as u32, out)
        .expect("resampled buffer has exactly width × height × 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_shape() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(-1.0), 0.0);
        assert_eq!(bicubic_filter(2.0), 0.0);
        assert_eq!(bicubic_filter(0.5), 0.5625);
        assert_eq!(bicubic_filter(1.5), -0.0625);
        assert_eq!(bicubic_filter(-1.5), -0.0625);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        assert_eq!(to_fixed(1.0), 1 << 22);
        assert_eq!(to_fixed(-0.0625), -(1 << 18));
        assert_eq!(to_fixed(0.5 / f64::from(1u32 << 22)), 1);
        assert_eq!(to_fixed(-0.5 / f64::from(1u32 << 22)), -1);
        assert_eq!(to_fixed(0.0), 0);
    }

    #[test]
    fn identity_scale_is_a_unit_kernel() {
        let c = AxisCoeffs::new(5, 0.0, 5.0, 5);
        for i in 0..5 {
            let (start, taps) = c.taps(i);
            let unit: Vec<usize> = taps
                .iter()
                .enumerate()
                .filter(|(_, k)| **k != 0)
                .map(|(j, k)| {
                    assert_eq!(*k, 1 << 22);
                    start + j
                })
                .collect();
            assert_eq!(unit, vec![i]);
        }
    }

    #[test]
    fn downscale_by_two_taps() {
        // 8 → 4: scale 2, support 4; centres 1, 3, 5, 7. Output 2 starts at trunc(5 - 4 + 0.5) = 1
        // and would end at trunc(5 + 4 + 0.5) = 9, clipped to 8.
        let c = AxisCoeffs::new(8, 0.0, 8.0, 4);
        assert_eq!(c.ksize, 9);
        assert_eq!(c.bounds, vec![(0, 5), (0, 7), (1, 7), (3, 5)]);
        for i in 0..4 {
            let (_, taps) = c.taps(i);
            let sum: i64 = taps.iter().map(|&k| i64::from(k)).sum();
            assert!((sum - (1 << 22)).abs() <= taps.len() as i64, "{sum}");
        }
    }

    #[test]
    fn coefficient_count_bound_holds_for_odd_factors() {
        for (i, o) in [
            (7usize, 3usize),
            (451, 384),
            (384, 451),
            (1, 5),
            (5, 1),
            (1000, 7),
        ] {
            let c = AxisCoeffs::new(i, 0.0, i as f32, o);
            for &(start, count) in &c.bounds {
                assert!(count <= c.ksize);
                assert!(start + count <= i);
                assert!(count > 0);
            }
        }
    }
}
