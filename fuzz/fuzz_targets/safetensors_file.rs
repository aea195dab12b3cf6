//! A single `model.safetensors` of arbitrary bytes: open it as a checkpoint and read every tensor
//! that fits in a few MB. Errors are fine; panics, hangs and huge allocations are not.
#![no_main]

use carrot_export::checkpoint::Checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    let Ok(mut ckpt) = Checkpoint::open_dir(dir.path()) else {
        return;
    };
    let _ = ckpt.dominant_dtype();
    let keys: Vec<String> = ckpt.keys().map(str::to_owned).collect();
    for key in keys.iter().take(16) {
        let _ = ckpt.info(key);
        let _ = ckpt.load_f32(key);
    }
});
