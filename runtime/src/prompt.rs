//! Prompts: Bunny's conversation template and chunked image tokenization, the checkpoint's
//! own Jinja chat template for plain Llama models, and raw text.
//!
//! Mirrors Bunny's `conversation.py` (`conv_llama`, separator style TWO) and
//! `mm_utils.tokenizer_image_token`, and transformers' `apply_chat_template`.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Bunny's system prompt for the `llama` conversation mode.
pub const BUNNY_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// Bunny's separator after an assistant answer in `llama` mode.
pub const BUNNY_END_OF_ANSWER: &str = "<|end_of_text|>";

#[derive(thiserror::Error, Debug)]
pub enum PromptError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer failed on the prompt: {0}")]
    Encode(String),
    #[error("tokenizer failed to decode ids: {0}")]
    Decode(String),
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "no chat template found in {dir} (looked for chat_template.jinja and tokenizer_config.json `chat_template`); use --raw"
    )]
    NoChatTemplate { dir: PathBuf },
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("the prompt has {found} `{token}` markers but {given} image(s) were given")]
    ImageCount {
        token: String,
        found: usize,
        given: usize,
    },
}

/// One exchange of a conversation; `assistant` is `None` for the turn being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: Option<String>,
}

/// A chat message as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Bunny's `llama` conversation: `{system} USER: {q} ASSISTANT: {a}<|end_of_text|>USER: … ASSISTANT:`.
/// With `image`, the first question is preceded by `<image>\n`.
pub fn bunny_prompt(turns: &[Turn], image: bool, image_token: &str) -> String {
    let mut out = String::from(BUNNY_SYSTEM);
    out.push(' ');
    for (i, turn) in turns.iter().enumerate() {
        out.push_str("USER: ");
        if i == 0 && image {
            out.push_str(image_token);
            out.push('\n');
        }
        out.push_str(&turn.user);
        out.push(' ');
        match &turn.assistant {
            Some(answer) => {
                out.push_str("ASSISTANT: ");
                out.push_str(answer);
                out.push_str(BUNNY_END_OF_ANSWER);
            }
            None => out.push_str("ASSISTANT:"),
        }
    }
    out
}

/// The tokenizer of an exported directory with what prompt assembly needs from its config.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    dir: PathBuf,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl PromptTokenizer {
    /// Load `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let path = dir.join("tokenizer.json");
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| PromptError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| PromptError::Config {
                path: config_path.clone(),
                reason: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.is_file() {
            Some(
                std::fs::read_to_string(&template_file).map_err(|e| PromptError::Config {
                    path: template_file.clone(),
                    reason: e.to_string(),
                })?,
            )
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| named.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        Ok(Self {
            tokenizer,
            dir: dir.to_path_buf(),
            chat_template,
            bos_token: token_string(config.get("bos_token")).unwrap_or_default(),
            eos_token: token_string(config.get("eos_token")).unwrap_or_default(),
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PromptError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| PromptError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| PromptError::Decode(e.to_string()))
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Bunny's `tokenizer_image_token`: split on `image_token`, tokenize each chunk on its own
    /// (each gets the tokenizer's BOS), keep one BOS, drop every chunk's first token when it
    /// is BOS, and put `image_index` between chunks.
    pub fn encode_with_images(
        &self,
        text: &str,
        image_token: &str,
        image_index: i64,
        bos: Option<u32>,
    ) -> Result<Vec<i64>, PromptError> {
        let chunks: Vec<Vec<u32>> = text
            .split(image_token)
            .map(|chunk| self.encode(chunk, true))
            .collect::<Result<_, _>>()?;
        let offset = match (chunks.first().and_then(|c| c.first()), bos) {
            (Some(&first), Some(bos)) if first == bos => 1,
            _ => 0,
        };
        let mut ids = Vec::new();
        if offset == 1 {
            ids.push(i64::from(chunks[0][0]));
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.push(image_index);
            }
            ids.extend(chunk.iter().skip(offset).map(|&t| i64::from(t)));
        }
        Ok(ids)
    }

    /// Render the checkpoint's chat template as `apply_chat_template(…, tokenize=False)` does.
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, PromptError> {
        let template =
            self.chat_template
                .as_deref()
                .ok_or_else(|| PromptError::NoChatTemplate {
                    dir: self.dir.clone(),
                })?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
    }

    /// Ids of a rendered chat: the template writes the special tokens itself, so none are added.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, PromptError> {
        let text = self.render_chat(messages, true)?;
        self.encode(&text, false)
    }
}

/// Render a Hugging Face chat template with transformers' Jinja settings (`trim_blocks`,
/// `lstrip_blocks`, `raise_exception`, `strftime_now`, Python string methods).
pub fn render_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, PromptError> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime_now(&fmt)
    });
    env.add_template("chat", template)
        .map_err(|e| PromptError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| PromptError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| PromptError::Template(e.to_string()))
}

/// `strftime` for the formats chat templates use (`%d %b %Y`, `%Y-%m-%d`), from the system clock (UTC).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mi = (m - 1) as usize;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(MONTHS[mi]),
            Some('B') => out.push_str(FULL[mi]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..12, day 1..31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bunny_single_turn_with_image() {
        let p = bunny_prompt(
            &[Turn {
                user: "What is this?".into(),
                assistant: None,
            }],
            true,
            "<image>",
        );
        assert_eq!(
            p,
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
             detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:"
        );
    }

    #[test]
    fn bunny_multi_turn() {
        let turns = [
            Turn {
                user: "Q1".into(),
                assistant: Some("A1".into()),
            },
            Turn {
                user: "Q2".into(),
                assistant: None,
            },
        ];
        let p = bunny_prompt(&turns, false, "<image>");
        assert!(
            p.ends_with(" USER: Q1 ASSISTANT: A1<|end_of_text|>USER: Q2 ASSISTANT:"),
            "{p}"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_419), (2025, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn template_settings_match_transformers() {
        // Expected output produced by jinja2 with transformers' settings (trim_blocks,
        // lstrip_blocks): indentation before `{{` is kept, before `{%` is stripped.
        let t = "{% for m in messages %}\n  {{ m.role | upper }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}\n";
        let msgs = [Message {
            role: "user".into(),
            content: " hi ".into(),
        }];
        assert_eq!(
            render_template(t, &msgs, true, "", "").expect("render"),
            "  USER: hi\nA:"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let err = render_template(
            "{{ raise_exception('only user/assistant') }}",
            &[],
            false,
            "",
            "",
        )
        .unwrap_err();
        assert!(err.to_string().contains("only user/assistant"), "{err}");
    }
}
