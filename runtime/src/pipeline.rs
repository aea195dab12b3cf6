//! The library entry point: an exported directory loaded with its tokenizer and image
//! preprocessing, answering prompts (with images) as a stream of events.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::engine::{Engine, EngineError, ImageFeatures, KvCache, LoadOptions};
use crate::generate::{
    self, BoxError, Decode, Event, GenerateError, GenerateOptions, Output, PromptPart, Request,
    SamplingOptions,
};
use crate::preprocess::{self, PreprocessConfig, PreprocessError};
use crate::prompt::{self, Message, PromptError, PromptTokenizer, Turn};

#[derive(thiserror::Error, Debug)]
pub enum PipelineError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("{0}")]
    Request(String),
}

/// Where an image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    /// Encoded bytes (JPEG, PNG, WebP); `what` names the source in errors.
    Bytes {
        data: Vec<u8>,
        what: String,
    },
}

/// What to answer.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// One question. Without `raw` it goes through the model's template (Bunny's for Carrot
    /// models, the checkpoint's chat template for plain Llama); with `raw` the text is tokenized
    /// as it is.
    Text { text: String, raw: bool },
    /// A conversation; the last turn has no answer yet. Images belong to the first turn.
    Conversation(Vec<Turn>),
}

/// Generation parameters; `None` takes the manifest's `sampling_defaults`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub prefill_chunk: Option<NonZeroUsize>,
}

/// A finished answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub output: Output,
    /// The prompt ids with the image sentinel where images go.
    pub prompt_ids: Vec<i64>,
    pub vision_ms: f64,
}

/// An exported model ready to answer.
pub struct Pipeline {
    pub engine: Engine,
    pub tokenizer: PromptTokenizer,
    preprocess: Option<PreprocessConfig>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Decode for PromptTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, BoxError> {
        Ok(PromptTokenizer::decode(self, ids)?)
    }
}

/// Turn prompt ids with sentinels into prompt parts, numbering images in order.
pub fn split_prompt(ids: &[i64], image_index: i64) -> Result<Vec<PromptPart>, PipelineError> {
    let mut parts = Vec::new();
    let mut tokens = Vec::new();
    let mut images = 0;
    for &id in ids {
        if id == image_index {
            if !tokens.is_empty() {
                parts.push(PromptPart::Tokens(std::mem::take(&mut tokens)));
            }
            parts.push(PromptPart::Image(images));
            images += 1;
        } else {
            let id = u32::try_from(id).map_err(|_| {
                PipelineError::Request(format!("prompt id {id} is not a vocabulary id"))
            })?;
            tokens.push(id);
        }
    }
    if !tokens.is_empty() {
        parts.push(PromptPart::Tokens(tokens));
    }
    Ok(parts)
}

