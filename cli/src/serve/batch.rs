//! Continuous batching: the requests in flight, one per row of a [`BatchCache`], advanced
//! together one step at a time ([`carrot_runtime::engine::Engine::step_rows`]: a prefill chunk
//! for the earliest request still prefilling, then one decode step for all the others).
//!
//! Between steps the scheduler admits waiting requests into free rows (in arrival order), and
//! ends requests whose client went away or whose deadline passed. A row keeps what its last
//! request left (prompt and answer ids, images): a new request takes the free row that shares
//! the longest prefix with it, and prefills only the rest.

use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::convert::JobPrompt;
use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::LogprobEntry;
use super::stop::{Filtered, StopText};
use super::structured::Grammars;
use super::worker::{
    ImageCache, ImageKey, Job, Outcome, Reply, image_key, log_request, logprob_entry, send_text,
    timed_out,
};
use carrot_runtime::engine::{BatchCache, ImageFeatures, Running};
use carrot_runtime::generate::{Event, Request, Sequence};
use carrot_runtime::pipeline::{Pipeline, PipelineError, Prompt, split_prompt};

/// A request ready to run: its generation request, prompt ids and the images' content keys.
type Prepared = (Request<ImageFeatures>, Vec<i64>, Vec<ImageKey>);

/// A request in flight on one row.
struct Active {
    job: Job,
    started: Instant,
    /// Arrival order; the earliest prefills first.
    ticket: u64,
    request: Request<ImageFeatures>,
    prompt_ids: Vec<i64>,
    keys: Vec<ImageKey>,
    /// The choice being generated and its state.
    choice: usize,
    sequence: Sequence,
    stop: StopText,
    /// Log-probabilities of tokens whose text the stop filter still holds back.
    pending: Vec<LogprobEntry>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// Tokens of the choices done so far.
    completion_tokens: usize,
}

/// What a row holds for the next request: the ids (image sentinels included) whose positions
/// are in its cache, and the images among them.
#[derive(Default)]
struct Held {
    ids: Vec<i64>,
    images: Vec<ImageKey>,
}

pub(super) struct Scheduler {
    pipeline: Pipeline,
    cache: BatchCache,
    rows: Vec<Option<Active>>,
    held: Vec<Held>,
    images: ImageCache,
    grammars: Grammars,
    metrics: Arc<Metrics>,
    prefill_chunk: NonZeroUsize,
    tickets: u64,
}

