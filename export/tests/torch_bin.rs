//! Reads the torch.save fixtures written by `fixtures/torch_bin/make_cases.py`
//! and compares every tensor with the contiguous copy torch itself wrote to
//! `expected.safetensors`; then checks that damaged input gives errors, not
//! panics.

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use carrot_export::torch_bin::{
    RawTensor, TorchBinContents, TorchBinError, TorchDType, read_torch_bin,
    read_torch_bin_contents, read_torch_bin_from_reader,
};
use safetensors::SafeTensors;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/torch_bin")
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn expected_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("expected.safetensors")).expect("expected.safetensors")
}

fn case_names() -> Vec<String> {
    let m = manifest();
    let cases = m["cases"].as_object().expect("cases");
    cases.keys().cloned().collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn torch_bin_every_case_matches_torch() {
    let m = manifest();
    assert_eq!(
        m["torch"].as_str().map(|s| s.starts_with("2.15.0")),
        Some(true)
    );
    let raw = expected_bytes();
    let expected = SafeTensors::deserialize(&raw).expect("safetensors");
    let cases = m["cases"].as_object().expect("cases");
    assert!(cases.len() >= 12, "only {} cases", cases.len());
    let mut checked = 0;
    for (case, spec) in cases {
        let file = fixtures().join(spec["file"].as_str().expect("file"));
        let got = read_torch_bin_contents(&file).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want: Vec<&serde_json::Value> = spec["tensors"]
            .as_array()
            .expect("tensors")
            .iter()
            .collect();
        let got_names: Vec<&str> = got.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let want_names: Vec<&str> = want.iter().map(|t| t[0].as_str().expect("name")).collect();
        assert_eq!(got_names, want_names, "{case}: names or order");
        let skipped: Vec<&str> = spec["skipped"]
            .as_array()
            .expect("skipped")
            .iter()
            .map(|s| s.as_str().expect("str"))
            .collect();
        assert_eq!(got.skipped, skipped, "{case}: skipped entries");

        for ((name, t), w) in got.tensors.iter().zip(&want) {
            let what = format!("{case}/{name}");
            assert_eq!(
                t.dtype.torch_name(),
                w[1].as_str().expect("dtype"),
                "{what}: dtype"
            );
            let shape: Vec<usize> = w[2]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(t.shape, shape, "{what}: shape");
            let e = expected.tensor(&what).expect("expected tensor");
            assert_eq!(e.shape(), t.shape.as_slice(), "{what}: expected shape");
            assert_eq!(t.data, e.data(), "{what}: bytes");
            let f = expected
                .tensor(&format!("f32/{what}"))
                .expect("expected f32");
            let conv = t.to_f32().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(conv.len(), t.numel(), "{what}: to_f32 length");
            assert_eq!(f32_bytes(&conv), f.data(), "{what}: to_f32 values");
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} tensors checked");
}

#[test]
fn torch_bin_simple_api_and_spot_values() {
    let tensors = read_torch_bin(&fixtures().join("scalars.bin")).expect("scalars");
    let get = |n: &str| &tensors.iter().find(|(k, _)| k == n).expect("present").1;
    let s = get("s_f32");
    assert_eq!((s.dtype, s.shape.as_slice()), (TorchDType::F32, &[][..]));
    assert_eq!(s.to_f32().expect("f32"), vec![3.5]);
    assert_eq!(get("s_i64").to_f32().expect("i64"), vec![-7.0]);
    assert_eq!(get("s_bool").data, vec![1]);
    let empty = get("empty");
    assert_eq!((empty.shape.as_slice(), empty.data.len()), (&[0, 3][..], 0));

    let nested = read_torch_bin(&fixtures().join("nested.bin")).expect("nested");
    let names: Vec<&str> = nested.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "state_dict.layer.weight",
            "state_dict.sub.bias",
            "layers.0",
            "layers.1",
            "5"
        ]
    );

    let shared = read_torch_bin(&fixtures().join("shared.bin")).expect("shared");
    let a = shared[0].1.to_f32().expect("a");
    let a_t = shared[2].1.to_f32().expect("a_t");
    for i in 0..4 {
        for j in 0..4 {
            assert_eq!(a[i * 4 + j], a_t[j * 4 + i]);
        }
    }
}

