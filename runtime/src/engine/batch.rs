//! Many sequences decoded together, for a server's continuous batching.
//!
//! A [`BatchCache`] holds the KV caches of up to `rows` sequences; each row belongs to one
//! sequence at a time and keeps what it held after that sequence ends (a later request that
//! continues the conversation resumes from it).
//!
//! With `kv_cache: "shared"` (the `ort` flavor) every layer's key and value is one buffer for
//! all rows, `[rows · kv_heads, capacity, head_dim]`, so rows `0..n` are one contiguous
//! `[n, kv_heads, capacity, head_dim]` tensor. A decode step runs rows `0..=last` (the highest
//! row with a token) as one batch: the attention mask's row sums give `GroupQueryAttention` each
//! row's own length, so each row's new token lands at its own position. Rows without a token
//! ride along and write one throw-away position just past what they hold, which that row's next
//! real step overwrites. A prefill chunk runs one row alone, on a view of that row, so a long
//! prompt joins without holding up the others for longer than a chunk.
//!
//! With `kv_cache: "concat"` (the portable flavor) each row has its own cache and rows run one
//! after another: the same interface, without the batching.

use carrot_contract::names;
use ort::value::{DynValue, Tensor};

use super::{Engine, EngineError, ImageFeatures, KvCache, run_err};
use crate::generate::{
    Decode, Event, GenerateError, Model, Output, Request, Segment, Sequence, StepInput, Work,
    prompt_segments,
};
use crate::kv_shared::{self, Placement};

/// The KV caches of up to [`BatchCache::rows`] sequences.
pub struct BatchCache {
    store: Store,
    /// Positions each row holds.
    lens: Vec<usize>,
}

enum Store {
    /// One buffer per layer and key/value, rows side by side.
    Shared(Vec<DynValue>),
    /// One cache per row.
    Separate(Vec<KvCache>),
}

impl std::fmt::Debug for BatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCache")
            .field("batched", &self.is_batched())
            .field("lens", &self.lens)
            .finish()
    }
}

impl BatchCache {
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Positions row `row` holds.
    pub fn len(&self, row: usize) -> usize {
        self.lens[row]
    }

    /// Whether decode steps run all rows in one batch (`kv_cache: "shared"`), rather than one
    /// row after another.
    pub fn is_batched(&self) -> bool {
        matches!(self.store, Store::Shared(_))
    }
}

/// A sequence running on one row of a [`BatchCache`].
pub struct Running<'r> {
    pub request: &'r Request<ImageFeatures>,
    pub sequence: &'r mut Sequence,
    /// Among rows still prefilling, the lowest ticket goes first (arrival order).
    pub ticket: u64,
}

/// What one row produced in a [`Engine::step_rows`] step: an event, nothing (a prefill chunk
/// that was not the prompt's last), or the error that ended its sequence.
pub type RowOutcome = Result<Option<Event>, GenerateError>;