impl Pipeline {
    /// Load `dir` (an exported directory with its tokenizer).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, PipelineError> {
        let engine = Engine::load(dir, opts)?;
        let tokenizer = PromptTokenizer::from_dir(dir)?;
        let preprocess = engine.manifest.vision.as_ref().map(|v| PreprocessConfig {
            image_size: v.image_size,
            pad: v.image_aspect_ratio == "pad",
            pad_color: v.pad_color,
            rescale: v.rescale as f32,
            mean: v.mean.map(|m| m as f32),
            std: v.std.map(|s| s as f32),
            max_pixels: PreprocessConfig::siglip(v.image_size).max_pixels,
        });
        Ok(Self {
            engine,
            tokenizer,
            preprocess,
        })
    }

    /// Prompt ids (image sentinels included) for `prompt` with `images` images.
    pub fn prompt_ids(&self, prompt: &Prompt, images: usize) -> Result<Vec<i64>, PipelineError> {
        let m = &self.engine.manifest;
        let token = m.prompt.image_token.as_str();
        let sentinel = m.prompt.image_token_index;
        let bos = m.prompt.bos_token_id;
        if images > 0 && !self.engine.has_vision() {
            return Err(PipelineError::Request(format!(
                "{} is a text-only model; it cannot take images",
                self.engine.dir.display()
            )));
        }
        let ids = match (prompt, m.prompt.template.as_str()) {
            (Prompt::Text { text, raw: true }, _) => {
                if self.engine.has_vision() {
                    self.tokenizer
                        .encode_with_images(text, token, sentinel, bos)?
                } else {
                    self.tokenizer
                        .encode(text, true)?
                        .into_iter()
                        .map(i64::from)
                        .collect()
                }
            }
            (Prompt::Text { text, raw: false }, _) => {
                let turn = Turn {
                    user: text.clone(),
                    assistant: None,
                };
                return self.prompt_ids(&Prompt::Conversation(vec![turn]), images);
            }
            (Prompt::Conversation(turns), "bunny-llama") => {
                let has_marker = turns.iter().any(|t| t.user.contains(token));
                let text = prompt::bunny_prompt(turns, images > 0 && !has_marker, token);
                self.tokenizer
                    .encode_with_images(&text, token, sentinel, bos)?
            }
            (Prompt::Conversation(turns), "chat-template") => {
                let mut messages = Vec::new();
                for t in turns {
                    messages.push(Message {
                        role: "user".into(),
                        content: t.user.clone(),
                    });
                    if let Some(a) = &t.assistant {
                        messages.push(Message {
                            role: "assistant".into(),
                            content: a.clone(),
                        });
                    }
                }
                self.tokenizer
                    .encode_chat(&messages)?
                    .into_iter()
                    .map(i64::from)
                    .collect()
            }
            (Prompt::Conversation(turns), _) => {
                let text = turns
                    .iter()
                    .map(|t| t.user.as_str())
                    .collect::<Vec<_>>()
                    .join("\n");
                self.tokenizer
                    .encode(&text, true)?
                    .into_iter()
                    .map(i64::from)
                    .collect()
            }
        };
        let found = ids.iter().filter(|&&i| i == sentinel).count();
        if found != images {
            return Err(PromptError::ImageCount {
                token: token.into(),
                found,
                given: images,
            }
            .into());
        }
        Ok(ids)
    }

    /// Decode and preprocess images into `[3, S, S]` pixel values.
    pub fn pixel_values(&self, images: &[ImageSource]) -> Result<Vec<Vec<f32>>, PipelineError> {
        let Some(cfg) = &self.preprocess else {
            return if images.is_empty() {
                Ok(Vec::new())
            } else {
                Err(EngineError::NoVision.into())
            };
        };
        images
            .iter()
            .map(|src| {
                let img = match src {
                    ImageSource::Path(p) => preprocess::load_image(p, cfg.max_pixels)?,
                    ImageSource::Bytes { data, what } => {
                        preprocess::decode_image(data, what, cfg.max_pixels)?
                    }
                };
                Ok(preprocess::preprocess(&img, cfg)?)
            })
            .collect()
    }

    /// Generation options from the manifest defaults and `params`.
    pub fn options(&self, params: &Params) -> GenerateOptions {
        let m = &self.engine.manifest;
        let d = &m.sampling_defaults;
        GenerateOptions {
            max_new_tokens: params.max_new_tokens.unwrap_or(d.max_new_tokens),
            max_length: m.prompt.max_length,
            eos_token_ids: m.prompt.eos_token_ids.clone(),
            ignore_eos: params.ignore_eos,
            prefill_chunk: params.prefill_chunk,
            sampling: SamplingOptions {
                temperature: params.temperature.unwrap_or(d.temperature),
                top_k: params.top_k.or(d.top_k).unwrap_or(0),
                top_p: params.top_p.unwrap_or(d.top_p),
                repetition_penalty: params.repetition_penalty.unwrap_or(1.0),
                seed: params.seed.unwrap_or_else(random_seed),
            },
        }
    }

    /// Answer `prompt` about `images`, reporting every event to `on_event`.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        images: &[ImageSource],
        params: &Params,
        on_event: impl FnMut(Event),
    ) -> Result<Answer, PipelineError> {
        let prompt_ids = self.prompt_ids(prompt, images.len())?;
        let pixels = self.pixel_values(images)?;
        self.generate_ids(&prompt_ids, &pixels, params, on_event)
    }

    /// Answer from prompt ids (with sentinels) and preprocessed pixel values.
    pub fn generate_ids(
        &mut self,
        prompt_ids: &[i64],
        pixel_values: &[Vec<f32>],
        params: &Params,
        on_event: impl FnMut(Event),
    ) -> Result<Answer, PipelineError> {
        let sentinel = self.engine.manifest.prompt.image_token_index;
        let parts = split_prompt(prompt_ids, sentinel)?;
        let start = Instant::now();
        let features: Vec<ImageFeatures> = if pixel_values.is_empty() {
            Vec::new()
        } else {
            self.engine.encode_images(pixel_values)?
        };
        let vision_ms = if pixel_values.is_empty() {
            0.0
        } else {
            start.elapsed().as_secs_f64() * 1e3
        };
        let request = Request {
            prompt: parts,
            images: features,
            options: self.options(params),
        };
        let output = generate::generate(&mut self.engine, &self.tokenizer, &request, on_event)?;
        Ok(Answer {
            output,
            prompt_ids: prompt_ids.to_vec(),
            vision_ms,
        })
    }
}

