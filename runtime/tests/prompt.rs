//! Prompt assembly against the reference: Bunny's template and chunked image tokenization, and
//! the checkpoint's chat template rendered and tokenized as transformers does
//! (`fixtures/goldens/generate.json`, made by transformers with the real Llama 3 tokenizer).

use std::path::{Path, PathBuf};

use carrot_runtime::prompt::{Message, PromptTokenizer, Turn, bunny_prompt};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn records() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("fixtures/goldens/generate.json"))
        .expect("generate.json");
    serde_json::from_str::<serde_json::Value>(&text).expect("json")["records"].clone()
}

/// A directory with the Llama 3 tokenizer and, optionally, a model's chat template.
fn tokenizer_dir(chat_template_from: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let tok = root().join(".cache/llama3-tokenizer");
    for leaf in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(leaf), dir.path().join(leaf))
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", tok.join(leaf).display()));
    }
    if let Some(model) = chat_template_from {
        let src = root()
            .join("fixtures/models")
            .join(model)
            .join("chat_template.jinja");
        std::fs::copy(&src, dir.path().join("chat_template.jinja")).expect("chat template");
    }
    dir
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .expect("ids")
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect()
}

#[test]
fn bunny_prompts_equal_the_reference_ids() {
    let dir = tokenizer_dir(None);
    let tok = PromptTokenizer::from_dir(dir.path()).expect("tokenizer");
    for name in ["carrot_image", "carrot_text", "lora_image"] {
        let r = &records()[name];
        let question = r["question"].as_str().expect("question");
        let image = !r["image"].is_null();
        let text = bunny_prompt(
            &[Turn {
                user: question.into(),
                assistant: None,
            }],
            image,
            "<image>",
        );
        assert_eq!(
            text,
            r["prompt"].as_str().expect("prompt"),
            "{name}: template text"
        );
        let got = tok
            .encode_with_images(&text, "<image>", -200, Some(128000))
            .expect("encode");
        assert_eq!(got, ids(&r["input_ids"]), "{name}: prompt ids");
        assert_eq!(
            got.iter().filter(|&&i| i == -200).count(),
            usize::from(image),
            "{name}: sentinels"
        );
    }
}

#[test]
fn chat_template_prompts_equal_apply_chat_template() {
    for (name, model) in [
        ("llama_chat", "llama-base-tiny"),
        ("llama_rslora_chat", "llama-base-tiny"),
    ] {
        let dir = tokenizer_dir(Some(model));
        let tok = PromptTokenizer::from_dir(dir.path()).expect("tokenizer");
        let r = &records()[name];
        let messages: Vec<Message> = r["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| Message {
                role: m["role"].as_str().expect("role").into(),
                content: m["content"].as_str().expect("content").into(),
            })
            .collect();
        let text = tok.render_chat(&messages, true).expect("render");
        assert_eq!(
            text,
            r["prompt"].as_str().expect("prompt"),
            "{name}: rendered template"
        );
        let got: Vec<i64> = tok
            .encode_chat(&messages)
            .expect("encode")
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(
            got,
            ids(&r["input_ids"]),
            "{name}: prompt ids (one BOS, from the template)"
        );
    }
}

#[test]
fn chunked_tokenization_differs_from_whole_string_tokenization() {
    // Why Bunny tokenizes chunks separately: the whole string (with `<image>` as text) gives
    // different ids around the marker, so the sentinel logic is load-bearing.
    let dir = tokenizer_dir(None);
    let tok = PromptTokenizer::from_dir(dir.path()).expect("tokenizer");
    let text = "USER: <image>\nWhat is this?";
    let chunked = tok
        .encode_with_images(text, "<image>", -200, Some(128000))
        .expect("chunked");
    let whole: Vec<i64> = tok
        .encode(text, true)
        .expect("whole")
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(chunked[0], 128000);
    assert_eq!(
        chunked.iter().filter(|&&i| i == 128000).count(),
        1,
        "one BOS: {chunked:?}"
    );
    assert_ne!(chunked, whole);
}

#[test]
fn prompt_starting_with_the_image_keeps_one_bos() {
    let dir = tokenizer_dir(None);
    let tok = PromptTokenizer::from_dir(dir.path()).expect("tokenizer");
    let got = tok
        .encode_with_images("<image>\nhi", "<image>", -200, Some(128000))
        .expect("encode");
    assert_eq!(&got[..2], &[128000, -200], "{got:?}");
    assert_eq!(got.iter().filter(|&&i| i == 128000).count(), 1);
}
