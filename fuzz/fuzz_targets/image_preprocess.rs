//! Image bytes of any format: decoded as the runtime does (pixel limit checked from the header),
//! then padded, resized and normalised for a small tower.
#![no_main]

use carrot_runtime::preprocess::{PreprocessConfig, decode_image, preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode_image(data, "fuzz input", 1 << 20) else {
        return;
    };
    for pad in [true, false] {
        let cfg = PreprocessConfig {
            pad,
            max_pixels: 1 << 20,
            ..PreprocessConfig::siglip(24)
        };
        if let Ok(pixels) = preprocess(&img, &cfg) {
            assert_eq!(pixels.len(), 3 * 24 * 24);
        }
    }
});
