//! Token generation over a decoder with a KV cache, independent of how the decoder runs.
//!
//! The loop splits the runtime state into four roles, as onnxruntime-genai does:
//! - ids: the prompt ([`PromptPart`]) and the generated tokens,
//! - positions and attention mask: owned here, plain `0..N-1` over the merged sequence
//!   (an image counts [`Model::num_image_tokens`] positions), mask all ones of length `past + seq`,
//! - the KV cache: opaque to this module ([`Model::Cache`]), so an implementation can feed its
//!   `present` outputs back as the next `past` without copying them through the host,
//! - logits: the last position's row, turned into a token by [`sampling::Sampler`].
//!
//! A generation is a prefill (the whole prompt in one step, or in chunks of
//! [`GenerateOptions::prefill_chunk`] positions, each on top of the previous chunks' past),
//! then one decode step per new token. The token that ends the generation is never fed back.

mod generator;
pub mod sampling;
mod sequence;
pub mod stream;

#[doc(hidden)]
pub mod fake;

use std::num::NonZeroUsize;
use std::ops::Range;

pub use generator::{Generation, generate};
pub use sampling::{Sampler, SamplingOptions};
pub use sequence::{MAX_TOP_LOGPROBS, Sequence, TokenConstraint, TokenLogprob, Work};
pub use stream::{Decode, TextStream};

/// Error type that model and tokenizer implementations hand back through the traits here.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A decoder-only language model that runs one step at a time on a KV cache it owns.
pub trait Model {
    /// Per-sequence KV state: `past_key_values` in, `present` out, kept as the implementation likes.
    type Cache;
    /// One image as the model consumes it (for example its projected vision features).
    type Image;

    /// Number of positions one image occupies in the merged sequence (729 for SigLIP-so400m/14 at 384).
    fn num_image_tokens(&self) -> usize;

    /// A cache holding no positions yet (`past_sequence = 0`).
    fn new_cache(&mut self) -> Result<Self::Cache, BoxError>;

    /// Runs the decoder on `input.seq_len()` new positions on top of `input.past_len` cached ones,
    /// extends the cache by them, and returns the logits of the last new position (one per vocab id).
    fn step(
        &mut self,
        cache: &mut Self::Cache,
        input: &StepInput<'_, Self::Image>,
    ) -> Result<Vec<f32>, BoxError>;

    /// Keeps only the first `len` positions of `cache` (a conversation that continues from a
    /// common prefix).
    fn truncate_cache(&mut self, cache: &mut Self::Cache, len: usize) -> Result<(), BoxError>;
}

/// The new positions of one decoder step, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Vocabulary ids, embedded by the token embedding table.
    Tokens(&'a [u32]),
    /// Rows `rows` of the features of image `index` of the request (a chunk may cut an image).
    Image { index: usize, rows: Range<usize> },
}

impl Segment<'_> {
    /// Number of positions this segment covers.
    pub fn len(&self) -> usize {
        match self {
            Segment::Tokens(ids) => ids.len(),
            Segment::Image { rows, .. } => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything one decoder step needs besides the cache; batch size 1.
#[derive(Debug)]
pub struct StepInput<'a, I> {
    /// The new positions; their lengths add up to `position_ids.len()`.
    pub segments: &'a [Segment<'a>],
    /// Images of the request, indexed by [`Segment::Image::index`].
    pub images: &'a [I],
    /// `[seq]`: `past_len..past_len + seq`.
    pub position_ids: &'a [i64],
    /// `[past + seq]`, all ones.
    pub attention_mask: &'a [i64],
    /// Positions already in the cache.
    pub past_len: usize,
}

impl<I> StepInput<'_, I> {
    /// Number of new positions in this step.
    pub fn seq_len(&self) -> usize {
        self.position_ids.len()
    }
}

/// One piece of a prompt, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPart {
    /// Vocabulary ids (never the image sentinel).
    Tokens(Vec<u32>),
    /// The image at this index of [`Request::images`].
    Image(usize),
}