#[test]
fn torch_bin_to_f32_checks_length() {
    let t = RawTensor {
        dtype: TorchDType::F16,
        shape: vec![2, 2],
        data: vec![0; 6],
    };
    let e = t.to_f32().expect_err("short data").to_string();
    assert!(e.contains("6 bytes") && e.contains("needs 8"), "{e}");
}

#[test]
fn torch_bin_legacy_format_is_refused() {
    let path = fixtures().join("legacy.bin");
    let e = read_torch_bin(&path).expect_err("legacy must fail");
    assert!(matches!(e, TorchBinError::Legacy { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("legacy.bin") && msg.contains("torch >= 1.6"),
        "{msg}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut tar = vec![0u8; 1024];
    tar[..8].copy_from_slice(b"sys_info");
    tar[257..262].copy_from_slice(b"ustar");
    let p = dir.path().join("old.tar.bin");
    std::fs::write(&p, &tar).expect("write");
    let msg = read_torch_bin(&p).expect_err("tar").to_string();
    assert!(msg.contains("old.tar.bin") && msg.contains("tar"), "{msg}");
}

// ---- helpers for rewriting archives ----

fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = ZipArchive::new(Cursor::new(bytes)).expect("zip");
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).expect("entry");
            let name = f.name().expect("name").into_owned();
            let mut data = Vec::new();
            f.read_to_end(&mut data).expect("read entry");
            (name, data)
        })
        .collect()
}

fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).expect("start_file");
        w.write_all(data).expect("write");
    }
    w.finish().expect("finish").into_inner()
}

fn read_mem(bytes: &[u8]) -> Result<TorchBinContents, TorchBinError> {
    read_torch_bin_from_reader(Cursor::new(bytes), Path::new("mem/test.bin"))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture")
}

fn with_record(
    entries: &[(String, Vec<u8>)],
    suffix: &str,
    data: Option<Vec<u8>>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (n, d) in entries {
        if n.ends_with(suffix) {
            if let Some(d) = &data {
                out.push((n.clone(), d.clone()));
            }
        } else {
            out.push((n.clone(), d.clone()));
        }
    }
    out
}

#[test]
fn torch_bin_rezipped_archive_reads_the_same() {
    for case in case_names() {
        let bytes = fixture(&format!("{case}.bin"));
        let again = rezip(&unzip(&bytes));
        assert_eq!(
            read_mem(&again).expect("rezipped"),
            read_mem(&bytes).expect("original"),
            "{case}"
        );
    }
}

#[test]
fn torch_bin_big_endian_archive() {
    // In plain.bin every tensor owns its storage, keyed 0.. in file order.
    let bytes = fixture("plain.bin");
    let want = read_mem(&bytes).expect("plain");
    let mut entries = unzip(&bytes);
    for (name, data) in entries.iter_mut() {
        if name.ends_with("/byteorder") {
            *data = b"big".to_vec();
        } else if let Some(key) = name.rsplit_once("/data/").map(|(_, k)| k) {
            let i: usize = key.parse().expect("numeric key");
            let size = want.tensors[i].1.dtype.size();
            for el in data.chunks_exact_mut(size) {
                el.reverse();
            }
        }
    }
    let got = read_mem(&rezip(&entries)).expect("big-endian");
    assert_eq!(got, want);
}

fn assert_err_names_file(r: Result<TorchBinContents, TorchBinError>, needle: &str) -> String {
    let msg = r.expect_err("must fail").to_string();
    assert!(msg.contains("mem/test.bin"), "no file in: {msg}");
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    msg
}