impl Engine {
    /// One scheduling step over the sequences on `rows` (index = cache row): one prefill chunk
    /// for the earliest row still prefilling, then one decode step for every row that is
    /// decoding, in one batch. Finished sequences report their last event without a step.
    /// Returns what each row that took part produced, in row order.
    ///
    /// A sequence's row must hold exactly the positions it expects: truncate the row to
    /// [`Sequence::reused_positions`] before its first step.
    pub fn step_rows<D: Decode + ?Sized>(
        &mut self,
        cache: &mut BatchCache,
        rows: &mut [Option<Running<'_>>],
        decoder: &D,
    ) -> Vec<(usize, RowOutcome)> {
        let mut out: Vec<(usize, RowOutcome)> = Vec::new();
        let mut decode: Vec<(usize, u32)> = Vec::new();
        let mut prefill: Option<(usize, u64)> = None;
        for (row, running) in rows.iter_mut().enumerate() {
            let Some(running) = running else { continue };
            if running.sequence.prefilling() {
                if prefill.is_none_or(|(_, ticket)| running.ticket < ticket) {
                    prefill = Some((row, running.ticket));
                }
                continue;
            }
            match running.sequence.next_work() {
                None | Some(Work::Prefill(_)) => {}
                Some(Work::Finished(event)) => out.push((row, Ok(Some(event)))),
                Some(Work::Decode { token, past_len }) => {
                    match self.expect_len(cache, row, past_len) {
                        Ok(()) => decode.push((row, token)),
                        Err(e) => out.push((row, Err(e))),
                    }
                }
            }
        }
        if let Some((row, _)) = prefill {
            let running = rows[row].as_mut().expect("chosen above");
            let outcome = self.prefill_step(cache, row, running, decoder);
            out.push((row, outcome));
        }
        if !decode.is_empty() {
            match self.decode_rows(cache, &decode) {
                Ok(logits) => {
                    for (&(row, _), mut logits) in decode.iter().zip(logits) {
                        let running = rows[row].as_mut().expect("decoding above");
                        out.push((row, running.sequence.record(decoder, &mut logits)));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for &(row, _) in &decode {
                        out.push((
                            row,
                            Err(GenerateError::Step {
                                past_len: cache.lens[row],
                                seq_len: 1,
                                source: message.clone().into(),
                            }),
                        ));
                    }
                }
            }
        }
        for (row, outcome) in &out {
            if outcome.is_err()
                && let Some(running) = rows[*row].as_mut()
            {
                running.sequence.abort();
            }
        }
        out.sort_by_key(|(row, _)| *row);
        out
    }

    /// Generates every request with continuous batching on `rows` rows: requests take rows in
    /// order as rows free up, and each output is what [`crate::generate::generate`] gives for
    /// that request alone.
    pub fn generate_batch<D: Decode + ?Sized>(
        &mut self,
        requests: &[Request<ImageFeatures>],
        rows: usize,
        decoder: &D,
    ) -> Result<Vec<Output>, GenerateError> {
        let mut cache = self
            .batch_cache(rows)
            .map_err(|e| GenerateError::NewCache(Box::new(e)))?;
        let num_image_tokens = self.num_image_tokens();
        let mut slots: Vec<Option<(usize, Sequence)>> = (0..cache.rows()).map(|_| None).collect();
        let mut outputs: Vec<Option<Output>> = vec![None; requests.len()];
        let mut next = 0;
        loop {
            for (row, slot) in slots.iter_mut().enumerate() {
                if slot.is_none() && next < requests.len() {
                    let sequence = Sequence::new(&requests[next], num_image_tokens, 0)?;
                    self.truncate_row(&mut cache, row, 0)
                        .map_err(|e| GenerateError::NewCache(Box::new(e)))?;
                    *slot = Some((next, sequence));
                    next += 1;
                }
            }
            if slots.iter().all(Option::is_none) {
                break;
            }
            let mut running: Vec<Option<Running<'_>>> = slots
                .iter_mut()
                .map(|slot| {
                    slot.as_mut().map(|(i, sequence)| Running {
                        request: &requests[*i],
                        sequence,
                        ticket: *i as u64,
                    })
                })
                .collect();
            let outcomes = self.step_rows(&mut cache, &mut running, decoder);
            drop(running);
            for (row, outcome) in outcomes {
                if let Some(Event::Done { .. }) = outcome? {
                    let (i, sequence) = slots[row].take().expect("a running row");
                    outputs[i] = Some(sequence.output());
                }
            }
        }
        Ok(outputs.into_iter().flatten().collect())
    }

    fn prefill_step<D: Decode + ?Sized>(
        &mut self,
        cache: &mut BatchCache,
        row: usize,
        running: &mut Running<'_>,
        decoder: &D,
    ) -> RowOutcome {
        let Some(Work::Prefill(range)) = running.sequence.next_work() else {
            return Ok(None);
        };
        self.expect_len(cache, row, range.start)?;
        let request = running.request;
        let segments = prompt_segments(&request.prompt, self.num_image_tokens(), range.clone());
        let mut logits = self
            .prefill_row(cache, row, &segments, &request.images)
            .map_err(|e| GenerateError::Step {
                past_len: range.start,
                seq_len: range.len(),
                source: Box::new(e),
            })?;
        running.sequence.record(decoder, &mut logits)
    }

    fn expect_len(&self, cache: &BatchCache, row: usize, len: usize) -> Result<(), GenerateError> {
        match cache.lens.get(row) {
            Some(&held) if held == len => Ok(()),
            held => Err(GenerateError::Step {
                past_len: len,
                seq_len: 0,
                source: format!(
                    "batch row {row} holds {held:?} positions, its sequence expects {len}"
                )
                .into(),
            }),
        }
    }

    /// Caches for `rows` sequences (at least one), each holding nothing yet.
    pub fn batch_cache(&self, rows: usize) -> Result<BatchCache, EngineError> {
        let rows = rows.max(1);
        let t = &self.manifest.text;
        let store = match self.shared_capacity() {
            Some(max) => Store::Shared(kv_shared::allocate(
                self.act,
                Placement::of(&self.device),
                t.num_layers,
                rows * t.num_kv_heads,
                max.min(kv_shared::INITIAL_CAPACITY),
                t.head_dim,
            )?),
            None => Store::Separate(
                (0..rows)
                    .map(|_| self.empty_cache())
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(BatchCache {
            store,
            lens: vec![0; rows],
        })
    }

    /// Keep the first `len` positions of row `row`.
    pub fn truncate_row(
        &self,
        cache: &mut BatchCache,
        row: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        check_row(cache, row)?;
        if let Store::Separate(caches) = &mut cache.store {
            self.truncate(&mut caches[row], len)?;
        }
        cache.lens[row] = cache.lens[row].min(len);
        Ok(())
    }

    /// Runs `segments` (images from `images`) on row `row` alone, after the positions it holds;
    /// returns the logits of the last new position.
    pub fn prefill_row(
        &mut self,
        cache: &mut BatchCache,
        row: usize,
        segments: &[Segment<'_>],
        images: &[ImageFeatures],
    ) -> Result<Vec<f32>, EngineError> {
        check_row(cache, row)?;
        let past = cache.lens[row];
        let end = past + segments.iter().map(Segment::len).sum::<usize>();
        let mask = vec![1i64; end];
        let positions: Vec<i64> = (past..end).map(|p| p as i64).collect();
        let input = StepInput {
            segments,
            images,
            position_ids: &positions,
            attention_mask: &mask,
            past_len: past,
        };
        let last = |logits: &[f32], vocab: usize| logits[logits.len() - vocab..].to_vec();
        let logits = match &mut cache.store {
            Store::Separate(caches) => self.run_decoder(&mut caches[row], &input, last)?,
            Store::Shared(buffers) => {
                let inputs = self.step_inputs(&input)?;
                let used = cache.lens.iter().copied().max().unwrap_or(0);
                self.fit_shared(buffers, used, end)?;
                self.run_rows(buffers, row..row + 1, inputs.into(), last)?
            }
        };
        cache.lens[row] = end;
        Ok(logits)
    }

    /// One decode step for every `(row, token)` of `tokens` (distinct rows): each token goes at
    /// its row's next position. Returns the logits of each, in the order of `tokens`.
    pub fn decode_rows(
        &mut self,
        cache: &mut BatchCache,
        tokens: &[(usize, u32)],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        for &(row, _) in tokens {
            check_row(cache, row)?;
        }
        if let Store::Separate(_) = cache.store {
            return tokens
                .iter()
                .map(|&(row, token)| {
                    self.prefill_row(cache, row, &[Segment::Tokens(&[token])], &[])
                })
                .collect();
        }
        let Some(n) = tokens.iter().map(|&(row, _)| row + 1).max() else {
            return Ok(Vec::new());
        };
        // Rows without a token ride along on id 0; what they write is thrown away.
        let mut ids: Vec<Option<u32>> = vec![None; n];
        for &(row, token) in tokens {
            if ids[row].replace(token).is_some() {
                return Err(run_err("decode_rows", format!("row {row} appears twice")));
            }
        }
        // A row without a token writes its throw-away position just past what it holds; a row
        // that holds a full context gives up its last position for it.
        let max = self.shared_capacity().unwrap_or(usize::MAX);
        for (row, id) in ids.iter().enumerate() {
            if id.is_none() && cache.lens[row] >= max {
                cache.lens[row] = max - 1;
            }
        }
        let ends: Vec<usize> = cache.lens[..n].iter().map(|&len| len + 1).collect();
        let total = ends.iter().copied().max().unwrap_or(1);
        let used = cache.lens.iter().copied().max().unwrap_or(0);
        let Store::Shared(buffers) = &mut cache.store else {
            unreachable!("handled above");
        };
        self.fit_shared(buffers, used, total)?;

        let hidden = self.manifest.text.hidden_size;
        let ids: Vec<u32> = ids.iter().map(|id| id.unwrap_or(0)).collect();
        let embeds = self.embed(&ids)?;
        let mut mask = Vec::with_capacity(n * total);
        for &end in &ends {
            mask.extend((0..total).map(|p| i64::from(p < end)));
        }
        let positions: Vec<i64> = cache.lens[..n].iter().map(|&len| len as i64).collect();
        let inputs = vec![
            (names::INPUTS_EMBEDS, embeds.into_value(vec![n, 1, hidden])?),
            (names::ATTENTION_MASK, int_value(vec![n, total], mask)?),
            (names::POSITION_IDS, int_value(vec![n, 1], positions)?),
        ];
        let logits = self.run_rows(buffers, 0..n, inputs, |logits, vocab| {
            tokens
                .iter()
                .map(|&(row, _)| logits[row * vocab..(row + 1) * vocab].to_vec())
                .collect::<Vec<_>>()
        })?;
        for &(row, _) in tokens {
            cache.lens[row] += 1;
        }
        Ok(logits)
    }

    /// One decoder run over rows `rows` of the shared buffers, bound in place.
    fn run_rows<T>(
        &mut self,
        buffers: &mut [DynValue],
        rows: std::ops::Range<usize>,
        inputs: Vec<(&str, DynValue)>,
        read: impl FnOnce(&[f32], usize) -> T,
    ) -> Result<T, EngineError> {
        let t = &self.manifest.text;
        // SAFETY: the views live only for this run, while `buffers` is borrowed mutably here
        // and neither grown nor dropped; the rows are within the buffers (callers check them).
        let mut views = unsafe {
            kv_shared::row_views(
                buffers,
                self.act,
                Placement::of(&self.device),
                (t.num_kv_heads, t.head_dim),
                rows,
            )?
        };
        kv_shared::run(
            &mut self.decoder,
            inputs,
            &mut views,
            (&self.past_names, &self.present_names),
            &self.logits_memory,
            read,
        )
    }
}

fn check_row(cache: &BatchCache, row: usize) -> Result<(), EngineError> {
    if row < cache.rows() {
        Ok(())
    } else {
        Err(run_err(
            "batch cache",
            format!("row {row} of a batch of {}", cache.rows()),
        ))
    }
}

fn int_value(shape: Vec<usize>, values: Vec<i64>) -> Result<DynValue, EngineError> {
    Tensor::from_array((shape, values))
        .map(|t| t.into_dyn())
        .map_err(|e| run_err("attention_mask/position_ids", e))
}
