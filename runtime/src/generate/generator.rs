//! The prefill/decode loop: positions, mask and past length bookkeeping around [`Model::step`].

use std::num::NonZeroUsize;
use std::time::Instant;

use super::{Decode, Sampler, TextStream};
use super::{
    Event, FinishReason, GenerateError, Model, Output, PromptPart, Request, Segment, StepInput,
    Timings, prompt_len, prompt_segments,
};

/// Runs a whole generation, handing each [`Event`] to `on_event` as it happens.
pub fn generate<M: Model, D: Decode + ?Sized>(
    model: &mut M,
    decoder: &D,
    request: &Request<M::Image>,
    mut on_event: impl FnMut(Event),
) -> Result<Output, GenerateError> {
    let mut generation = Generation::new(model, decoder, request)?;
    while let Some(event) = generation.next_event()? {
        on_event(event);
    }
    Ok(generation.into_output())
}

/// A generation in progress, one [`Event`] at a time; also an iterator over them.
///
/// Each call to [`Generation::next_event`] runs at most one prefill (all its chunks) or one
/// decode step. Dropping it stops the generation.
pub struct Generation<'a, M: Model, D: Decode + ?Sized> {
    model: &'a mut M,
    decoder: &'a D,
    request: &'a Request<M::Image>,
    cache: M::Cache,
    sampler: Sampler,
    stream: TextStream,
    num_image_tokens: usize,
    prompt_len: usize,
    /// Most tokens this generation may produce: `max_new_tokens` within the context length.
    limit: usize,
    position_ids: Vec<i64>,
    attention_mask: Vec<i64>,
    state: State,
    finish_reason: Option<FinishReason>,
    timings: Timings,
    /// Prompt positions already in the cache when the generation started.
    reused: usize,
    /// With [`Generation::with_logprobs`]: how many alternatives to report, and the last token's.
    logprobs: Option<(usize, Option<TokenLogprob>)>,
}

/// The log-probability of a generated token under the model's distribution (the raw logits,
/// before repetition penalty, temperature or top-k/top-p), and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// At most this many alternatives per token (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `log_softmax(logits)[id]` for `id` and for the `top` largest logits.
fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, y)| y >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&x| x - lse),
        top: best.into_iter().map(|(i, x)| (i, x - lse)).collect(),
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Prefill,
    Decode { last: u32 },
    Finishing,
    Done,
}

impl<'a, M: Model, D: Decode + ?Sized> Generation<'a, M, D> {
    /// Checks the request and creates the cache; runs nothing yet.
    pub fn new(
        model: &'a mut M,
        decoder: &'a D,
        request: &'a Request<M::Image>,
    ) -> Result<Self, GenerateError> {
        Self::start(model, decoder, request, None)
    }

    /// Like [`Generation::new`], continuing from `cache`, which holds the first `cached`
    /// positions of this request's prompt (a conversation's earlier turns): only the rest of the
    /// prompt is prefilled. At least one position is always prefilled, for its logits.
    pub fn resume(
        model: &'a mut M,
        decoder: &'a D,
        request: &'a Request<M::Image>,
        cache: M::Cache,
        cached: usize,
    ) -> Result<Self, GenerateError> {
        Self::start(model, decoder, request, Some((cache, cached)))
    }

    fn start(
        model: &'a mut M,
        decoder: &'a D,
        request: &'a Request<M::Image>,
        reuse: Option<(M::Cache, usize)>,
    ) -> Result<Self, GenerateError> {
        let options = &request.options;
        let mut sampler = Sampler::new(options.sampling.clone())?;
        let num_image_tokens = model.num_image_tokens();
        for part in &request.prompt {
            match part {
                PromptPart::Image(index) if *index >= request.images.len() => {
                    return Err(GenerateError::MissingImage {
                        index: *index,
                        count: request.images.len(),
                    });
                }
                PromptPart::Image(_) => {}
                PromptPart::Tokens(ids) => sampler.observe(ids),
            }
        }
        let prompt_len = prompt_len(&request.prompt, num_image_tokens);
        if prompt_len == 0 {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt_len >= options.max_length {
            return Err(GenerateError::ContextOverflow {
                prompt_len,
                max_length: options.max_length,
            });
        }
        let limit = options.max_new_tokens.min(options.max_length - prompt_len);
        let (cache, reused) = match reuse {
            None => (model.new_cache().map_err(GenerateError::NewCache)?, 0),
            Some((mut cache, cached)) => {
                let keep = cached.min(prompt_len - 1);
                model
                    .truncate_cache(&mut cache, keep)
                    .map_err(GenerateError::NewCache)?;
                (cache, keep)
            }
        };
        let chunk = options
            .prefill_chunk
            .map_or(prompt_len, NonZeroUsize::get)
            .min(prompt_len);
        Ok(Self {
            model,
            decoder,
            request,
            cache,
            sampler,
            stream: TextStream::new(),
            num_image_tokens,
            prompt_len,
            limit,
            position_ids: Vec::with_capacity(chunk),
            attention_mask: Vec::with_capacity(prompt_len + limit),
            state: State::Prefill,
            finish_reason: None,
            timings: Timings::default(),
            reused,
            logprobs: None,
        })
    }

    /// Report each generated token's log-probability and its `top` most likely alternatives
    /// (at most [`MAX_TOP_LOGPROBS`]), read with [`Generation::last_logprob`] after each token.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some((top.min(MAX_TOP_LOGPROBS), None));
        self
    }

