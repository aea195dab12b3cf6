//! The model worker: one thread owns the pipeline and answers queued requests one at a time,
//! sending each request's text back over its own channel as it is generated.
//!
//! Between requests it keeps two caches: image features by the content of the preprocessed
//! pixels (a repeated image is not encoded again), and the KV cache of the last request with
//! the ids it holds, so a request that continues that conversation prefills only what follows
//! their common prefix.
//!
//! A request stops early when its client goes away (its reply channel closes), when a stop
//! string occurs, or when its deadline passes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::convert::{JobInput, JobPrompt};
use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::{LogprobEntry, TopLogprob};
use super::stop::{Filtered, StopText};
use carrot_runtime::engine::{ImageFeatures, KvCache};
use carrot_runtime::generate::{Event, Generation, Request};
use carrot_runtime::pipeline::{Pipeline, Prompt, split_prompt};

/// What the worker reports about one request, in this order: `Started`; for each choice in
/// turn any number of `Text` and its `ChoiceDone`; then `Done`. `Failed` may come at any point,
/// and nothing follows it.
#[derive(Debug)]
pub enum Reply {
    /// The prompt and images were accepted; generation begins.
    Started,
    /// More of choice `.0`'s answer, with the log-probabilities of the tokens behind it (when
    /// asked for).
    Text(usize, String, Vec<LogprobEntry>),
    ChoiceDone {
        index: usize,
        finish_reason: &'static str,
    },
    /// Every choice is done; the prompt's positions and the tokens of all choices.
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

pub struct Job {
    /// The response id (`chatcmpl-…`), also in the request log.
    pub id: String,
    pub input: JobInput,
    pub deadline: Instant,
    pub timeout: Duration,
    pub replies: mpsc::UnboundedSender<Reply>,
}

impl Job {
    /// When the request arrived: its deadline is its arrival plus its timeout.
    fn arrived(&self) -> Instant {
        self.deadline - self.timeout
    }
}

/// Where handlers put requests; bounded, so a flood of requests is refused instead of queued.
#[derive(Clone, Debug)]
pub struct Queue {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before sending: the worker may take the job at once.
        self.metrics.waiting.inc();
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.metrics.waiting.dec();
        }
        sent.map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::busy(format!(
                "the server is busy: {} requests are already waiting; retry later",
                self.jobs.max_capacity()
            )),
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::internal("the model worker has stopped")
            }
        })
    }
}

/// The worker thread; it ends once every [`Queue`] handle is dropped and the last job is done.
#[derive(Debug)]
pub struct Worker {
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; at most `max_queue` requests wait while one runs.
    pub fn spawn(
        pipeline: Pipeline,
        max_queue: usize,
        image_cache: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Worker, Queue)> {
        let (jobs, mut rx) = mpsc::channel::<Job>(max_queue.max(1));
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("carrot-model".into())
            .spawn(move || {
                let mut pipeline = pipeline;
                let mut caches = Caches::new(image_cache);
                while let Some(job) = rx.blocking_recv() {
                    m.waiting.dec();
                    m.running.inc();
                    let replies = job.replies.clone();
                    let started = Instant::now();
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run(&mut pipeline, &mut caches, &job, &m)
                    }));
                    log_request(&job, started, &outcome);
                    // Metrics are final before the last reply, so a client that reads them
                    // after its answer sees its request counted.
                    m.running.dec();
                    m.finished(matches!(outcome, Ok(Ok(_))));
                    let last = match outcome {
                        Ok(Ok(done)) => done,
                        Ok(Err(e)) => Some(Reply::Failed(e)),
                        Err(_) => Some(Reply::Failed(ApiError::internal(
                            "the model worker panicked on this request",
                        ))),
                    };
                    if let Some(reply) = last {
                        let _ = replies.send(reply);
                    }
                }
            })?;
        Ok((
            Worker {
                thread: Some(thread),
            },
            Queue { jobs, metrics },
        ))
    }

    /// Waits for the thread to finish its last job.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One structured line per request (`tracing` target `carrot::request`): id, outcome, tokens,
