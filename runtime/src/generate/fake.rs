//! A [`Model`] for tests: records every step's inputs, checks them against the cache it keeps,
//! and returns logits from a closure.

use std::ops::Range;

use super::{BoxError, Model, Segment, StepInput};

/// The inputs of one [`Model::step`] call, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub segments: Vec<RecordedSegment>,
    pub position_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub past_len: usize,
}

impl StepRecord {
    pub fn seq_len(&self) -> usize {
        self.position_ids.len()
    }

    /// Positions in the cache after this step.
    pub fn end(&self) -> usize {
        self.past_len + self.seq_len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedSegment {
    Tokens(Vec<u32>),
    Image { index: usize, rows: Range<usize> },
}

impl From<&Segment<'_>> for RecordedSegment {
    fn from(segment: &Segment<'_>) -> Self {
        match segment {
            Segment::Tokens(ids) => RecordedSegment::Tokens(ids.to_vec()),
            Segment::Image { index, rows } => RecordedSegment::Image {
                index: *index,
                rows: rows.clone(),
            },
        }
    }
}

/// The fake's KV cache: only its length.
#[derive(Debug, Default)]
pub struct FakeCache {
    pub len: usize,
}

type LogitsFn = Box<dyn FnMut(&StepRecord) -> Vec<f32>>;

pub struct FakeModel {
    vocab_size: usize,
    num_image_tokens: usize,
    logits: LogitsFn,
    /// Every step so far, in order.
    pub steps: Vec<StepRecord>,
    pub caches_created: usize,
}

impl std::fmt::Debug for FakeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeModel")
            .field("vocab_size", &self.vocab_size)
            .field("num_image_tokens", &self.num_image_tokens)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl FakeModel {
    /// A model whose logits for each step are `logits(step)`.
    pub fn new(
        vocab_size: usize,
        num_image_tokens: usize,
        logits: impl FnMut(&StepRecord) -> Vec<f32> + 'static,
    ) -> Self {
        Self {
            vocab_size,
            num_image_tokens,
            logits: Box::new(logits),
            steps: Vec::new(),
            caches_created: 0,
        }
    }

    /// A model that, after a prompt of `prompt_len` positions, makes `tokens[k]` by far the most
    /// likely k-th generated token, and is uniform everywhere else.
    pub fn scripted(
        vocab_size: usize,
        num_image_tokens: usize,
        prompt_len: usize,
        tokens: Vec<u32>,
    ) -> Self {
        Self::new(vocab_size, num_image_tokens, move |step| {
            let next = step
                .end()
                .checked_sub(prompt_len)
                .and_then(|k| tokens.get(k));
            match next {
                Some(&id) => peaked(vocab_size, id),
                None => vec![0.0; vocab_size],
            }
        })
    }

    /// A model that always returns `logits`.
    pub fn fixed(num_image_tokens: usize, logits: Vec<f32>) -> Self {
        Self::new(logits.len(), num_image_tokens, move |_| logits.clone())
    }

    fn check(&self, cache: &FakeCache, step: &StepRecord, images: usize) -> Result<(), String> {
        let seq = step.seq_len();
        if seq == 0 {
            return Err("step with no new positions".into());
        }
        if step.past_len != cache.len {
            return Err(format!(
                "past_len {} but the cache holds {}",
                step.past_len, cache.len
            ));
        }
        let expected: Vec<i64> = (step.past_len..step.end()).map(|p| p as i64).collect();
        if step.position_ids != expected {
            return Err(format!(
                "position_ids {:?}, expected {expected:?}",
                step.position_ids
            ));
        }
        if step.attention_mask.len() != step.end() || step.attention_mask.iter().any(|&m| m != 1) {
            return Err(format!(
                "attention_mask of {} entries (not all ones?), expected {} ones",
                step.attention_mask.len(),
                step.end()
            ));
        }
        let mut covered = 0;
        for segment in &step.segments {
            match segment {
                RecordedSegment::Tokens(ids) => {
                    if ids.is_empty() {
                        return Err("empty token segment".into());
                    }
                    if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                        return Err(format!(
                            "token {id} outside a vocabulary of {}",
                            self.vocab_size
                        ));
                    }
                    covered += ids.len();
                }
                RecordedSegment::Image { index, rows } => {
                    if *index >= images || rows.is_empty() || rows.end > self.num_image_tokens {
                        return Err(format!(
                            "image {index} rows {rows:?} with {images} image(s) of {} rows",
                            self.num_image_tokens
                        ));
                    }
                    covered += rows.len();
                }
            }
        }
        if covered != seq {
            return Err(format!(
                "segments cover {covered} positions, position_ids {seq}"
            ));
        }
        Ok(())
    }
}

impl Model for FakeModel {
    type Cache = FakeCache;
    type Image = ();

    fn num_image_tokens(&self) -> usize {
        self.num_image_tokens
    }

    fn new_cache(&mut self) -> Result<FakeCache, BoxError> {
        self.caches_created += 1;
        Ok(FakeCache::default())
    }

    fn step(
        &mut self,
        cache: &mut FakeCache,
        input: &StepInput<'_, ()>,
    ) -> Result<Vec<f32>, BoxError> {
        let step = StepRecord {
            segments: input.segments.iter().map(RecordedSegment::from).collect(),
            position_ids: input.position_ids.to_vec(),
            attention_mask: input.attention_mask.to_vec(),
            past_len: input.past_len,
        };
        self.check(cache, &step, input.images.len())?;
        cache.len = step.end();
        let logits = (self.logits)(&step);
        self.steps.push(step);
        Ok(logits)
    }

    fn truncate_cache(&mut self, cache: &mut FakeCache, len: usize) -> Result<(), BoxError> {
        cache.len = cache.len.min(len);
        Ok(())
    }
}

/// Logits of `vocab_size` zeros with `id` at 100: `id` wins any greedy or sampled pick.
pub fn peaked(vocab_size: usize, id: u32) -> Vec<f32> {
    let mut logits = vec![0.0; vocab_size];
    if let Some(logit) = logits.get_mut(id as usize) {
        *logit = 100.0;
    }
    logits
}

/// A byte-level decoder: each id stands for a byte string, decoded lossily like a byte-level
/// BPE tokenizer; ids in `special` decode to nothing (skip_special_tokens).
#[derive(Debug, Clone, Default)]
pub struct ByteDecoder {
    pub pieces: Vec<Vec<u8>>,
    pub special: Vec<u32>,
}

impl super::Decode for ByteDecoder {
    fn decode(&self, ids: &[u32]) -> Result<String, BoxError> {
        let mut bytes = Vec::new();
        for &id in ids {
            if self.special.contains(&id) {
                continue;
            }
            let piece = self
                .pieces
                .get(id as usize)
                .ok_or_else(|| format!("id {id} outside a vocabulary of {}", self.pieces.len()))?;
            bytes.extend_from_slice(piece);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
