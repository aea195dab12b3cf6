//! One generation's state apart from the model that runs it: which positions the next step
//! must run, and what the logits it returns become (a sampled token, its text, whether it ends
//! the generation). [`super::Generation`] drives one sequence over a [`super::Model`]; a server
//! drives many over one batched cache.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::time::Instant;

use super::{
    Decode, Event, FinishReason, GenerateError, Output, PromptPart, Request, Sampler, TextStream,
    Timings, prompt_len,
};

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
pub(crate) fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
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

/// Restricts which tokens may come next, for structured output (a grammar or JSON schema).
pub trait TokenConstraint {
    /// Set the logits of every token that may not come next to negative infinity.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), super::BoxError>;
    /// `id` was generated.
    fn commit(&mut self, id: u32) -> Result<(), super::BoxError>;
}

/// What a sequence needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Run the prompt positions `range` on top of the `range.start` already cached.
    Prefill(Range<usize>),
    /// Feed `token` back at position `past_len`.
    Decode { token: u32, past_len: usize },
    /// No model step: the generation is over and this is its last event ([`Event::Done`]).
    Finished(Event),
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// The first `done` positions of the prompt are in the cache.
    Prefill {
        done: usize,
    },
    Decode {
        last: u32,
    },
    Finishing,
    Done,
}

/// A generation's bookkeeping: prompt progress, sampler, text stream, stop conditions and
/// timings. Ask [`Sequence::next_work`] what to run, run it, and hand the logits it returned to
/// [`Sequence::record`].
pub struct Sequence {
    sampler: Sampler,
    stream: TextStream,
    prompt_len: usize,
    /// Most tokens this generation may produce: `max_new_tokens` within the context length.
    limit: usize,
    chunk: usize,
    eos_token_ids: Vec<u32>,
    ignore_eos: bool,
    state: State,
    finish_reason: Option<FinishReason>,
    timings: Timings,
    /// Prompt positions already in the cache when the generation started.
    reused: usize,
    /// When the work towards the next token began.
    started: Option<Instant>,
    /// With [`Sequence::with_logprobs`]: how many alternatives to report, and the last token's.
    logprobs: Option<(usize, Option<TokenLogprob>)>,
    constraint: Option<Box<dyn TokenConstraint>>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("prompt_len", &self.prompt_len)
            .field("state", &self.state)
            .field("generated", &self.stream.ids().len())
            .field("constrained", &self.constraint.is_some())
            .finish_non_exhaustive()
    }
}

impl Sequence {
    /// Checks `request` for a model whose images take `num_image_tokens` positions. `cached`
    /// leading prompt positions are already in the cache (a conversation's earlier turns); the
    /// sequence keeps at most all but the last, whose logits it needs: truncate the cache to
    /// [`Sequence::reused_positions`].
    pub fn new<I>(
        request: &Request<I>,
        num_image_tokens: usize,
        cached: usize,
    ) -> Result<Self, GenerateError> {
        let options = &request.options;
        let mut sampler = Sampler::new(options.sampling.clone())?;
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
        let reused = cached.min(prompt_len - 1);
        Ok(Self {
            sampler,
            stream: TextStream::new(),
            prompt_len,
            limit: options.max_new_tokens.min(options.max_length - prompt_len),
            chunk: options.prefill_chunk.map_or(prompt_len, NonZeroUsize::get),
            eos_token_ids: options.eos_token_ids.clone(),
            ignore_eos: options.ignore_eos,
            state: State::Prefill { done: reused },
            finish_reason: None,
            timings: Timings::default(),
            reused,
            started: None,
            logprobs: None,
            constraint: None,
        })
    }

