//! The model worker: one thread owns the pipeline and answers queued requests, up to
//! `max_batch` at once, sending each request's text back over its own channel as it is
//! generated.
//!
//! Requests are batched continuously ([`super::batch`]): each takes a row of one batch cache as
//! soon as a row is free, its prompt is prefilled a chunk per step between the decode steps of
//! the others, and it leaves when done, freeing its row for the next request in the queue.
//! Requests are admitted in arrival order; at most `max_queue` wait.
//!
//! The worker keeps image features by the content of the preprocessed pixels (a repeated image
//! is not encoded again), and each row keeps what its last request left, so a request that
//! continues that conversation prefills only what follows their common prefix.
//!
//! A request stops early when its client goes away (its reply channel closes), when a stop
//! string occurs, or when its deadline passes.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Limits;
use super::batch::Scheduler;
use super::convert::JobInput;
use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::{LogprobEntry, TopLogprob};
use carrot_runtime::engine::ImageFeatures;
use carrot_runtime::pipeline::Pipeline;

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
    pub(super) fn client_gone(&self) -> bool {
        self.replies.is_closed()
    }

    pub(super) fn arrived(&self) -> Instant {
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
    /// Starts the thread.
    pub fn spawn(
        pipeline: Pipeline,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Worker, Queue)> {
        let (jobs, rx) = mpsc::channel::<Job>(limits.max_queue.max(1));
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("carrot-model".into())
            .spawn(move || match Scheduler::new(pipeline, limits, m) {
                Ok(scheduler) => scheduler.run(rx),
                Err(e) => tracing::error!("cannot start the model worker: {}", e.message),
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

/// How a request ended, for its log line.
pub(super) enum Outcome<'a> {
    Ok {
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    ClientGone,
    Error(&'a ApiError),
}

/// One structured line per request (`tracing` target `carrot::request`): id, outcome, tokens,
/// time in the queue and in the model.
pub(super) fn log_request(job: &Job, started: Instant, outcome: Outcome<'_>) {
    let queued_ms = (started - job.arrived()).as_secs_f64() * 1e3;
    let run_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome {
        Outcome::Ok {
            prompt_tokens,
            completion_tokens,
        } => tracing::info!(
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
        Outcome::ClientGone => tracing::info!(
            target: "carrot::request",
            id = %job.id,
            outcome = "client_gone",
            queued_ms = format_args!("{queued_ms:.1}"),
            run_ms = format_args!("{run_ms:.1}"),
        ),
        Outcome::Error(e) => tracing::warn!(
            target: "carrot::request",
            id = %job.id,
            outcome = "error",
            status = e.status.as_u16(),
            error = %e.message,
            queued_ms = format_args!("{queued_ms:.1}"),
            run_ms = format_args!("{run_ms:.1}"),
        ),
    }
}

pub(super) fn timed_out(job: &Job) -> ApiError {
    ApiError::unavailable(
        "timeout",
        format!(
            "the request did not finish within {:.0} s (time in the queue included)",
            job.timeout.as_secs_f64()
        ),
    )
}

/// Content hash of one preprocessed image.
pub(super) type ImageKey = [u8; 32];

pub(super) fn image_key(pixels: &[f32]) -> ImageKey {
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

/// Image features kept by content, most recently used first.
pub(super) struct ImageCache {
    images: Vec<(ImageKey, ImageFeatures)>,
    image_capacity: usize,
}

impl ImageCache {
    pub(super) fn new(image_capacity: usize) -> Self {
        Self {
            images: Vec::new(),
            image_capacity,
        }
    }

    /// The features of each image: from the cache, or encoded (all misses in one batch).
    pub(super) fn features(
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

pub(super) fn send_text(
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
pub(super) fn logprob_entry(
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

    use super::super::convert::JobPrompt;
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
                response_format: None,
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
