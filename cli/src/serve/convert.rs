//! From an OpenAI chat request to what the pipeline answers: a prompt, images, parameters.
//!
//! Everything that can be checked without the model is checked here, so that a bad request
//! is refused with 400 before it waits for the model.

use super::error::ApiError;
use super::image_url::image_source;
use super::openai::{ChatMessage, ChatRequest};
use carrot_runtime::pipeline::{ImageSource, Params};
use carrot_runtime::prompt::{Message, Turn};

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// How the loaded model builds prompts (the manifest's `prompt.template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// Bunny's fixed conversation template; its system prompt cannot be changed.
    Bunny,
    /// The checkpoint's Jinja chat template, which takes system messages.
    ChatTemplate,
    /// The user texts as they are.
    Raw,
}

impl Template {
    pub fn from_manifest(name: &str) -> Self {
        match name {
            "bunny-llama" => Template::Bunny,
            "chat-template" => Template::ChatTemplate,
            _ => Template::Raw,
        }
    }
}

/// What the request may use of the loaded model and of this machine.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub template: Template,
    pub vision: bool,
    /// `file://` image URLs are read from the local disk (only when serving on loopback).
    pub file_urls: bool,
}

/// The prompt in the form the model's template needs.
#[derive(Debug, Clone, PartialEq)]
pub enum JobPrompt {
    /// For Bunny and raw templates: exchanges, the last one unanswered.
    Turns(Vec<Turn>),
    /// For chat templates: every message, system ones included.
    Messages(Vec<Message>),
}

/// A checked request, ready for the model.
#[derive(Debug, Clone)]
pub struct JobInput {
    pub prompt: JobPrompt,
    pub images: Vec<ImageSource>,
    pub params: Params,
    pub stop: Vec<String>,
    /// `Some(k)`: report each token's log-probability and its `k` best alternatives.
    pub logprobs: Option<usize>,
    /// Choices to generate (they share the prompt's prefill).
    pub n: usize,
    /// Constrain the answer to JSON (`response_format`).
    pub response_format: Option<super::structured::ResponseFormat>,
}

/// A message with its content resolved into text and images.
struct Resolved {
    role: Role,
    text: String,
    images: Vec<ImageSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 16;

pub fn job_input(request: ChatRequest, caps: &Capabilities) -> Result<JobInput, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "invalid_messages",
            "`messages` must hold at least one message",
        ));
    }
    let n = match request.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "invalid_n",
                format!("`n` = {n}: from 1 to {MAX_CHOICES} choices are generated"),
            ));
        }
    };
    let max_new_tokens = match request.max_completion_tokens.or(request.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                "invalid_max_tokens",
                "`max_tokens` must be at least 1",
            ));
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => None,
    };
    let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (_, Some(k)) if k > carrot_runtime::generate::MAX_TOP_LOGPROBS as u64 => {
            return Err(ApiError::invalid(
                "invalid_top_logprobs",
                format!(
                    "`top_logprobs` = {k}: at most {} alternatives are reported",
                    carrot_runtime::generate::MAX_TOP_LOGPROBS
                ),
            ));
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let stop = request.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "invalid_stop",
            format!(
                "`stop` has {} strings; at most {MAX_STOP_STRINGS} are accepted",
                stop.len()
            ),
        ));
    }
    let params = Params {
        max_new_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        repetition_penalty: request.repetition_penalty,
        seed: request.seed.map(|s| s as u64),
        ..Params::default()
    };

    let messages = request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| resolve_message(i, m, caps))
        .collect::<Result<Vec<_>, _>>()?;
    let images: Vec<ImageSource> = messages
        .iter()
        .flat_map(|m| m.images.iter().cloned())
        .collect();
    if !images.is_empty() && !caps.vision {
        return Err(ApiError::invalid(
            "images_not_supported",
            "the loaded model is text-only; it cannot take images",
        ));
    }
    let prompt = match caps.template {
        Template::ChatTemplate => {
            if !images.is_empty() {
                return Err(ApiError::invalid(
                    "images_not_supported",
                    "the loaded model uses a chat template that takes no images",
                ));
            }
            chat_messages(messages)?
        }
        Template::Bunny | Template::Raw => turns(messages, caps.template)?,
    };
    let response_format = match &request.response_format {
        Some(value) => super::structured::parse(value)?,
        None => None,
    };
    Ok(JobInput {
        prompt,
        images,
        params,
        stop,
        logprobs,
        n,
        response_format,
    })
}