    /// Report each generated token's log-probability and its `top` most likely alternatives
    /// (at most [`MAX_TOP_LOGPROBS`]), read with [`Sequence::last_logprob`] after each token.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some((top.min(MAX_TOP_LOGPROBS), None));
        self
    }

    /// Sample only tokens that `constraint` allows (log-probabilities still describe the
    /// model's own distribution).
    pub fn with_constraint(mut self, constraint: Box<dyn TokenConstraint>) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// The last generated token's log-probabilities, when asked for.
    pub fn last_logprob(&self) -> Option<&TokenLogprob> {
        self.logprobs.as_ref().and_then(|(_, last)| last.as_ref())
    }

    /// Positions of the prompt, images counted.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Leading prompt positions taken from the cache instead of being prefilled.
    pub fn reused_positions(&self) -> usize {
        self.reused
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

    /// Whether the prompt is still being prefilled.
    pub fn prefilling(&self) -> bool {
        matches!(self.state, State::Prefill { .. }) && self.limit > 0
    }

    /// What to run next, or `None` once the generation is over.
    pub fn next_work(&mut self) -> Option<Work> {
        match self.state {
            State::Done => None,
            State::Prefill { .. } if self.limit == 0 => {
                self.finish_reason = Some(FinishReason::Length);
                self.state = State::Finishing;
                self.next_work()
            }
            State::Finishing => {
                self.state = State::Done;
                Some(Work::Finished(Event::Done {
                    finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
                    timings: self.timings,
                }))
            }
            State::Prefill { done } => {
                self.started.get_or_insert_with(Instant::now);
                Some(Work::Prefill(done..self.chunk_end(done)))
            }
            State::Decode { last } => {
                self.started.get_or_insert_with(Instant::now);
                Some(Work::Decode {
                    token: last,
                    past_len: self.prompt_len + self.stream.ids().len() - 1,
                })
            }
        }
    }

    fn chunk_end(&self, done: usize) -> usize {
        done.saturating_add(self.chunk).min(self.prompt_len)
    }

    /// Takes the logits of the step [`Sequence::next_work`] asked for: `None` after a prefill
    /// chunk that is not the prompt's last, else the token they give.
    pub fn record<D: Decode + ?Sized>(
        &mut self,
        decoder: &D,
        logits: &mut [f32],
    ) -> Result<Option<Event>, GenerateError> {
        if let State::Prefill { done } = self.state {
            let end = self.chunk_end(done);
            if end < self.prompt_len {
                self.state = State::Prefill { done: end };
                return Ok(None);
            }
        }
        let raw = self.logprobs.as_ref().map(|_| logits.to_vec());
        if let Some(constraint) = self.constraint.as_mut() {
            constraint.mask(logits).map_err(GenerateError::Constraint)?;
        }
        let id = self.sampler.sample(logits)?;
        self.sampler.observe(&[id]);
        if let Some(constraint) = self.constraint.as_mut() {
            constraint.commit(id).map_err(GenerateError::Constraint)?;
        }
        if let (Some((top, last)), Some(raw)) = (self.logprobs.as_mut(), raw) {
            *last = Some(token_logprob(&raw, id, *top));
        }

        let is_eos = !self.ignore_eos && self.eos_token_ids.contains(&id);
        let generated = self.stream.ids().len() + 1;
        self.finish_reason = if is_eos {
            Some(FinishReason::Stop)
        } else if generated >= self.limit {
            Some(FinishReason::Length)
        } else {
            None
        };
        let text_delta = match self.finish_reason {
            Some(_) => self.stream.finish(decoder, id),
            None => self.stream.push(decoder, id),
        }
        .map_err(GenerateError::Decode)?;
        self.state = match self.finish_reason {
            Some(_) => State::Finishing,
            None => State::Decode { last: id },
        };

        let elapsed_ms = self
            .started
            .take()
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
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

    /// Ends the sequence (after an error): nothing more is asked for.
    pub fn abort(&mut self) {
        self.state = State::Done;
    }

    /// What was generated. The cache then holds the prompt and every generated token but the
    /// last (never fed back): `prompt_tokens + token_ids.len() - 1` positions.
    pub fn output(&self) -> Output {
        Output {
            token_ids: self.stream.ids().to_vec(),
            text: self.stream.text().to_owned(),
            prompt_tokens: self.prompt_len,
            reused_positions: self.reused,
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
            timings: self.timings,
        }
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
