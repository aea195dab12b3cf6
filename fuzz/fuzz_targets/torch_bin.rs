//! A torch `.bin` (zip + pickle) of arbitrary bytes: read, then convert every small tensor.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use carrot_export::torch_bin::read_torch_bin_from_reader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(contents) = read_torch_bin_from_reader(Cursor::new(data), Path::new("fuzz.bin")) else {
        return;
    };
    for (_, tensor) in contents.tensors.iter().take(16) {
        if tensor.numel() <= 1 << 20 {
            let _ = tensor.to_f32();
        }
    }
});
