//! The prefill/decode loop: positions, mask and past length bookkeeping around [`Model::step`].

use super::sequence::{Sequence, TokenLogprob, Work};
use super::{
    Decode, Event, FinishReason, GenerateError, Model, Output, Request, Segment, StepInput,
    Timings, prompt_segments,
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
    Ok(generation.into_parts().0)
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
    sequence: Sequence,
    num_image_tokens: usize,
    position_ids: Vec<i64>,
    attention_mask: Vec<i64>,
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
        let num_image_tokens = model.num_image_tokens();
        let cached = reuse.as_ref().map_or(0, |(_, cached)| *cached);
        let sequence = Sequence::new(request, num_image_tokens, cached)?;
        let cache = match reuse {
            None => model.new_cache().map_err(GenerateError::NewCache)?,
            Some((mut cache, _)) => {
                model
                    .truncate_cache(&mut cache, sequence.reused_positions())
                    .map_err(GenerateError::NewCache)?;
                cache
            }
        };
        let prompt_len = sequence.prompt_len();
        Ok(Self {
            model,
            decoder,
            request,
            cache,
            sequence,
            num_image_tokens,
            position_ids: Vec::new(),
            attention_mask: Vec::with_capacity(prompt_len + request.options.max_new_tokens),
        })
    }

    /// Report each generated token's log-probability and its `top` most likely alternatives
    /// (at most [`super::MAX_TOP_LOGPROBS`]), read with [`Generation::last_logprob`] after each
    /// token.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.sequence = self.sequence.with_logprobs(top);
        self
    }

    /// Sample only tokens that `constraint` allows (structured output).
    pub fn with_constraint(mut self, constraint: Box<dyn super::TokenConstraint>) -> Self {
        self.sequence = self.sequence.with_constraint(constraint);
        self
    }

    /// The last generated token's log-probabilities, when asked for with
    /// [`Generation::with_logprobs`].
    pub fn last_logprob(&self) -> Option<&TokenLogprob> {
        self.sequence.last_logprob()
    }

    /// Positions of the prompt, images counted.
    pub fn prompt_len(&self) -> usize {
        self.sequence.prompt_len()
    }

    /// Ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        self.sequence.token_ids()
    }

    /// Text generated so far: the concatenated deltas.
    pub fn text(&self) -> &str {
        self.sequence.text()
    }

    /// Set once the last token has been generated.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.sequence.finish_reason()
    }

    pub fn timings(&self) -> Timings {
        self.sequence.timings()
    }

    /// The next event, or `None` after [`Event::Done`] or an error.
    pub fn next_event(&mut self) -> Result<Option<Event>, GenerateError> {
        let event = self.advance();
        if event.is_err() {
            self.sequence.abort();
        }
        event
    }

    /// The output and the cache, which holds the prompt and every generated token but the last
    /// (never fed back): `prompt_tokens + token_ids.len() - 1` positions.
    pub fn into_parts(self) -> (Output, M::Cache) {
        (self.sequence.output(), self.cache)
    }

    fn advance(&mut self) -> Result<Option<Event>, GenerateError> {
        loop {
            let mut logits = match self.sequence.next_work() {
                None => return Ok(None),
                Some(Work::Finished(event)) => return Ok(Some(event)),
                Some(Work::Prefill(range)) => {
                    let request = self.request;
                    let segments =
                        prompt_segments(&request.prompt, self.num_image_tokens, range.clone());
                    self.step(&segments, range.start, range.end)?
                }
                Some(Work::Decode { token, past_len }) => {
                    self.step(&[Segment::Tokens(&[token])], past_len, past_len + 1)?
                }
            };
            if let Some(event) = self.sequence.record(self.decoder, &mut logits)? {
                return Ok(Some(event));
            }
        }
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
