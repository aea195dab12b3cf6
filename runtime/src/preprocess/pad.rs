//! LLaVA/Bunny `expand2square`: pad the short side so the image becomes square.

use image::{Rgb, RgbImage};

/// Pad `img` to a `max(W, H)` square filled with `color`.
///
/// A wide image is pasted at `(0, (W - H) / 2)`, a tall one at `((H - W) / 2, 0)` (integer
/// division, so an odd margin puts the extra row/column below/right). A square image is returned
/// unchanged.
pub fn expand_to_square(img: &RgbImage, color: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let (x0, y0) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let mut out = RgbImage::from_pixel(side, side, Rgb(color));
    let row_bytes = w as usize * 3;
    let out_stride = side as usize * 3;
    let src = img.as_raw();
    let dst: &mut [u8] = &mut out;
    for y in 0..h as usize {
        let d = (y + y0 as usize) * out_stride + x0 as usize * 3;
        dst[d..d + row_bytes].copy_from_slice(&src[y * row_bytes..(y + 1) * row_bytes]);
    }
    out
}