/// time in the queue and in the model.
fn log_request(
    job: &Job,
    started: Instant,
    outcome: &std::thread::Result<Result<Option<Reply>, ApiError>>,
) {
    let queued_ms = (started - job.arrived()).as_secs_f64() * 1e3;
    let run_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome {
        Ok(Ok(Some(Reply::Done {
            prompt_tokens,
            completion_tokens,
        }))) => tracing::info!(
            target: "carrot::request",
            id = %job.id,
            outcome = "ok",
            prompt_tokens,
            completion_tokens,
            images = job.input.images.len(),
            choices = job.input.n,
            queued_ms = format_args!("{queued_ms:.1}"),
            run_ms = format_args!("{run_ms:.1}"),
        ),
        Ok(Ok(_)) => tracing::info!(
            target: "carrot::request",
            id = %job.id,
            outcome = "client_gone",
            queued_ms = format_args!("{queued_ms:.1}"),
            run_ms = format_args!("{run_ms:.1}"),
        ),
        Ok(Err(e)) => tracing::warn!(
            target: "carrot::request",
            id = %job.id,
            outcome = "error",
            status = e.status.as_u16(),
            error = %e.message,
            queued_ms = format_args!("{queued_ms:.1}"),
            run_ms = format_args!("{run_ms:.1}"),
        ),
        Err(_) => tracing::error!(target: "carrot::request", id = %job.id, outcome = "panic"),
    }
}

fn timed_out(job: &Job) -> ApiError {
    ApiError::unavailable(
        "timeout",
        format!(
            "the request did not finish within {:.0} s (time in the queue included)",
            job.timeout.as_secs_f64()
        ),
    )
}

/// Content hash of one preprocessed image.
type ImageKey = [u8; 32];

fn image_key(pixels: &[f32]) -> ImageKey {
    use sha2::Digest;
    const CHUNK: usize = 4096;
    let mut h = sha2::Sha256::new();
    let mut bytes = [0u8; 4 * CHUNK];
    for chunk in pixels.chunks(CHUNK) {
        for (b, v) in bytes.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        h.update(&bytes[..4 * chunk.len()]);
    }
    h.finalize().into()
}

/// What the worker keeps from one request to the next.
struct Caches {
    /// Most recently used first; at most `image_capacity` entries.
    images: Vec<(ImageKey, ImageFeatures)>,
    image_capacity: usize,
    last: Option<Resumable>,
}

/// The KV cache a finished request left, the ids (image sentinels included) whose positions it
/// holds, and its images.
struct Resumable {
    cache: KvCache,
    ids: Vec<i64>,
    images: Vec<ImageKey>,
}

impl Caches {
    fn new(image_capacity: usize) -> Self {
        Self {
            images: Vec::new(),
            image_capacity,
            last: None,
        }
    }

    /// The features of each image: from the cache, or encoded (all misses in one batch).
    fn features(
        &mut self,
        pipeline: &mut Pipeline,
        keys: &[ImageKey],
        pixels: &[Vec<f32>],
        metrics: &Metrics,
    ) -> Result<Vec<ImageFeatures>, ApiError> {
        let mut missing: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let cached = self.images.iter().any(|(k, _)| k == key);
            if !cached && !missing.iter().any(|&j| keys[j] == *key) {
                missing.push(i);
            }
        }
        metrics.image_cache_hits.inc_by(
            keys.iter()
                .filter(|k| self.images.iter().any(|(c, _)| c == *k))
                .count() as u64,
        );
        if !missing.is_empty() {
            let batch: Vec<Vec<f32>> = missing.iter().map(|&i| pixels[i].clone()).collect();
            let encoded = pipeline
                .engine
                .encode_images(&batch)
                .map_err(carrot_runtime::pipeline::PipelineError::from)?;
            metrics.images_encoded.inc_by(encoded.len() as u64);
            for (&i, features) in missing.iter().zip(encoded) {
                self.images.insert(0, (keys[i], features));
            }
        }
        let mut features = Vec::with_capacity(keys.len());
        for key in keys {
            let at = self
                .images
                .iter()
                .position(|(k, _)| k == key)
                .ok_or_else(|| ApiError::internal("an encoded image left the cache"))?;
            let entry = self.images.remove(at);
            features.push(entry.1.clone());
            self.images.insert(0, entry);
        }
        // Evict only now: every image of this request was needed above.
        self.images.truncate(self.image_capacity);
        Ok(features)
    }
}

