//! Image preprocessing for the SigLIP tower, reproducing the reference Python pipeline
//! (Bunny's `expand2square` + transformers' PIL image processor) exactly:
//!
//! 1. decode and convert to RGB like `PIL.Image.open(f).convert("RGB")` ([`load_image`],
//!    [`decode_image`]);
//! 2. optionally pad to a square ([`expand_to_square`]);
//! 3. resize to `image_size × image_size` with Pillow's BICUBIC ([`resize_bicubic`]);
//! 4. rescale and normalise to channels-first `f32` ([`preprocess`]).

mod decode;
mod pad;
mod resize;

use std::borrow::Cow;
use std::path::PathBuf;

pub use decode::{decode_image, load_image, to_rgb8_like_pillow};
pub use image::RgbImage;
pub use pad::expand_to_square;
pub use resize::{PassOrder, resize_bicubic, resize_bicubic_ordered};

/// Default ceiling on decoded image size: 64 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Errors from loading an image.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read image file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode image {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: image::ImageError,
    },
    #[error(
        "image {what} is {width}x{height} ({} pixels), more than the limit of {max_pixels} pixels",
        u64::from(*width) * u64::from(*height)
    )]
    TooLarge {
        what: String,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("image {what} has no pixels")]
    Empty { what: String },
    #[error(
        "image {width}x{height} pads to a {side}x{side} square ({} pixels), more than the limit of \
         {max_pixels} pixels; crop it closer to square",
        u64::from(*side) * u64::from(*side)
    )]
    PaddedTooLarge {
        width: u32,
        height: u32,
        side: u32,
        max_pixels: u64,
    },
}

/// Parameters of the vision preprocessing, normally taken from the export manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square model input.
    pub image_size: usize,
    /// Pad to a square before resizing (`image_aspect_ratio == "pad"`).
    pub pad: bool,
    /// Padding colour, `int(mean * 255)` per channel in the reference.
    pub pad_color: [u8; 3],
    /// Rescale factor applied to 0..=255 samples (`1/255`).
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Largest accepted decoded image, in pixels.
    pub max_pixels: u64,
}

impl PreprocessConfig {
    /// SigLIP defaults as Bunny uses them: pad with (127,127,127), rescale 1/255, mean = std = 0.5.
    pub fn siglip(image_size: usize) -> Self {
        Self {
            image_size,
            pad: true,
            pad_color: [127; 3],
            rescale: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// The rescale factor as the double the reference multiplies by.
    ///
    /// Python computes `x.astype(float64) * (1/255)` and only then rounds to `f32`; with the factor
    /// already rounded to `f32` about half of the 256 byte values would land one ulp off. Factors
    /// are conventionally `1/n` for an integer `n`, so when `rescale` is the `f32` rounding of such
    /// a reciprocal, the exact double `1/n` is used.
    fn rescale_f64(&self) -> f64 {
        let r = f64::from(self.rescale);
        if r > 0.0 {
            let n = (1.0 / r).round();
            if n >= 1.0 && ((1.0 / n) as f32) == self.rescale {
                return 1.0 / n;
            }
        }
        r
    }

    /// The normalised value of every byte level, per channel, computed like numpy does it:
    /// `f32(f64(v) * rescale)`, then `(x - mean) / std` in `f32`.
    pub fn lookup_table(&self) -> [[f32; 256]; 3] {
        let scale = self.rescale_f64();
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let x = (v as f64 * scale) as f32;
                *out = (x - self.mean[c]) / self.std[c];
            }
        }
        lut
    }
}

/// Pad (if configured), resize to `image_size²` and normalise; returns `[3, size, size]`
/// channels-first `f32` values. The padded square is held in memory, so an image whose square
/// has more than `cfg.max_pixels` pixels (a long thin strip) is refused.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Vec<f32>, PreprocessError> {
    let size = cfg.image_size;
    let squared = if cfg.pad {
        let side = img.width().max(img.height());
        if u64::from(side) * u64::from(side) > cfg.max_pixels {
            return Err(PreprocessError::PaddedTooLarge {
                width: img.width(),
                height: img.height(),
                side,
                max_pixels: cfg.max_pixels,
            });
        }
        Cow::Owned(expand_to_square(img, cfg.pad_color))
    } else {
        Cow::Borrowed(img)
    };
    let resized = resize_bicubic(&squared, size, size);
    Ok(normalize(&resized, cfg))
}

/// Rescale and normalise an RGB image into channels-first `f32`, without resizing.
pub fn normalize(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let lut = cfg.lookup_table();
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
    out
}