#[test]
fn torch_bin_corrupted_inputs_give_clear_errors() {
    let bytes = fixture("plain.bin");
    let entries = unzip(&bytes);

    assert_err_names_file(read_mem(&[]), "empty");
    assert_err_names_file(
        read_mem(b"hello world, not a checkpoint"),
        "unrecognised header",
    );
    let mut st = 16u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{\"__metadata__\":{}}");
    assert_err_names_file(read_mem(&st), "safetensors");
    assert_err_names_file(read_mem(&bytes[..bytes.len() / 2]), "zip");

    let no_pkl = with_record(&entries, "/data.pkl", None);
    assert_err_names_file(read_mem(&rezip(&no_pkl)), "no data.pkl");

    let no_storage = with_record(&entries, "/data/2", None);
    assert_err_names_file(read_mem(&rezip(&no_storage)), "plain/data/2");

    let short = with_record(&entries, "/data/1", Some(vec![0; 3]));
    assert_err_names_file(read_mem(&rezip(&short)), "declares");

    let bad_order = with_record(&entries, "/byteorder", Some(b"middle".to_vec()));
    assert_err_names_file(read_mem(&rezip(&bad_order)), "byte order");

    // A set is not something torch.save emits.
    let set_pkl = vec![0x80, 2, 0x8f, b'.'];
    let msg = assert_err_names_file(
        read_mem(&rezip(&with_record(&entries, "/data.pkl", Some(set_pkl)))),
        "EMPTY_SET",
    );
    assert!(msg.contains("data.pkl") && msg.contains("0x8f"), "{msg}");

    let list_root = vec![0x80, 2, b']', b'.'];
    assert_err_names_file(
        read_mem(&rezip(&with_record(&entries, "/data.pkl", Some(list_root)))),
        "top-level object is a list",
    );

    let truncated_pkl = {
        let pkl = &entries
            .iter()
            .find(|(n, _)| n.ends_with("data.pkl"))
            .expect("pkl")
            .1;
        pkl[..pkl.len() - 10].to_vec()
    };
    assert_err_names_file(
        read_mem(&rezip(&with_record(
            &entries,
            "/data.pkl",
            Some(truncated_pkl),
        ))),
        "malformed pickle",
    );

    let ts = vec![
        ("m/code/__torch__.py".to_string(), b"x".to_vec()),
        ("m/constants.pkl".to_string(), vec![0x80, 2, b')', b'.']),
    ];
    assert_err_names_file(read_mem(&rezip(&ts)), "TorchScript");
}

/// A pickle of `{"t": _rebuild_tensor_v2(storage '0' of `numel` floats, offset, size, stride)}`.
fn tensor_pickle(
    storage_class: &str,
    numel: u8,
    offset: u8,
    size: &[u8],
    stride: &[u8],
) -> Vec<u8> {
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn ints(p: &mut Vec<u8>, v: &[u8]) {
        p.push(b'(');
        for &x in v {
            p.extend_from_slice(&[b'K', x]);
        }
        p.push(b't');
    }
    let mut p = vec![0x80, 2, b'}', b'('];
    unicode(&mut p, "t");
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    unicode(&mut p, "storage");
    p.extend_from_slice(format!("ctorch\n{storage_class}\n").as_bytes());
    unicode(&mut p, "0");
    unicode(&mut p, "cpu");
    p.extend_from_slice(&[b'K', numel, b't', b'Q', b'K', offset]);
    ints(&mut p, size);
    ints(&mut p, stride);
    p.extend_from_slice(&[0x89, b'}', b't', b'R', b'u', b'.']);
    p
}

fn tensor_archive(pkl: Vec<u8>, storage: Vec<u8>) -> Vec<u8> {
    rezip(&[
        ("archive/data.pkl".to_string(), pkl),
        ("archive/byteorder".to_string(), b"little".to_vec()),
        ("archive/data/0".to_string(), storage),
        ("archive/version".to_string(), b"3\n".to_vec()),
    ])
}