fn resolve_message(
    index: usize,
    message: &ChatMessage,
    caps: &Capabilities,
) -> Result<Resolved, ApiError> {
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(ApiError::invalid(
                "invalid_role",
                format!(
                    "messages[{index}]: role `{other}` is not supported; use system, user or assistant"
                ),
            ));
        }
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    match &message.content {
        serde_json::Value::String(s) => texts.push(s.clone()),
        serde_json::Value::Null if role == Role::Assistant => {}
        serde_json::Value::Array(parts) => {
            for (p, part) in parts.iter().enumerate() {
                let at = format!("messages[{index}].content[{p}]");
                match part.get("type").and_then(|t| t.as_str()) {
                    Some("text") => match part.get("text").and_then(|t| t.as_str()) {
                        Some(t) => texts.push(t.to_owned()),
                        None => {
                            return Err(ApiError::invalid(
                                "invalid_content",
                                format!("{at}: a text part needs a string `text`"),
                            ));
                        }
                    },
                    Some("image_url") => {
                        if role != Role::User {
                            return Err(ApiError::invalid(
                                "invalid_content",
                                format!("{at}: images are only accepted in user messages"),
                            ));
                        }
                        let url = part
                            .get("image_url")
                            .and_then(|u| {
                                u.as_str().or_else(|| u.get("url").and_then(|u| u.as_str()))
                            })
                            .ok_or_else(|| {
                                ApiError::invalid(
                                    "invalid_image_url",
                                    format!("{at}: an image_url part needs `image_url.url`"),
                                )
                            })?;
                        images.push(image_source(url, &at, caps.file_urls)?);
                    }
                    Some(other) => {
                        return Err(ApiError::invalid(
                            "invalid_content",
                            format!(
                                "{at}: part type `{other}` is not supported; use `text` or `image_url`"
                            ),
                        ));
                    }
                    None => {
                        return Err(ApiError::invalid(
                            "invalid_content",
                            format!("{at}: a content part needs a `type`"),
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "invalid_content",
                format!("messages[{index}].content must be a string or an array of content parts"),
            ));
        }
    }
    Ok(Resolved {
        role,
        text: texts.join("\n"),
        images,
    })
}

/// Bunny and raw prompts: system messages are dropped (Bunny's system prompt is fixed),
/// consecutive messages of one role are joined, and images may only come with the first
/// user message, where Bunny's template puts them.
fn turns(messages: Vec<Resolved>, template: Template) -> Result<JobPrompt, ApiError> {
    let mut turns: Vec<Turn> = Vec::new();
    let mut last_role = None;
    for message in messages.into_iter().filter(|m| m.role != Role::System) {
        match (message.role, last_role) {
            (Role::Assistant, None) => {
                return Err(ApiError::invalid(
                    "invalid_messages",
                    "the conversation must start with a user message (after any system message)",
                ));
            }
            (Role::User, Some(Role::User)) | (Role::Assistant, Some(Role::Assistant)) => {
                if let Some(turn) = turns.last_mut() {
                    let slot = if message.role == Role::User {
                        &mut turn.user
                    } else {
                        turn.assistant.get_or_insert_default()
                    };
                    append(slot, &message.text);
                }
            }
            (Role::User, _) => turns.push(Turn {
                user: message.text,
                assistant: None,
            }),
            (Role::Assistant, _) => {
                if let Some(turn) = turns.last_mut() {
                    turn.assistant = Some(message.text);
                }
            }
            (Role::System, _) => {}
        }
        if !message.images.is_empty() && (turns.len() > 1 || message.role != Role::User) {
            let what = if template == Template::Bunny {
                "Bunny models take"
            } else {
                "this model takes"
            };
            return Err(ApiError::invalid(
                "invalid_image_position",
                format!("{what} images only in the first user message"),
            ));
        }
        last_role = Some(message.role);
    }
    match last_role {
        Some(Role::User) => Ok(JobPrompt::Turns(turns)),
        Some(_) => Err(ApiError::invalid(
            "invalid_messages",
            "the last message must be a user message",
        )),
        None => Err(ApiError::invalid(
            "invalid_messages",
            "`messages` holds no user message",
        )),
    }
}

fn chat_messages(messages: Vec<Resolved>) -> Result<JobPrompt, ApiError> {
    match messages
        .iter()
        .rev()
        .find(|m| m.role != Role::System)
        .map(|m| m.role)
    {
        Some(Role::User) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_messages",
                "the last message must be a user message",
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "invalid_messages",
                "`messages` holds no user message",
            ));
        }
    }
    Ok(JobPrompt::Messages(
        messages
            .into_iter()
            .map(|m| Message {
                role: m.role.as_str().to_owned(),
                content: m.text,
            })
            .collect(),
    ))
}

fn append(slot: &mut String, text: &str) {
    if !slot.is_empty() && !text.is_empty() {
        slot.push('\n');
    }
    slot.push_str(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(template: Template) -> Capabilities {
        Capabilities {
            template,
            vision: true,
            file_urls: true,
        }
    }

    fn request(json: serde_json::Value) -> ChatRequest {
        serde_json::from_value(json).expect("request")
    }

    const PNG_URL: &str = "data:image/png;base64,iVBORw0KGgo=";

    #[test]
    fn bunny_turns_drop_system_and_join_parts() {
        let input = job_input(
            request(serde_json::json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {"url": PNG_URL}},
                    {"type": "text", "text": "this?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Sure?"}
            ]})),
            &caps(Template::Bunny),
        )
        .expect("valid");
        assert_eq!(
            input.prompt,
            JobPrompt::Turns(vec![
                Turn {
                    user: "What is\nthis?".into(),
                    assistant: Some("A cat.".into())
                },
                Turn {
                    user: "Sure?".into(),
                    assistant: None
                },
            ])
        );
        assert_eq!(input.images.len(), 1);
    }

    #[test]
    fn chat_templates_keep_system_messages() {
        let input = job_input(
            request(serde_json::json!({"messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})),
            &caps(Template::ChatTemplate),
        )
        .expect("valid");
        let JobPrompt::Messages(m) = input.prompt else {
            panic!("messages expected")
        };
        assert_eq!(
            m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
            ["system", "user"]
        );
    }

    #[test]
    fn images_after_the_first_user_message_are_refused() {
        let err = job_input(
            request(serde_json::json!({"messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}]})),
            &caps(Template::Bunny),
        )
        .expect_err("refused");
        assert!(err.message.contains("first user message"), "{err}");
    }

    #[test]
    fn sampling_fields_become_params() {
        let input = job_input(
            request(serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3,
                "stop": "\n"})),
            &caps(Template::Bunny),
        )
        .expect("valid");
        assert_eq!(input.params.max_new_tokens, Some(7));
        assert_eq!(input.params.temperature, Some(0.0));
        assert_eq!(input.params.top_p, Some(0.5));
        assert_eq!(input.params.seed, Some(3));
        assert_eq!(input.stop, ["\n"]);
    }
}
