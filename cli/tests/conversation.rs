//! `carrot chat`'s conversation: the image is encoded once and each turn prefills only what
//! follows the prefix already in the KV cache, yet every turn's greedy answer equals generating
//! from the whole conversation afresh — with a concatenating cache (portable flavor, truncated
//! by copying) and a shared one (`ort` flavor, truncated in place).

use std::path::{Path, PathBuf};

use carrot_export::pipeline::WeightFormat;
use carrot_graphs::config::DType;
use carrot_graphs::llama::Logits;
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::{ImageSource, Params, Pipeline, Prompt};
use carrot_runtime::prompt::Turn;
use carrot_tests::workspace_root as root;

fn export_fixture(name: &str, flavor: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-{flavor}"));
    let fp32 = WeightFormat::Float(DType::F32);
    carrot::demo::export_fixture_as(name, &out, fp32, flavor, Logits::Last, false)
        .unwrap_or_else(|e| panic!("exporting {name} ({flavor}): {e:#}"));
    out
}

fn three_turns(model: &Path, images: &[ImageSource]) {
    let load = || Pipeline::load(model, &LoadOptions::default()).expect("loading the export");
    let (mut chat, mut fresh) = (load(), load());
    let params = Params {
        max_new_tokens: Some(8),
        temperature: Some(0.0),
        ..Params::default()
    };
    let mut conversation = chat.conversation(images).expect("conversation");
    let pixels = fresh.pixel_values(images).expect("pixels");
    let mut turns: Vec<Turn> = Vec::new();
    let mut previous_prompt = 0;
    for (i, question) in ["Hello there.", "What did I just say?", "Tell me more."]
        .into_iter()
        .enumerate()
    {
        turns.push(Turn {
            user: question.into(),
            assistant: None,
        });
        let ids = chat
            .prompt_ids(&Prompt::Conversation(turns.clone()), images.len())
            .expect("prompt ids");
        let a = chat
            .continue_conversation(&mut conversation, &ids, &params, |_| {})
            .expect("conversation turn");
        let b = fresh
            .generate_ids(&ids, &pixels, &params, |_| {})
            .expect("fresh generation");
        let (a, b) = (a.output, b.output);
        eprintln!(
            "{} turn {}: {} prompt positions, {} from the cache; prefill {:.1} ms against {:.1} ms afresh",
            model.display(),
            i + 1,
            a.prompt_tokens,
            a.reused_positions,
            a.timings.prefill_ms,
            b.timings.prefill_ms
        );
        assert_eq!(a.token_ids, b.token_ids, "turn {}: cached vs fresh", i + 1);
        assert_eq!(a.prompt_tokens, b.prompt_tokens);
        if i == 0 {
            assert_eq!(a.reused_positions, 0);
        } else {
            assert!(
                a.reused_positions >= previous_prompt,
                "turn {}: {} positions reused, the previous prompt had {previous_prompt}",
                i + 1,
                a.reused_positions
            );
            assert!(a.reused_positions < a.prompt_tokens);
        }
        previous_prompt = a.prompt_tokens;
        if let Some(last) = turns.last_mut() {
            last.assistant = Some(a.text.trim().to_string());
        }
    }
}

#[test]
fn chat_template_conversation_reuses_its_cache_in_both_flavors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for flavor in ["portable", "ort"] {
        three_turns(&export_fixture("llama-base-tiny", flavor, tmp.path()), &[]);
    }
}

#[test]
fn image_conversation_encodes_once_and_reuses_its_cache_in_both_flavors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = [ImageSource::Path(
        root().join("fixtures/images/chelsea.png"),
    )];
    for flavor in ["portable", "ort"] {
        three_turns(&export_fixture("carrot-tiny", flavor, tmp.path()), &images);
    }
}
