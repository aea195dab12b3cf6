//! Reading checkpoints, configs and adapters: the fixture models under `fixtures/models/`,
//! transformers' RoPE frequencies (`fixtures/goldens/rope.json`) and peft's own merges
//! (`fixtures/lora_merge/`, made by `fixtures/lora_merge/make_case.py`).

use std::path::{Path, PathBuf};

use carrot_export::checkpoint::{Checkpoint, StoredDType};
use carrot_export::hf_config::{HfModelConfig, read_json, resolve_text_config};
use carrot_export::lora::LoraAdapter;
use carrot_export::mm_config::{ImageAspectRatio, ModelKind};
use carrot_export::rope_freq::llama3_inv_freq;
use carrot_export::siglip_table::VisionOrigin;
use carrot_export::source::{Layout, ResolvedModel, open};
use carrot_graphs::config::{Llama3RopeScaling, RopeConfig};
use carrot_graphs::weights::WeightSource;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

fn open_ok(
    model: &Path,
    base: Option<&Path>,
    loras: &[PathBuf],
    tower: Option<&Path>,
) -> ResolvedModel {
    match open(model, base, loras, tower) {
        Ok(m) => m,
        Err(e) => panic!("open {}: {e}", model.display()),
    }
}

fn open_err(model: &Path, base: Option<&Path>, loras: &[PathBuf], tower: Option<&Path>) -> String {
    match open(model, base, loras, tower) {
        Ok(_) => panic!("open {} should fail", model.display()),
        Err(e) => e.to_string(),
    }
}

/// Copies the files of a fixture directory (flat) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
}

/// Rewrites a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let text = std::fs::read_to_string(path).expect("read json");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("parse json");
    edit(value.as_object_mut().expect("object"));
    std::fs::write(path, serde_json::to_string_pretty(&value).expect("json")).expect("write json");
}

fn load(ck: &mut Checkpoint, key: &str) -> (Vec<usize>, Vec<f32>) {
    ck.load_f32(key).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

fn golden_rope(case: &serde_json::Value) -> (usize, RopeConfig, Vec<f32>, Vec<f32>) {
    let p = &case["rope_parameters"];
    let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("rope.json: {k}"));
    let rope = RopeConfig {
        theta: f("rope_theta"),
        llama3: Some(Llama3RopeScaling {
            factor: f("factor"),
            low_freq_factor: f("low_freq_factor"),
            high_freq_factor: f("high_freq_factor"),
            original_max_position_embeddings: f("original_max_position_embeddings"),
        }),
    };
    let list = |k: &str| -> Vec<f32> {
        case[k]
            .as_array()
            .expect("list")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect()
    };
    (
        case["head_dim"].as_u64().expect("head_dim") as usize,
        rope,
        list("inv_freq"),
        list("inv_freq_unscaled"),
    )
}

