//! Decoding JPEG/PNG/WebP into 8-bit RGB with the semantics of Pillow's
//! `Image.open(f).convert("RGB")`.
//!
//! Pillow's rules, which differ from the `image` crate's own conversions:
//! * alpha is dropped, never composited onto a background;
//! * palette images take their palette colour (transparency ignored);
//! * 16-bit colour (RGB, RGBA, grey+alpha) keeps the most significant byte of each sample;
//! * 16-bit greyscale without alpha becomes Pillow mode `I;16`, whose conversion to 8 bits
//!   *clamps* (`min(v, 255)`) rather than scales;
//! * sub-byte greyscale is scaled to the full 0..=255 range;
//! * EXIF orientation is not applied.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::PreprocessError;

/// Read and decode an image file, refusing images with more than `max_pixels` pixels.
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes, &path.display().to_string(), max_pixels)
}

/// Decode an in-memory JPEG/PNG/WebP image; `what` names the source in errors.
///
/// The header is read first and images above `max_pixels` pixels are rejected before any pixel
/// data is decoded.
pub fn decode_image(
    bytes: &[u8],
    what: &str,
    max_pixels: u64,
) -> Result<RgbImage, PreprocessError> {
    let decode_err = |source| PreprocessError::Decode {
        what: what.to_owned(),
        source,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(image::ImageError::IoError(e)))?;
    let mut limits = Limits::default();
    limits.max_image_width = None;
    limits.max_image_height = None;
    // Our own pixel limit is checked below; keep the allocator bound consistent with it
    // (8 bytes/pixel covers 16-bit RGBA) plus room for metadata.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(PreprocessError::TooLarge {
            what: what.to_owned(),
            width,
            height,
            max_pixels,
        });
    }
    if pixels == 0 {
        return Err(PreprocessError::Empty {
            what: what.to_owned(),
        });
    }
    let img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    Ok(to_rgb8_like_pillow(img))
}

fn from_fn(w: u32, h: u32, samples: impl Iterator<Item = [u8; 3]>) -> RgbImage {
    let mut buf = Vec::with_capacity(w as usize * h as usize * 3);
    for px in samples {
        buf.extend_from_slice(&px);
    }
    RgbImage::from_raw(w, h, buf).expect("one RGB triple per pixel")
}

/// Convert any decoded image to RGB8 the way Pillow's `convert("RGB")` would after Pillow's own
/// decoder (see the module docs).
pub fn to_rgb8_like_pillow(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let msb = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(im) => from_fn(w, h, im.pixels().map(|p| [p[0], p[1], p[2]])),
        DynamicImage::ImageLuma8(im) => from_fn(w, h, im.pixels().map(|p| [p[0]; 3])),
        DynamicImage::ImageLumaA8(im) => from_fn(w, h, im.pixels().map(|p| [p[0]; 3])),
        DynamicImage::ImageLuma16(im) => {
            from_fn(w, h, im.pixels().map(|p| [p[0].min(255) as u8; 3]))
        }
        DynamicImage::ImageLumaA16(im) => from_fn(w, h, im.pixels().map(|p| [msb(p[0]); 3])),
        DynamicImage::ImageRgb16(im) => {
            from_fn(w, h, im.pixels().map(|p| [msb(p[0]), msb(p[1]), msb(p[2])]))
        }
        DynamicImage::ImageRgba16(im) => {
            from_fn(w, h, im.pixels().map(|p| [msb(p[0]), msb(p[1]), msb(p[2])]))
        }
        // Float formats are not produced by the enabled decoders; fall back to the crate's
        // conversion (which drops alpha too).
        other => other.to_rgb8(),
    }
}