fn run(
    pipeline: &mut Pipeline,
    caches: &mut Caches,
    job: &Job,
    metrics: &Metrics,
) -> Result<Option<Reply>, ApiError> {
    let arrived = job.arrived();
    let replies = &job.replies;
    if replies.is_closed() {
        return Ok(None);
    }
    if Instant::now() >= job.deadline {
        return Err(timed_out(job));
    }
    let input = &job.input;
    let prompt_ids = match &input.prompt {
        JobPrompt::Turns(turns) => {
            pipeline.prompt_ids(&Prompt::Conversation(turns.clone()), input.images.len())?
        }
        JobPrompt::Messages(messages) => pipeline
            .tokenizer
            .encode_chat(messages)
            .map_err(carrot_runtime::pipeline::PipelineError::from)?
            .into_iter()
            .map(i64::from)
            .collect(),
    };
    let pixels = pipeline.pixel_values(&input.images)?;
    let sentinel = pipeline.engine.manifest.prompt.image_token_index;
    let keys: Vec<ImageKey> = pixels.iter().map(|p| image_key(p)).collect();
    let mut request = Request {
        prompt: split_prompt(&prompt_ids, sentinel)?,
        images: caches.features(pipeline, &keys, &pixels, metrics)?,
        options: pipeline.options(&input.params),
    };
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    let mut first_token: Option<Instant> = None;
    for index in 0..input.n {
        if index > 0 {
            // Each further choice samples on its own; it resumes from the cache the one before
            // left, so only the prompt's last position is prefilled again.
            request.options.sampling.seed = match input.params.seed {
                Some(seed) => seed.wrapping_add(index as u64),
                None => pipeline.options(&input.params).sampling.seed,
            };
        }
        let choice = Choice {
            index,
            prompt_ids: &prompt_ids,
            keys: &keys,
            arrived,
        };
        let Some((positions, tokens)) = generate_choice(
            pipeline,
            caches,
            job,
            &request,
            choice,
            metrics,
            &mut first_token,
        )?
        else {
            return Ok(None);
        };
        prompt_tokens = positions;
        completion_tokens += tokens;
    }
    metrics
        .request_duration
        .observe(arrived.elapsed().as_secs_f64());
    Ok(Some(Reply::Done {
        prompt_tokens,
        completion_tokens,
    }))
}

/// Which choice of a request [`generate_choice`] produces.
#[derive(Clone, Copy)]
struct Choice<'a> {
    index: usize,
    prompt_ids: &'a [i64],
    keys: &'a [ImageKey],
    arrived: Instant,
}