#[test]
fn rope_inv_freq_matches_transformers_bit_for_bit() {
    let goldens: serde_json::Value =
        read_json(&root().join("fixtures/goldens/rope.json")).expect("rope.json");
    for case in ["fixture", "llama31"] {
        let (head_dim, rope, scaled, unscaled) = golden_rope(&goldens[case]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&llama3_inv_freq(head_dim, &rope)),
            bits(&scaled),
            "{case}: llama3"
        );
        let plain = RopeConfig {
            llama3: None,
            ..rope
        };
        assert_eq!(
            bits(&llama3_inv_freq(head_dim, &plain)),
            bits(&unscaled),
            "{case}: default"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

#[test]
fn transformers_4_and_5_layouts_resolve_to_the_same_text_config() {
    let read = |name: &str| {
        let path = fixture(name).join("config.json");
        let cfg: HfModelConfig = read_json(&path).expect("config");
        resolve_text_config(&cfg, &path.display().to_string()).expect("text config")
    };
    let v4 = read("carrot-tiny");
    let v5 = read("llama-base-tiny");
    assert_eq!(v4.rope, v5.rope);
    assert_eq!(
        v5.rope,
        RopeConfig {
            theta: 500000.0,
            llama3: Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0
            })
        }
    );
    assert_eq!(
        (v4.hidden_size, v4.head_dim, v4.num_kv_heads, v4.vocab_size),
        (32, 16, 2, 128256)
    );
    assert!(!v4.tie_word_embeddings && v5.tie_word_embeddings);
}

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn merged_carrot_checkpoint() {
    let mut m = open_ok(&fixture("carrot-tiny"), None, &[], None);
    assert_eq!(m.layout, Layout::Merged);
    assert_eq!(m.source_dtype, "float16");
    let ModelKind::Multimodal(mm) = &m.kind else {
        panic!("carrot-tiny is multimodal")
    };
    assert_eq!(
        (
            mm.vision.tower.hidden_size,
            mm.vision.tower.num_layers,
            mm.vision.layers_used
        ),
        (24, 3, 2)
    );
    assert_eq!(
        (mm.vision.tower.image_size, mm.vision.num_image_tokens()),
        (60, 16)
    );
    assert_eq!(
        (
            mm.projector.depth,
            mm.projector.in_features,
            mm.projector.out_features
        ),
        (2, 24, 32)
    );
    assert_eq!(mm.settings.image_aspect_ratio, ImageAspectRatio::Pad);
    assert_eq!(mm.settings.tokenizer_model_max_length, Some(2048));
    assert!(
        matches!(&m.vision_origin, Some(VisionOrigin::LocalTower(d)) if d.ends_with("siglip-tiny"))
    );
    assert_eq!(m.generation.temperature, Some(0.2));
    assert_eq!(m.generation.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(m.generation.bos_token_id, Some(128000));
    assert!(
        m.support_files
            .iter()
            .any(|p| p.ends_with("generation_config.json"))
    );

    let origin =
        |m: &ResolvedModel, name: &str| m.weights.origin(name).map(|(_, key, role)| (key, role));
    assert_eq!(
        origin(&m, "vision_model.encoder.layers.1.mlp.fc2.bias"),
        Some((
            "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias".into(),
            "model"
        ))
    );
    assert_eq!(
        origin(&m, "mm_projector.2.weight"),
        Some(("model.mm_projector.2.weight".into(), "model"))
    );
    assert_eq!(
        origin(&m, "lm_head.weight"),
        Some(("lm_head.weight".into(), "model"))
    );

    // Every expected tensor loads with its expected shape, and fp16 values come back exactly.
    let mut ck = Checkpoint::open_dir(&fixture("carrot-tiny")).expect("checkpoint");
    let names: Vec<(String, Vec<usize>)> = m
        .weights
        .expected()
        .iter()
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    assert!(
        names
            .iter()
            .any(|(n, _)| n == "vision_model.encoder.layers.1.self_attn.out_proj.weight")
    );
    assert!(
        !names
            .iter()
            .any(|(n, _)| n.starts_with("vision_model.encoder.layers.2.")),
        "layer 2 is never used"
    );
    for (name, shape) in &names {
        let t = m.weights.tensor(name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&t.shape, shape, "{name}");
        let (_, key, _) = m.weights.origin(name).expect("origin");
        assert_eq!(t.data, load(&mut ck, &key).1, "{name}");
    }
    assert_eq!(m.weights.bytes_read(), m.weights.bytes_total());
    assert_eq!(
        ck.info("model.embed_tokens.weight").expect("info").dtype,
        StoredDType::F16
    );
}

#[test]
fn plain_llama_with_tied_embeddings() {
    let mut m = open_ok(&fixture("llama-base-tiny"), None, &[], None);
    assert_eq!(m.kind, ModelKind::TextOnly);
    assert_eq!(m.source_dtype, "bfloat16");
    assert!(m.vision_origin.is_none());
    let files: Vec<_> = m
        .support_files
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    assert_eq!(files, ["chat_template.jinja", "generation_config.json"]);
    let embed = m
        .weights
        .tensor("model.embed_tokens.weight")
        .expect("embed");
    let head = m.weights.tensor("lm_head.weight").expect("lm_head");
    assert_eq!(embed, head);
    assert_eq!(embed.shape, vec![128256, 32]);
    let err = m
        .weights
        .tensor("vision_model.embeddings.patch_embedding.weight")
        .expect_err("text only")
        .to_string();
    assert!(
        err.contains("vision_model.embeddings.patch_embedding.weight"),
        "{err}"
    );

    let err = open_err(
        &fixture("llama-base-tiny"),
        None,
        &[],
        Some(&fixture("siglip-tiny")),
    );
    assert!(
        err.contains("--vision-tower") && err.contains("text-only"),
        "{err}"
    );
}

/// `delta[o, i] = Σ_k B[o, k] A[k, i]`, straight from the definition.
fn naive_delta(a: &[f32], b: &[f32], out: usize, r: usize, inp: usize) -> Vec<f32> {
    let mut d = vec![0f32; out * inp];
    for o in 0..out {
        for i in 0..inp {
            d[o * inp + i] = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
        }
    }
    d
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut worst = (0.0f32, 0usize);
    let mut bad = 0;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        if err > 1e-5 + 1e-5 * e.abs() {
            bad += 1;
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert_eq!(
        bad, 0,
        "{what}: {bad} elements differ; worst |diff| {} at {}",
        worst.0, worst.1
    );
}

#[test]
fn bunny_lora_over_base() {
    let lora = fixture("carrot-lora-tiny");
    let base = fixture("llama-base-tiny");
    let mut m = open_ok(&lora, Some(&base), &[], None);
    assert_eq!(m.layout, Layout::LoraOverBase { base: base.clone() });
    assert_eq!(m.loras, vec![lora.clone()]);
    assert_eq!(m.source_dtype, "bfloat16");
    assert!(m.kind.multimodal().is_some());

    let origin = |m: &ResolvedModel, name: &str| m.weights.origin(name);
    let (file, key, role) = origin(&m, "mm_projector.0.weight").expect("projector");
    assert_eq!(
        (key.as_str(), role),
        (
            "base_model.model.model.mm_projector.0.weight",
            "non_lora_trainables"
        )
    );
    assert!(file.ends_with("non_lora_trainables.bin"));
    let (file, key, role) =
        origin(&m, "vision_model.encoder.layers.0.self_attn.q_proj.weight").expect("vision");
    assert_eq!(
        (key.as_str(), role),
        (
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "vision_tower"
        )
    );
    assert!(file.ends_with("siglip-tiny/model.safetensors"));
    let (_, key, role) = origin(&m, "model.layers.1.mlp.down_proj.weight").expect("llm");
    assert_eq!(
        (key.as_str(), role),
        ("model.layers.1.mlp.down_proj.weight", "base")
    );

    // Merged weights: base + s · B @ A with the per-module scaling peft gives this adapter
    // (r 8 / alpha 16; rank_pattern down_proj → 4; alpha_pattern q_proj → 32).
    let mut base_ck = Checkpoint::open_dir(&base).expect("base");
    let mut adapter =
        Checkpoint::open_files(&lora, &[lora.join("adapter_model.safetensors")]).expect("adapter");
    for (module, scaling, r) in [
        ("model.layers.0.self_attn.q_proj", 4.0f32, 8),
        ("model.layers.1.self_attn.k_proj", 2.0, 8),
        ("model.layers.0.mlp.down_proj", 4.0, 4),
    ] {
        let name = format!("{module}.weight");
        let (shape, w) = load(&mut base_ck, &name);
        let (_, a) = load(
            &mut adapter,
            &format!("base_model.model.{module}.lora_A.weight"),
        );
        let (_, b) = load(
            &mut adapter,
            &format!("base_model.model.{module}.lora_B.weight"),
        );
        let delta = naive_delta(&a, &b, shape[0], r, shape[1]);
        let expected: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| w + d * scaling).collect();
        let t = m.weights.tensor(&name).expect("merged");
        assert_close(&t.data, &expected, &name);
    }
    // Tensors no adapter touches come back as stored.
    let norm = m
        .weights
        .tensor("model.layers.0.input_layernorm.weight")
        .expect("norm");
    assert_eq!(
        norm.data,
        load(&mut base_ck, "model.layers.0.input_layernorm.weight").1
    );

    // Reading every tensor once reads every byte the progress estimate counted.
    let names: Vec<String> = m.weights.expected().keys().cloned().collect();
    let before = m.weights.bytes_read();
    for name in &names {
        m.weights.tensor(name).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(before > 0);
    assert_eq!(m.weights.bytes_read() - before, m.weights.bytes_total());

    // Without --base, a local `base_model_name_or_path` is used.
    let m2 = open_ok(&lora, None, &[], None);
    assert!(
        matches!(&m2.layout, Layout::LoraOverBase { base } if base.ends_with("llama-base-tiny"))
    );
}

#[test]
fn lora_dir_without_base_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("lora");
    copy_dir(&fixture("carrot-lora-tiny"), &dir);
    let err = open_err(&dir, None, &[], Some(&fixture("siglip-tiny")));
    assert!(
        err.contains("LoRA adapter directory") && err.contains("--base"),
        "{err}"
    );
    let err = open_err(
        &fixture("carrot-tiny"),
        Some(&fixture("llama-base-tiny")),
        &[],
        None,
    );
    assert!(
        err.contains("--base") && err.contains("not a LoRA output directory"),
        "{err}"
    );
}

#[test]
fn extra_rslora_adapter_from_torch_bin() {
    let base = fixture("llama-base-tiny");
    let extra = fixture("lora-rslora-tiny");
    let mut m = open_ok(&base, None, std::slice::from_ref(&extra), None);
    assert_eq!(m.loras, vec![extra.clone()]);
    let adapter = LoraAdapter::open(&extra).expect("adapter");
    // r 4, alpha 8, use_rslora: 8 / sqrt(4).
    assert_eq!(
        adapter.scaling("model.layers.1.self_attn.o_proj"),
        Some(4.0)
    );
    let mut base_ck = Checkpoint::open_dir(&base).expect("base");
    let mut ad =
        Checkpoint::open_files(&extra, &[extra.join("adapter_model.bin")]).expect("adapter bin");
    let name = "model.layers.1.self_attn.o_proj.weight";
    let (shape, w) = load(&mut base_ck, name);
    let (_, a) = load(
        &mut ad,
        "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight",
    );
    let (_, b) = load(
        &mut ad,
        "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight",
    );
    let delta = naive_delta(&a, &b, shape[0], 4, shape[1]);
    let expected: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| w + d * 4.0).collect();
    assert_close(
        &m.weights.tensor(name).expect("merged").data,
        &expected,
        name,
    );
    let untouched = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(
        m.weights.tensor(untouched).expect("up").data,
        load(&mut base_ck, untouched).1
    );
}

