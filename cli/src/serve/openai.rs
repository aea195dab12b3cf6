//! The wire types of OpenAI's chat-completions API, as far as Carrot serves it.
//!
//! Unknown request fields are ignored, as OpenAI-compatible servers usually do, so that clients
//! sending `frequency_penalty`, `user`, `logit_bias` and the like still work.

use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions` body. `model` is not read: the server answers with the model it
/// has loaded, whatever the client names.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Takes precedence over `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; accepted as vLLM and llama.cpp do.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Not in OpenAI's API; accepted as vLLM does.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u64>,
    /// Report each generated token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: the most likely alternatives per token, 0 to 20.
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

/// `choices[].logprobs`: one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Logprobs {
    pub content: Vec<LogprobEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One message; `content` is parsed later so that errors can name the part at fault.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What every response object of one completion shares.
#[derive(Debug, Clone)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    pub fn new(model: &str) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            id: format!("chatcmpl-{:016x}", rand::random::<u64>()),
            created,
            model: model.to_owned(),
        }
    }
}

/// The non-streaming answer (`object: "chat.completion"`).
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

impl Choice {
    pub fn new(
        index: u32,
        content: String,
        logprobs: Option<Logprobs>,
        finish_reason: &'static str,
    ) -> Self {
        Self {
            index,
            message: AssistantMessage {
                role: "assistant",
                content,
            },
            logprobs,
            finish_reason,
        }
    }
}

impl Completion {
    pub fn new(header: &Header, choices: Vec<Choice>, usage: Usage) -> Self {
        Self {
            id: header.id.clone(),
            object: "chat.completion",
            created: header.created,
            model: header.model.clone(),
            choices,
            usage,
        }
    }
}

/// One server-sent event of a streamed answer (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, Serialize)]
pub struct Chunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Chunk {
    fn with(header: &Header, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Self {
        Self {
            id: header.id.clone(),
            object: "chat.completion.chunk",
            created: header.created,
            model: header.model.clone(),
            choices,
            usage,
        }
    }

    fn choice(header: &Header, delta: Delta, finish_reason: Option<&'static str>) -> Self {
        Self::with(
            header,
            vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            None,
        )
    }

    /// The same chunk for choice `index`.
    pub fn at(mut self, index: u32) -> Self {
        for c in &mut self.choices {
            c.index = index;
        }
        self
    }

    /// Text and, when asked for, the log-probabilities of the tokens that produced it.
    pub fn content_with(header: &Header, text: String, logprobs: Option<Logprobs>) -> Self {
        let mut chunk = Self::content(header, text);
        chunk.choices[0].logprobs = logprobs;
        chunk
    }

    /// The first chunk: the assistant role and empty content.
    pub fn role(header: &Header) -> Self {
        Self::choice(
            header,
            Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            None,
        )
    }

    pub fn content(header: &Header, text: String) -> Self {
        Self::choice(
            header,
            Delta {
                role: None,
                content: Some(text),
            },
            None,
        )
    }

    /// The last chunk of the choice: an empty delta and why the answer ended.
    pub fn finish(header: &Header, finish_reason: &'static str) -> Self {
        Self::choice(header, Delta::default(), Some(finish_reason))
    }

    /// Sent after the last choice chunk when `stream_options.include_usage` is set.
    pub fn usage(header: &Header, usage: Usage) -> Self {
        Self::with(header, Vec::new(), Some(usage))
    }
}