impl Scheduler {
    pub(super) fn new(
        pipeline: Pipeline,
        limits: super::Limits,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ApiError> {
        let rows = limits.max_batch.max(1);
        let cache = pipeline
            .engine
            .batch_cache(rows)
            .map_err(|e| ApiError::from(PipelineError::from(e)))?;
        if !cache.is_batched() && rows > 1 {
            tracing::info!(
                "{}: this export's KV cache is not shared (kv_cache \"{}\"); its {rows} requests \
                 in flight take turns instead of decoding in one batch (export with --flavor ort \
                 to batch)",
                pipeline.engine.dir.display(),
                pipeline.engine.manifest.kv_cache
            );
        }
        Ok(Self {
            pipeline,
            cache,
            rows: (0..rows).map(|_| None).collect(),
            held: (0..rows).map(|_| Held::default()).collect(),
            images: ImageCache::new(limits.image_cache),
            grammars: Grammars::new(),
            metrics,
            prefill_chunk: NonZeroUsize::new(limits.prefill_chunk.max(1)).expect("at least one"),
            tickets: 0,
        })
    }

    /// Runs until every queue handle is dropped and the requests in flight are done.
    pub(super) fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            while open && self.rows.iter().any(Option::is_none) {
                let idle = self.rows.iter().all(Option::is_none);
                let job = if idle {
                    jobs.blocking_recv()
                } else {
                    match jobs.try_recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match job {
                    Some(job) => {
                        self.metrics.waiting.dec();
                        self.admit(job);
                    }
                    None => open = false,
                }
            }
            if self.rows.iter().all(Option::is_none) {
                if open {
                    continue;
                }
                return;
            }
            self.expire();
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.step()));
            if stepped.is_err() {
                self.fail_all(&ApiError::internal(
                    "the model worker panicked on a batch step",
                ));
            }
        }
    }

    /// Takes `job` into a free row, or answers it with its error.
    fn admit(&mut self, job: Job) {
        self.metrics.running.inc();
        let started = Instant::now();
        if job.client_gone() {
            self.end(job, started, Outcome::ClientGone, None);
            return;
        }
        if Instant::now() >= job.deadline {
            let e = timed_out(&job);
            self.fail_request(job, started, e);
            return;
        }
        let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| self.prepare(&job)))
            .unwrap_or_else(|_| {
                Err(ApiError::internal(
                    "the model worker panicked on this request",
                ))
            });
        let (mut request, prompt_ids, keys) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.fail_request(job, started, e);
                return;
            }
        };
        let row = self.pick_row(&prompt_ids, &keys);
        let choice = Choice {
            job: &job,
            prompt_ids: &prompt_ids,
            keys: &keys,
            index: 0,
        };
        let sequence = match self.start_sequence(row, choice, &mut request) {
            Ok(sequence) => sequence,
            Err(e) => {
                self.fail_request(job, started, e);
                return;
            }
        };
        let _ = job.replies.send(Reply::Started);
        let ticket = self.tickets;
        self.tickets += 1;
        self.rows[row] = Some(Active {
            stop: StopText::new(job.input.stop.clone()),
            job,
            started,
            ticket,
            request,
            prompt_ids,
            keys,
            choice: 0,
            sequence,
            pending: Vec::new(),
            first_token: None,
            last_token: None,
            completion_tokens: 0,
        });
    }

    /// Prompt ids, the request with its images' features, and the images' content keys.
    fn prepare(&mut self, job: &Job) -> Result<Prepared, ApiError> {
        let pipeline = &mut self.pipeline;
        let input = &job.input;
        let prompt_ids = match &input.prompt {
            JobPrompt::Turns(turns) => {
                pipeline.prompt_ids(&Prompt::Conversation(turns.clone()), input.images.len())?
            }
            JobPrompt::Messages(messages) => pipeline
                .tokenizer
                .encode_chat(messages)
                .map_err(PipelineError::from)?
                .into_iter()
                .map(i64::from)
                .collect(),
        };
        let pixels = pipeline.pixel_values(&input.images)?;
        let sentinel = pipeline.engine.manifest.prompt.image_token_index;
        let keys: Vec<ImageKey> = pixels.iter().map(|p| image_key(p)).collect();
        let mut options = pipeline.options(&input.params);
        options.prefill_chunk = Some(self.prefill_chunk);
        let request = Request {
            prompt: split_prompt(&prompt_ids, sentinel)?,
            images: self
                .images
                .features(pipeline, &keys, &pixels, &self.metrics)?,
            options,
        };
        Ok((request, prompt_ids, keys))
    }

    /// The free row for a new request: the one holding the longest prefix of it, else the
    /// lowest (a decode step runs every row up to the highest busy one, so busy rows are kept
    /// low).
    fn pick_row(&self, prompt_ids: &[i64], keys: &[ImageKey]) -> usize {
        (0..self.rows.len())
            .filter(|&r| self.rows[r].is_none())
            .max_by_key(|&r| (self.reusable(r, prompt_ids, keys), std::cmp::Reverse(r)))
            .expect("admit is called with a free row")
    }

    /// Positions of a prompt (`prompt_ids` with images `keys`) that `row` already holds: the
    /// prefix it shares with what the row's last request left, within what the row still holds
    /// (a row that filled its context gives up its last position to later batch steps).
    fn reusable(&self, row: usize, prompt_ids: &[i64], keys: &[ImageKey]) -> usize {
        let held = &self.held[row];
        if held.images != keys {
            return 0;
        }
        self.pipeline
            .shared_positions(&held.ids, prompt_ids)
            .map_or(0, |shared| shared.min(self.cache.len(row)))
    }

    /// A sequence for choice `choice.index` on `row`, resuming from what the row holds.
    fn start_sequence(
        &mut self,
        row: usize,
        choice: Choice<'_>,
        request: &mut Request<ImageFeatures>,
    ) -> Result<Sequence, ApiError> {
        let cached = self.reusable(row, choice.prompt_ids, choice.keys);
        // From now on the row holds this sequence.
        self.held[row] = Held::default();
        let params = &choice.job.input.params;
        if choice.index > 0 {
            // Each further choice samples on its own.
            request.options.sampling.seed = match params.seed {
                Some(seed) => seed.wrapping_add(choice.index as u64),
                None => self.pipeline.options(params).sampling.seed,
            };
        }
        let nit = carrot_runtime::generate::Model::num_image_tokens(&self.pipeline.engine);
        let mut sequence = Sequence::new(request, nit, cached).map_err(PipelineError::from)?;
        if let Some(top) = choice.job.input.logprobs {
            sequence = sequence.with_logprobs(top);
        }
        if let Some(format) = &choice.job.input.response_format {
            let engine = &self.pipeline.engine;
            let constraint = self.grammars.constraint(
                format,
                &engine.dir,
                engine.manifest.text.vocab_size,
                &request.options.eos_token_ids,
            )?;
            sequence = sequence.with_constraint(constraint);
        }
        self.pipeline
            .engine
            .truncate_row(&mut self.cache, row, sequence.reused_positions())
            .map_err(PipelineError::from)?;
        self.metrics
            .prompt_tokens
            .inc_by(sequence.prompt_len() as u64);
        self.metrics
            .prompt_tokens_reused
            .inc_by(sequence.reused_positions() as u64);
        Ok(sequence)
    }

    /// Ends requests whose client is gone or whose deadline passed.
    fn expire(&mut self) {
        let now = Instant::now();
        for row in 0..self.rows.len() {
            let timeout = match &self.rows[row] {
                Some(active) if active.job.client_gone() => None,
                Some(active) if now >= active.job.deadline => Some(timed_out(&active.job)),
                _ => continue,
            };
            self.forget(row);
            let active = self.rows[row].take().expect("matched above");
            match timeout {
                None => self.end(active.job, active.started, Outcome::ClientGone, None),
                Some(e) => self.fail_request(active.job, active.started, e),
            }
        }
    }

    /// One batch step, then what each row's event means for its request.
    fn step(&mut self) {
        let decoding = self
            .rows
            .iter()
            .flatten()
            .filter(|a| !a.sequence.prefilling() && a.sequence.finish_reason().is_none())
            .count();
        if decoding > 0 {
            self.metrics.decode_batch_size.observe(decoding as f64);
        }
        let mut running: Vec<Option<Running<'_>>> = self
            .rows
            .iter_mut()
            .map(|row| {
                row.as_mut().map(|a| Running {
                    request: &a.request,
                    sequence: &mut a.sequence,
                    ticket: a.ticket,
                })
            })
            .collect();
        let outcomes =
            self.pipeline
                .engine
                .step_rows(&mut self.cache, &mut running, &self.pipeline.tokenizer);
        drop(running);
        for (row, outcome) in outcomes {
            match outcome {
                Ok(None) => {}
                Ok(Some(Event::Token { text_delta, .. })) => self.token(row, &text_delta),
                Ok(Some(Event::Done { finish_reason, .. })) => {
                    self.choice_done(row, finish_reason.as_str());
                }
                Err(e) => self.fail(row, &ApiError::from(PipelineError::from(e))),
            }
        }
    }

    fn token(&mut self, row: usize, text_delta: &str) {
        let Some(active) = self.rows[row].as_mut() else {
            return;
        };
        let now = Instant::now();
        let m = &self.metrics;
        match (active.last_token, active.first_token) {
            (None, None) => {
                m.time_to_first_token
                    .observe((now - active.job.arrived()).as_secs_f64());
                active.first_token = Some(now);
            }
            (Some(t), _) => m.inter_token_latency.observe((now - t).as_secs_f64()),
            (None, Some(_)) => {}
        }
        m.generated_tokens.inc();
        active.last_token = Some(now);
        if let Some(lp) = active.sequence.last_logprob() {
            active
                .pending
                .push(logprob_entry(&self.pipeline.tokenizer, lp));
        }
        let replies = &active.job.replies;
        match active.stop.push(text_delta) {
            Filtered::Text(text) => send_text(replies, active.choice, text, &mut active.pending),
            Filtered::Stopped(text) => {
                send_text(replies, active.choice, text, &mut active.pending);
                active.sequence.abort();
                self.choice_done(row, "stop");
            }
        }
    }

    /// The current choice of `row` is done: report it, then start the next or end the request.
    fn choice_done(&mut self, row: usize, finish_reason: &'static str) {
        let Some(mut active) = self.rows[row].take() else {
            return;
        };
        let index = active.choice;
        let rest = active.stop.finish();
        send_text(&active.job.replies, index, rest, &mut active.pending);
        let _ = active.job.replies.send(Reply::ChoiceDone {
            index,
            finish_reason,
        });
        let output = active.sequence.output();
        active.completion_tokens += output.token_ids.len();
        // The row holds the prompt and every generated token but the last.
        if let Some((_, fed)) = output.token_ids.split_last() {
            let mut ids = active.prompt_ids.clone();
            ids.extend(fed.iter().map(|&id| i64::from(id)));
            self.held[row] = Held {
                ids,
                images: active.keys.clone(),
            };
        }
        if active.choice + 1 < active.job.input.n {
            active.choice += 1;
            let choice = Choice {
                job: &active.job,
                prompt_ids: &active.prompt_ids,
                keys: &active.keys,
                index: active.choice,
            };
            match self.start_sequence(row, choice, &mut active.request) {
                Ok(sequence) => {
                    active.sequence = sequence;
                    active.stop = StopText::new(active.job.input.stop.clone());
                    active.last_token = None;
                    self.rows[row] = Some(active);
                }
                Err(e) => self.fail_request(active.job, active.started, e),
            }
            return;
        }
        self.metrics
            .request_duration
            .observe(active.job.arrived().elapsed().as_secs_f64());
        let (prompt_tokens, completion_tokens) = (output.prompt_tokens, active.completion_tokens);
        self.end(
            active.job,
            active.started,
            Outcome::Ok {
                prompt_tokens,
                completion_tokens,
            },
            Some(Reply::Done {
                prompt_tokens,
                completion_tokens,
            }),
        );
    }

    fn fail(&mut self, row: usize, e: &ApiError) {
        self.forget(row);
        if let Some(active) = self.rows[row].take() {
            self.fail_request(active.job, active.started, e.clone());
        }
    }

    fn fail_all(&mut self, e: &ApiError) {
        for row in 0..self.rows.len() {
            self.fail(row, e);
        }
    }

    /// Forget what `row` holds: its request ended midway, so its cache is only partly known.
    fn forget(&mut self, row: usize) {
        self.held[row] = Held::default();
    }

    /// The request ends with `e`.
    fn fail_request(&self, job: Job, started: Instant, e: ApiError) {
        self.end(
            job,
            started,
            Outcome::Error(&e),
            Some(Reply::Failed(e.clone())),
        );
    }

    /// The request is over: metrics, its log line, and its last reply.
    fn end(&self, job: Job, started: Instant, outcome: Outcome<'_>, last: Option<Reply>) {
        log_request(&job, started, outcome);
        // Metrics are final before the last reply, so a client that reads them after its
        // answer sees its request counted.
        self.metrics.running.dec();
        self.metrics
            .finished(!matches!(last, Some(Reply::Failed(_))));
        if let Some(reply) = last {
            let _ = job.replies.send(reply);
        }
    }
}

/// Which choice of which request a sequence is for.
#[derive(Clone, Copy)]
struct Choice<'a> {
    job: &'a Job,
    prompt_ids: &'a [i64],
    keys: &'a [ImageKey],
    index: usize,
}