#[test]
fn lora_merges_match_peft_merge_and_unload() {
    for case in ["plain", "rslora", "patterns"] {
        let dir = root().join("fixtures/lora_merge").join(case);
        let mut adapter = LoraAdapter::open(&dir).unwrap_or_else(|e| panic!("{case}: {e}"));
        let mut base = Checkpoint::open_files(&dir, &[dir.join("base.safetensors")]).expect("base");
        let mut merged =
            Checkpoint::open_files(&dir, &[dir.join("merged.safetensors")]).expect("merged");
        let keys: Vec<String> = base.keys().map(str::to_string).collect();
        adapter
            .check_targets(|k| base.info(k).ok().map(|i| i.shape.clone()))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let mut applied = 0;
        for key in &keys {
            let (shape, mut w) = load(&mut base, key);
            applied += usize::from(adapter.merge(key, &mut w, &shape).expect("merge"));
            assert_close(&w, &load(&mut merged, key).1, &format!("{case}: {key}"));
        }
        assert_eq!(applied, keys.len(), "{case}: every weight is adapted");
    }
    let patterns =
        LoraAdapter::open(&root().join("fixtures/lora_merge/patterns")).expect("patterns");
    assert_eq!(
        patterns.scaling("model.layers.1.self_attn.q_proj"),
        Some(8.0),
        "rank 2 from the first matching key"
    );
    assert_eq!(
        patterns.scaling("model.layers.0.self_attn.q_proj"),
        Some(16.0 / 6.0)
    );
    assert_eq!(
        patterns.scaling("model.layers.1.self_attn.v_proj"),
        Some(5.0 / 8.0)
    );
    assert_eq!(
        patterns.scaling("model.layers.0.self_attn.v_proj"),
        Some(2.0)
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn adapter_refusals() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "use_dora",
            serde_json::json!(true),
            "DoRA adapters are not supported",
        ),
        (
            "bias",
            serde_json::json!("all"),
            "bias `all` is not supported",
        ),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save (lm_head)",
        ),
        ("peft_type", serde_json::json!("IA3"), "peft_type `IA3`"),
    ];
    for (key, value, needle) in cases {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("extra");
        copy_dir(&fixture("lora-rslora-tiny"), &dir);
        edit_json(&dir.join("adapter_config.json"), |m| {
            m.insert(key.into(), value);
        });
        let err = open_err(&fixture("llama-base-tiny"), None, &[dir], None);
        assert!(
            err.contains(needle) && err.contains("adapter_config.json"),
            "{key}: {err}"
        );
    }
}