/// What to generate from.
#[derive(Debug, Clone)]
pub struct Request<I> {
    pub prompt: Vec<PromptPart>,
    pub images: Vec<I>,
    pub options: GenerateOptions,
}

/// Limits, stop conditions and sampling for one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (the end-of-sequence token included).
    pub max_new_tokens: usize,
    /// Context length: prompt positions plus generated tokens never exceed it.
    pub max_length: usize,
    /// Any of these ends the generation (the manifest's `prompt.eos_token_ids`).
    pub eos_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Prefill at most this many positions per step; `None` prefills the whole prompt at once.
    pub prefill_chunk: Option<NonZeroUsize>,
    pub sampling: SamplingOptions,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wall-clock time of the two phases.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// From the first prefill step to the first token (its sampling and detokenization included).
    pub prefill_ms: f64,
    /// Every later token: decode step, sampling, detokenization.
    pub decode_ms: f64,
    /// Tokens generated.
    pub tokens: usize,
}

/// What a generation reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token and the text it completes (empty while a character is still partial).
    Token {
        id: u32,
        text_delta: String,
        /// This id is one of the end-of-sequence ids and ended the generation.
        is_eos: bool,
    },
    /// Always the last event.
    Done {
        finish_reason: FinishReason,
        timings: Timings,
    },
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Generated ids only; a final end-of-sequence id is included.
    pub token_ids: Vec<u32>,
    /// The concatenated text deltas, equal to decoding `token_ids`.
    pub text: String,
    /// Positions of the prompt, images counted.
    pub prompt_tokens: usize,
    /// Leading prompt positions taken from a cache instead of being prefilled.
    pub reused_positions: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_len} positions, which leaves no room for a new token in a \
         context of max_length {max_length} (prompt + 1 must be at most max_length)"
    )]
    ContextOverflow {
        prompt_len: usize,
        max_length: usize,
    },
    #[error("the prompt refers to image {index}, but the request has {count} image(s)")]
    MissingImage { index: usize, count: usize },
    #[error("sampling option {name} = {value} is invalid: expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the model returned no logits")]
    EmptyLogits,
    #[error("no token can be sampled: no logit is a finite number after filtering")]
    NoCandidates,
    #[error("could not create the KV cache")]
    NewCache(#[source] BoxError),
    #[error("decoder step failed (past {past_len}, {seq_len} new positions)")]
    Step {
        past_len: usize,
        seq_len: usize,
        #[source]
        source: BoxError,
    },
    #[error("structured output: {0}")]
    Constraint(#[source] BoxError),
    #[error("could not decode generated ids to text")]
    Decode(#[source] BoxError),
}

/// Positions `prompt` occupies in the merged sequence.
pub fn prompt_len(prompt: &[PromptPart], num_image_tokens: usize) -> usize {
    prompt
        .iter()
        .map(|part| part_len(part, num_image_tokens))
        .sum()
}

fn part_len(part: &PromptPart, num_image_tokens: usize) -> usize {
    match part {
        PromptPart::Tokens(ids) => ids.len(),
        PromptPart::Image(_) => num_image_tokens,
    }
}

/// The segments of `prompt` that fall in `range` of the merged sequence, in order.
pub fn prompt_segments(
    prompt: &[PromptPart],
    num_image_tokens: usize,
    range: Range<usize>,
) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    let mut start = 0;
    for part in prompt {
        let end = start + part_len(part, num_image_tokens);
        let lo = range.start.max(start);
        let hi = range.end.min(end);
        if lo < hi {
            segments.push(match part {
                PromptPart::Tokens(ids) => Segment::Tokens(&ids[lo - start..hi - start]),
                PromptPart::Image(index) => Segment::Image {
                    index: *index,
                    rows: lo - start..hi - start,
                },
            });
        }
        start = end;
    }
    segments
}