#[test]
fn torch_bin_handmade_views() {
    let storage: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();

    // A 2x2 view at offset 1 with strides (2, 1) over 6 floats: [[1, 2], [3, 4]].
    let ok = tensor_archive(
        tensor_pickle("FloatStorage", 6, 1, &[2, 2], &[2, 1]),
        storage.clone(),
    );
    let got = read_mem(&ok).expect("valid view");
    assert_eq!(
        got.tensors[0].1.to_f32().expect("f32"),
        vec![1.0, 2.0, 3.0, 4.0]
    );

    // Stride 0 (expand): [[5, 5, 5]].
    let ok = tensor_archive(
        tensor_pickle("FloatStorage", 6, 5, &[1, 3], &[0, 0]),
        storage.clone(),
    );
    assert_eq!(
        read_mem(&ok).expect("expand").tensors[0]
            .1
            .to_f32()
            .expect("f32"),
        vec![5.0; 3]
    );

    let past_end = tensor_archive(
        tensor_pickle("FloatStorage", 6, 3, &[2, 2], &[2, 1]),
        storage.clone(),
    );
    let msg = assert_err_names_file(read_mem(&past_end), "tensor 't'");
    assert!(msg.contains("storage has 24 bytes"), "{msg}");

    let huge_offset = tensor_archive(
        tensor_pickle("FloatStorage", 6, 255, &[1], &[1]),
        storage.clone(),
    );
    assert_err_names_file(read_mem(&huge_offset), "tensor 't'");

    let rank_mismatch = tensor_archive(
        tensor_pickle("FloatStorage", 6, 0, &[2, 3], &[1]),
        storage.clone(),
    );
    assert_err_names_file(read_mem(&rank_mismatch), "stride");

    let wrong_numel = tensor_archive(
        tensor_pickle("FloatStorage", 7, 0, &[2], &[1]),
        storage.clone(),
    );
    assert_err_names_file(read_mem(&wrong_numel), "declares 28");

    let complex = tensor_archive(
        tensor_pickle("ComplexFloatStorage", 3, 0, &[3], &[1]),
        storage,
    );
    assert_err_names_file(read_mem(&complex), "torch.ComplexFloatStorage");
}

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, data: &mut [u8]) {
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(data.len());
        data[i] = match rng.below(4) {
            0 => data[i] ^ (1 << rng.below(8)),
            1 => rng.next() as u8,
            2 => 0xff,
            _ => 0,
        };
    }
}

#[test]
fn torch_bin_random_damage_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in ["module", "nested", "proto4", "shared", "strided", "v3"] {
        let bytes = fixture(&format!("{case}.bin"));
        let entries = unzip(&bytes);
        let pkl_index = entries
            .iter()
            .position(|(n, _)| n.ends_with("data.pkl"))
            .expect("pkl");

        // Damaged pickles inside a well-formed zip (CRCs recomputed).
        for _ in 0..400 {
            let mut e = entries.clone();
            mutate(&mut rng, &mut e[pkl_index].1);
            let _ = read_mem(&rezip(&e));
        }
        // Truncated pickles.
        let pkl_len = entries[pkl_index].1.len();
        for cut in (0..pkl_len).step_by(7) {
            let mut e = entries.clone();
            e[pkl_index].1.truncate(cut);
            assert!(
                read_mem(&rezip(&e)).is_err(),
                "{case}: pickle cut at {cut} accepted"
            );
        }
        // Damage anywhere in the file (zip structures, CRC-protected records).
        for _ in 0..150 {
            let mut b = bytes.clone();
            mutate(&mut rng, &mut b);
            let _ = read_mem(&b);
        }
        // Truncated files.
        for cut in (0..bytes.len()).step_by(97) {
            assert!(
                read_mem(&bytes[..cut]).is_err(),
                "{case}: file cut at {cut} accepted"
            );
        }
    }
}