#[test]
fn adapter_module_missing_from_the_model_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("extra");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#,
    )
    .expect("cfg");
    let a = vec![0u8; 2 * 32 * 4];
    let b = vec![0u8; 64 * 2 * 4];
    let views = vec![
        (
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 32], &a)
                .expect("view"),
        ),
        (
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 2], &b)
                .expect("view"),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
        .expect("write");
    let err = open_err(&fixture("llama-base-tiny"), None, &[dir], None);
    assert!(
        err.contains("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"),
        "{err}"
    );
    assert!(
        err.contains("model.layers.7.self_attn.q_proj.weight"),
        "{err}"
    );
}

fn carrot_config_copy(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("carrot");
    copy_dir(&fixture("carrot-tiny"), &dir);
    let siglip = fixture("siglip-tiny");
    edit_json(&dir.join("config.json"), |m| {
        m.insert(
            "mm_vision_tower".into(),
            serde_json::json!(siglip.display().to_string()),
        );
        edit(m);
    });
    (tmp, dir)
}

#[test]
fn config_refusals() {
    let (_tmp, dir) = carrot_config_copy(|m| {
        m.insert("use_s2".into(), serde_json::json!(true));
    });
    let err = open_err(&dir, None, &[], None);
    assert!(
        err.contains("S2 multi-scale vision (use_s2) is not supported yet")
            && err.contains("config.json"),
        "{err}"
    );

    let (_tmp, dir) = carrot_config_copy(|m| {
        m.insert("mm_projector_type".into(), serde_json::json!("ldpnetv2"));
    });
    let err = open_err(&dir, None, &[], None);
    assert!(
        err.contains("mm_projector_type `ldpnetv2` is not supported"),
        "{err}"
    );

    let (_tmp, dir) = carrot_config_copy(|m| {
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    let err = open_err(&dir, None, &[], None);
    assert!(err.contains("RoPE type `yarn` is not supported"), "{err}");

    let (_tmp, dir) = carrot_config_copy(|m| {
        m.insert(
            "mm_vision_tower".into(),
            serde_json::json!("acme/unknown-vit"),
        );
    });
    let err = open_err(&dir, None, &[], None);
    assert!(
        err.contains("mm_vision_tower `acme/unknown-vit`") && err.contains("--vision-tower"),
        "{err}"
    );
    // The same model opens once the tower is named on the command line.
    open_ok(&dir, None, &[], Some(&fixture("siglip-tiny")));
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let (_tmp, dir) = carrot_config_copy(|m| {
        m.insert("intermediate_size".into(), serde_json::json!(48));
    });
    let err = open_err(&dir, None, &[], None);
    assert!(
        err.contains("model.layers.0.mlp.down_proj.weight") || err.contains("mlp.gate_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("expected [48, 32]") || err.contains("expected [32, 48]"),
        "{err}"
    );
    assert!(err.contains(".safetensors"), "{err}");
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = carrot_config_copy(|_| {});
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).expect("rm");
    let err = open_err(&dir, None, &[], None);
    assert!(err.contains("model.safetensors.index.json"), "{err}");
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn vision_weights_fall_back_to_the_siglip_directory() {
    // A merged checkpoint without the vision tower: SigLIP weights come from mm_vision_tower's dir.
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("novision");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        fixture("carrot-tiny").join("config.json"),
        dir.join("config.json"),
    )
    .expect("config");
    edit_json(&dir.join("config.json"), |m| {
        m.insert(
            "mm_vision_tower".into(),
            serde_json::json!(fixture("siglip-tiny").display().to_string()),
        );
    });
    let mut src = Checkpoint::open_dir(&fixture("carrot-tiny")).expect("carrot");
    let keys: Vec<String> = src
        .keys()
        .filter(|k| !k.starts_with("model.vision_tower."))
        .map(str::to_string)
        .collect();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = keys
        .iter()
        .map(|k| {
            let (shape, data) = load(&mut src, k);
            (
                k.clone(),
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
    let m = open_ok(&dir, None, &[], None);
    let (file, key, role) = m
        .weights
        .origin("vision_model.embeddings.position_embedding.weight")
        .expect("origin");
    assert_eq!(
        (key.as_str(), role),
        (
            "vision_model.embeddings.position_embedding.weight",
            "vision_tower"
        )
    );
    assert!(file.ends_with("siglip-tiny/model.safetensors"));
    assert_eq!(m.source_dtype, "float32");

    // With the tower neither in the checkpoint nor local, the error says what to pass.
    edit_json(&dir.join("config.json"), |m| {
        m.insert(
            "mm_vision_tower".into(),
            serde_json::json!("google/siglip-so400m-patch14-384"),
        );
        m.insert("mm_hidden_size".into(), serde_json::json!(1152));
    });
    let err = open_err(&dir, None, &[], None);
    assert!(
        err.contains("no vision tower weights") && err.contains("--vision-tower"),
        "{err}"
    );
}