    /// The last generated token's log-probabilities, when asked for with
    /// [`Generation::with_logprobs`].
    pub fn last_logprob(&self) -> Option<&TokenLogprob> {
        self.logprobs.as_ref().and_then(|(_, last)| last.as_ref())
    }

    /// Positions of the prompt, images counted.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        self.stream.ids()
    }

    /// Text generated so far: the concatenated deltas.
    pub fn text(&self) -> &str {
        self.stream.text()
    }

    /// Set once the last token has been generated.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The next event, or `None` after [`Event::Done`] or an error.
    pub fn next_event(&mut self) -> Result<Option<Event>, GenerateError> {
        let event = self.advance();
        if event.is_err() {
            self.state = State::Done;
        }
        event
    }

    /// The output and the cache, which holds the prompt and every generated token but the last
    /// (never fed back): `prompt_tokens + token_ids.len() - 1` positions.
    pub fn into_parts(self) -> (Output, M::Cache) {
        let output = Output {
            token_ids: self.stream.ids().to_vec(),
            text: self.stream.text().to_owned(),
            prompt_tokens: self.prompt_len,
            reused_positions: self.reused,
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
            timings: self.timings,
        };
        (output, self.cache)
    }

    fn into_output(self) -> Output {
        self.into_parts().0
    }

    fn advance(&mut self) -> Result<Option<Event>, GenerateError> {
        let started = Instant::now();
        let mut logits = match self.state {
            State::Done => return Ok(None),
            State::Finishing => {
                self.state = State::Done;
                return Ok(Some(Event::Done {
                    finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
                    timings: self.timings,
                }));
            }
            State::Prefill if self.limit == 0 => {
                self.finish_reason = Some(FinishReason::Length);
                self.state = State::Finishing;
                return self.advance();
            }
            State::Prefill => self.prefill()?,
            State::Decode { last } => self.decode(last)?,
        };
        let raw = self.logprobs.as_ref().map(|_| logits.to_vec());
        let id = self.sampler.sample(&mut logits)?;
        self.sampler.observe(&[id]);
        if let (Some((top, last)), Some(raw)) = (self.logprobs.as_mut(), raw) {
            *last = Some(token_logprob(&raw, id, *top));
        }

        let options = &self.request.options;
        let is_eos = !options.ignore_eos && options.eos_token_ids.contains(&id);
        let generated = self.stream.ids().len() + 1;
        self.finish_reason = if is_eos {
            Some(FinishReason::Stop)
        } else if generated >= self.limit {
            Some(FinishReason::Length)
        } else {
            None
        };
        let text_delta = match self.finish_reason {
            Some(_) => self.stream.finish(self.decoder, id),
            None => self.stream.push(self.decoder, id),
        }
        .map_err(GenerateError::Decode)?;
        self.state = match self.finish_reason {
            Some(_) => State::Finishing,
            None => State::Decode { last: id },
        };

        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        if generated == 1 {
            self.timings.prefill_ms += elapsed_ms;
        } else {
            self.timings.decode_ms += elapsed_ms;
        }
        self.timings.tokens = generated;
        Ok(Some(Event::Token {
            id,
            text_delta,
            is_eos,
        }))
    }

    /// Runs the prompt through the model, in chunks if asked; returns the last position's logits.
    fn prefill(&mut self) -> Result<Vec<f32>, GenerateError> {
        let request = self.request;
        let chunk = request
            .options
            .prefill_chunk
            .map_or(self.prompt_len, NonZeroUsize::get);
        let mut start = self.reused;
        loop {
            let end = start.saturating_add(chunk).min(self.prompt_len);
            let segments = prompt_segments(&request.prompt, self.num_image_tokens, start..end);
            let logits = self.step(&segments, start, end)?;
            if end == self.prompt_len {
                return Ok(logits);
            }
            start = end;
        }
    }

    /// Feeds back the last generated token at the next position.
    fn decode(&mut self, last: u32) -> Result<Vec<f32>, GenerateError> {
        let past_len = self.prompt_len + self.stream.ids().len() - 1;
        let ids = [last];
        self.step(&[Segment::Tokens(&ids)], past_len, past_len + 1)
    }

    /// One model step over positions `past_len..end`.
    fn step(
        &mut self,
        segments: &[Segment<'_>],
        past_len: usize,
        end: usize,
    ) -> Result<Vec<f32>, GenerateError> {
        self.position_ids.clear();
        self.position_ids.extend((past_len..end).map(|p| p as i64));
        self.attention_mask.resize(end, 1);
        let input = StepInput {
            segments,
            images: &self.request.images,
            position_ids: &self.position_ids,
            attention_mask: &self.attention_mask,
            past_len,
        };
        self.model
            .step(&mut self.cache, &input)
            .map_err(|source| GenerateError::Step {
                past_len,
                seq_len: end - past_len,
                source,
            })
    }
}

impl<M: Model, D: Decode + ?Sized> Iterator for Generation<'_, M, D> {
    type Item = Result<Event, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_are_log_softmax_with_the_best_alternatives_first() {
        let logits = [1.0f32, 2.0, 3.0, 0.0, 3.0];
        let lse = logits.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln() as f32;
        let t = token_logprob(&logits, 1, 3);
        assert_eq!(t.id, 1);
        assert!((t.logprob - (2.0 - lse)).abs() < 1e-6);
        // Ties keep the lower id first.
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![2, 4, 1]);
        assert!((t.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(token_logprob(&logits, i as u32, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 9).top.len(), logits.len());
    }
}
