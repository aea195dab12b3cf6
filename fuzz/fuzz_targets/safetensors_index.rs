//! `model.safetensors.index.json` of arbitrary bytes next to one valid shard: the index must be
//! checked (missing shards, paths leaving the directory, keys the shard lacks) without panicking.
#![no_main]

use carrot_export::checkpoint::Checkpoint;
use libfuzzer_sys::fuzz_target;

/// A valid shard with one f32 tensor `w` of shape [2].
fn shard() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(&[0, 0, 128, 63, 0, 0, 0, 64]);
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model-00001-of-00001.safetensors"), shard()).expect("write");
    std::fs::write(dir.path().join("model.safetensors.index.json"), data).expect("write");
    let Ok(mut ckpt) = Checkpoint::open_dir(dir.path()) else {
        return;
    };
    let keys: Vec<String> = ckpt.keys().map(str::to_owned).collect();
    for key in keys.iter().take(16) {
        let _ = ckpt.file_of(key);
        let _ = ckpt.load_f32(key);
    }
});