/// Generates one choice, streaming its text; returns the prompt's positions and the tokens
/// generated, or `None` when the client went away.
fn generate_choice(
    pipeline: &mut Pipeline,
    caches: &mut Caches,
    job: &Job,
    request: &Request<ImageFeatures>,
    choice: Choice<'_>,
    metrics: &Metrics,
    first_token: &mut Option<Instant>,
) -> Result<Option<(usize, usize)>, ApiError> {
    let (replies, input) = (&job.replies, &job.input);
    let prompt_ids = choice.prompt_ids;
    // Continue from the last request's cache when this prompt starts with what it holds (same
    // images): only the rest is prefilled.
    let resume = match caches.last.take().filter(|last| last.images == choice.keys) {
        Some(last) => {
            let cached = pipeline.shared_positions(&last.ids, prompt_ids)?;
            (cached > 0).then_some((last.cache, cached))
        }
        None => None,
    };
    let mut generation = match resume {
        Some((cache, cached)) => Generation::resume(
            &mut pipeline.engine,
            &pipeline.tokenizer,
            request,
            cache,
            cached,
        )?,
        None => Generation::new(&mut pipeline.engine, &pipeline.tokenizer, request)?,
    };
    if let Some(top) = input.logprobs {
        generation = generation.with_logprobs(top);
    }
    metrics.prompt_tokens.inc_by(generation.prompt_len() as u64);
    if choice.index == 0 {
        let _ = replies.send(Reply::Started);
    }
    let mut last_token: Option<Instant> = None;
    let mut token_seen = |metrics: &Metrics| {
        let now = Instant::now();
        match (last_token, *first_token) {
            (None, None) => {
                metrics
                    .time_to_first_token
                    .observe((now - choice.arrived).as_secs_f64());
                *first_token = Some(now);
            }
            (Some(t), _) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
            (None, Some(_)) => {}
        }
        metrics.generated_tokens.inc();
        last_token = Some(now);
    };

    let index = choice.index;
    let mut stop = StopText::new(input.stop.clone());
    // Log-probabilities of tokens whose text the stop filter still holds back.
    let mut pending: Vec<LogprobEntry> = Vec::new();
    let finish_reason = loop {
        if replies.is_closed() {
            return Ok(None);
        }
        if Instant::now() >= job.deadline {
            return Err(timed_out(job));
        }
        match generation.next_event()? {
            Some(Event::Token { text_delta, .. }) => {
                token_seen(metrics);
                if let Some(lp) = generation.last_logprob() {
                    pending.push(logprob_entry(&pipeline.tokenizer, lp));
                }
                match stop.push(&text_delta) {
                    Filtered::Text(text) => send_text(replies, index, text, &mut pending),
                    Filtered::Stopped(text) => {
                        send_text(replies, index, text, &mut pending);
                        break "stop";
                    }
                }
            }
            Some(Event::Done { finish_reason, .. }) => {
                send_text(replies, index, stop.finish(), &mut pending);
                break finish_reason.as_str();
            }
            None => break generation.finish_reason().map_or("length", |r| r.as_str()),
        }
    };
    let _ = replies.send(Reply::ChoiceDone {
        index,
        finish_reason,
    });
    let (output, cache) = generation.into_parts();
    metrics
        .prompt_tokens_reused
        .inc_by(output.reused_positions as u64);
    // The cache holds the prompt and every generated token but the last.
    if let Some((_, fed)) = output.token_ids.split_last() {
        let mut ids = prompt_ids.to_vec();
        ids.extend(fed.iter().map(|&id| i64::from(id)));
        caches.last = Some(Resumable {
            cache,
            ids,
            images: choice.keys.to_vec(),
        });
    }
    Ok(Some((output.prompt_tokens, output.token_ids.len())))
}

fn send_text(
    replies: &mpsc::UnboundedSender<Reply>,
    index: usize,
    text: String,
    logprobs: &mut Vec<LogprobEntry>,
) {
    if !text.is_empty() || !logprobs.is_empty() {
        let _ = replies.send(Reply::Text(index, text, std::mem::take(logprobs)));
    }
}

/// One token's entry of `choices[].logprobs.content`: its text as the tokenizer decodes it alone,
/// those UTF-8 bytes, and its best alternatives.
fn logprob_entry(
    tokenizer: &carrot_runtime::prompt::PromptTokenizer,
    lp: &carrot_runtime::generate::TokenLogprob,
) -> LogprobEntry {
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let token = text(lp.id);
    LogprobEntry {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let token = text(id);
                TopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn a_full_queue_answers_429_with_retry_after_and_counts_nothing() {
        let (jobs, _rx) = mpsc::channel::<Job>(1);
        let metrics = Arc::new(Metrics::default());
        let queue = Queue {
            jobs,
            metrics: metrics.clone(),
        };
        let job = || Job {
            id: "chatcmpl-test".into(),
            input: JobInput {
                prompt: JobPrompt::Turns(Vec::new()),
                images: Vec::new(),
                params: Default::default(),
                stop: Vec::new(),
                logprobs: None,
                n: 1,
            },
            deadline: Instant::now(),
            timeout: Duration::ZERO,
            replies: mpsc::unbounded_channel().0,
        };
        queue.submit(job()).expect("room for one");
        let err = queue.submit(job()).expect_err("the queue is full");
        assert_eq!(metrics.waiting.get(), 1);
        let response = err.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "1");
    }
}
