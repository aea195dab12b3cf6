//! Prompt assembly: arbitrary user text and messages through Bunny's template, the Llama 3 chat
//! template and `<image>` splitting with the Llama 3 tokenizer (`.cache/llama3-tokenizer`, from
//! scripts/setup.sh); and arbitrary chat templates rendered with fixed messages.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use carrot_runtime::prompt::{Message, PromptTokenizer, Turn, bunny_prompt, render_template};
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static PromptTokenizer {
    static TOK: OnceLock<PromptTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/llama3-tokenizer");
        PromptTokenizer::from_dir(&dir).expect("run scripts/setup.sh for .cache/llama3-tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let tok = tokenizer();
    if mode % 2 == 0 {
        // Conversation text: fields separated by NUL.
        let parts: Vec<&str> = text.split('\0').collect();
        let turns: Vec<Turn> = parts
            .chunks(2)
            .map(|c| Turn {
                user: c[0].to_owned(),
                assistant: c.get(1).map(|s| (*s).to_owned()),
            })
            .collect();
        let prompt = bunny_prompt(&turns, mode % 4 == 0, "<image>");
        let bos = tok.token_to_id("<|begin_of_text|>");
        if let Ok(ids) = tok.encode_with_images(&prompt, "<image>", -200, bos) {
            let images = ids.iter().filter(|&&i| i == -200).count();
            assert!(images <= prompt.matches("<image>").count());
        }
        let messages: Vec<Message> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| Message {
                role: ["system", "user", "assistant"][i % 3].to_owned(),
                content: (*p).to_owned(),
            })
            .collect();
        let _ = tok.encode_chat(&messages);
    } else {
        // A chat template from a checkpoint.
        let messages = [
            Message {
                role: "user".into(),
                content: "What is in this picture?".into(),
            },
            Message {
                role: "assistant".into(),
                content: "A cat.".into(),
            },
        ];
        let _ = render_template(&text, &messages, mode % 4 == 1, "<s>", "</s>");
    }
});