/// A conversation whose images are encoded once and whose KV cache carries over between turns:
/// each turn prefills only what follows the longest prefix its prompt shares with the positions
/// already cached (the earlier turns and answers, as the chat template renders them).
#[derive(Debug, Default)]
pub struct Conversation {
    cache: Option<KvCache>,
    /// Ids (image sentinels included) whose positions are in `cache`.
    cached_ids: Vec<i64>,
    images: Vec<ImageFeatures>,
    /// Time spent encoding the images, once.
    pub vision_ms: f64,
}

impl Pipeline {
    /// Start a conversation about `images` (encoded now, once).
    pub fn conversation(&mut self, images: &[ImageSource]) -> Result<Conversation, PipelineError> {
        let pixels = self.pixel_values(images)?;
        let start = Instant::now();
        let images = if pixels.is_empty() {
            Vec::new()
        } else {
            self.engine.encode_images(&pixels)?
        };
        Ok(Conversation {
            vision_ms: if pixels.is_empty() {
                0.0
            } else {
                start.elapsed().as_secs_f64() * 1e3
            },
            images,
            ..Conversation::default()
        })
    }

    /// Answer the conversation's next turn; `prompt_ids` is the whole conversation so far as the
    /// template renders it (sentinels included). `Answer.output.reused_positions` says how much of
    /// it came from the cache.
    pub fn continue_conversation(
        &mut self,
        conversation: &mut Conversation,
        prompt_ids: &[i64],
        params: &Params,
        mut on_event: impl FnMut(Event),
    ) -> Result<Answer, PipelineError> {
        let sentinel = self.engine.manifest.prompt.image_token_index;
        let prompt = split_prompt(prompt_ids, sentinel)?;
        let cached = self.shared_positions(&conversation.cached_ids, prompt_ids)?;
        // The request borrows the conversation's image features for this turn and gives them back
        // whatever happens, so they are encoded and copied once per conversation.
        let options = self.options(params);
        let mut request = Request {
            prompt,
            images: std::mem::take(&mut conversation.images),
            options,
        };
        let cache = conversation.cache.take();
        conversation.cached_ids.clear();
        let result = self.run_turn(&request, cache, cached, &mut on_event);
        conversation.images = std::mem::take(&mut request.images);
        let (output, cache) = result?;
        conversation.cache = Some(cache);
        conversation.cached_ids = prompt_ids.to_vec();
        let fed = output.token_ids.len().saturating_sub(1);
        conversation
            .cached_ids
            .extend(output.token_ids[..fed].iter().map(|&id| i64::from(id)));
        Ok(Answer {
            output,
            prompt_ids: prompt_ids.to_vec(),
            vision_ms: 0.0,
        })
    }
}

impl Pipeline {
    /// How many positions of `prompt_ids` a KV cache that holds `cached_ids` (sentinels included,
    /// with the same images) already holds: those of their common prefix, images expanded.
    pub fn shared_positions(
        &self,
        cached_ids: &[i64],
        prompt_ids: &[i64],
    ) -> Result<usize, PipelineError> {
        let common = cached_ids
            .iter()
            .zip(prompt_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let sentinel = self.engine.manifest.prompt.image_token_index;
        Ok(generate::prompt_len(
            &split_prompt(&prompt_ids[..common], sentinel)?,
            crate::generate::Model::num_image_tokens(&self.engine),
        ))
    }

    /// One conversation turn: from `cache` (holding the first `cached` positions) when there is
    /// one, else from scratch; returns the output and the cache it leaves.
    fn run_turn(
        &mut self,
        request: &Request<ImageFeatures>,
        cache: Option<KvCache>,
        cached: usize,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(Output, KvCache), PipelineError> {
        let mut generation = match cache {
            Some(cache) => generate::Generation::resume(
                &mut self.engine,
                &self.tokenizer,
                request,
                cache,
                cached,
            )?,
            None => generate::Generation::new(&mut self.engine, &self.tokenizer, request)?,
        };
        while let Some(event) = generation.next_event()? {
            on_event(event);
        }
        Ok(generation.into_parts())
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_prompt_numbers_images_in_order() {
        let parts = split_prompt(&[1, 2, -200, 3, -200], -200).expect("split");
        assert_eq!(
            parts,
            vec![
                PromptPart::Tokens(vec![1, 2]),
                PromptPart::Image(0),
                PromptPart::Tokens(vec![3]),
                PromptPart::Image(1)
            ]
        );
    }

    #[test]
    fn negative_ids_other_than_the_sentinel_are_refused() {
        let err = split_prompt(&[1, -5], -200).unwrap_err().to_string();
        assert!(err.contains("-5"), "{err}");
    }
}
