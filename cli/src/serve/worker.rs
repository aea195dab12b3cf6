//! The model worker: one thread owns the pipeline and answers queued requests one at a time,
//! sending each request's text back over its own channel as it is generated.
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
use super::stop::{Filtered, StopText};
use carrot_runtime::engine::ImageFeatures;
use carrot_runtime::generate::{Event, Generation, Request};
use carrot_runtime::pipeline::{Pipeline, Prompt, split_prompt};

/// What the worker reports about one request, in this order: `Started`, any number of
/// `Text`, then `Done`; or `Failed` at any point, after which nothing follows.
#[derive(Debug)]
pub enum Reply {
    /// The prompt and images were accepted; generation begins.
    Started,
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

pub struct Job {
    pub input: JobInput,
    pub deadline: Instant,
    pub timeout: Duration,
    pub replies: mpsc::UnboundedSender<Reply>,
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
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Worker, Queue)> {
        let (jobs, mut rx) = mpsc::channel::<Job>(max_queue.max(1));
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("carrot-model".into())
            .spawn(move || {
                let mut pipeline = pipeline;
                while let Some(job) = rx.blocking_recv() {
                    m.waiting.dec();
                    m.running.inc();
                    let replies = job.replies.clone();
                    let outcome =
                        std::panic::catch_unwind(AssertUnwindSafe(|| run(&mut pipeline, &job, &m)));
                    m.running.dec();
                    m.finished(matches!(outcome, Ok(Ok(()))));
                    let failure = match outcome {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e),
                        Err(_) => Some(ApiError::internal(
                            "the model worker panicked on this request",
                        )),
                    };
                    if let Some(e) = failure {
                        let _ = replies.send(Reply::Failed(e));
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

fn timed_out(job: &Job) -> ApiError {
    ApiError::unavailable(
        "timeout",
        format!(
            "the request did not finish within {:.0} s (time in the queue included)",
            job.timeout.as_secs_f64()
        ),
    )
}

fn run(pipeline: &mut Pipeline, job: &Job, metrics: &Metrics) -> Result<(), ApiError> {
    let arrived = job.deadline - job.timeout;
    let replies = &job.replies;
    if replies.is_closed() {
        return Ok(());
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
    let parts = split_prompt(
        &prompt_ids,
        pipeline.engine.manifest.prompt.image_token_index,
    )?;
    metrics.images_encoded.inc_by(pixels.len() as u64);
    let features: Vec<ImageFeatures> = if pixels.is_empty() {
        Vec::new()
    } else {
        pipeline
            .engine
            .encode_images(&pixels)
            .map_err(carrot_runtime::pipeline::PipelineError::from)?
    };
    let request = Request {
        prompt: parts,
        images: features,
        options: pipeline.options(&input.params),
    };
    let mut generation = Generation::new(&mut pipeline.engine, &pipeline.tokenizer, &request)?;
    metrics.prompt_tokens.inc_by(generation.prompt_len() as u64);
    let _ = replies.send(Reply::Started);
    let mut last_token: Option<Instant> = None;
    let mut token_seen = |metrics: &Metrics| {
        let now = Instant::now();
        match last_token {
            None => metrics
                .time_to_first_token
                .observe((now - arrived).as_secs_f64()),
            Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
        }
        metrics.generated_tokens.inc();
        last_token = Some(now);
    };

    let mut stop = StopText::new(input.stop.clone());
    let finish_reason = loop {
        if replies.is_closed() {
            return Ok(());
        }
        if Instant::now() >= job.deadline {
            return Err(timed_out(job));
        }
        match generation.next_event()? {
            Some(Event::Token { text_delta, .. }) => {
                token_seen(metrics);
                match stop.push(&text_delta) {
                    Filtered::Text(text) => send_text(replies, text),
                    Filtered::Stopped(text) => {
                        send_text(replies, text);
                        break "stop";
                    }
                }
            }
            Some(Event::Done { finish_reason, .. }) => {
                send_text(replies, stop.finish());
                break finish_reason.as_str();
            }
            None => break generation.finish_reason().map_or("length", |r| r.as_str()),
        }
    };
    metrics
        .request_duration
        .observe(arrived.elapsed().as_secs_f64());
    let _ = replies.send(Reply::Done {
        finish_reason,
        prompt_tokens: generation.prompt_len(),
        completion_tokens: generation.token_ids().len(),
    });
    Ok(())
}

fn send_text(replies: &mpsc::UnboundedSender<Reply>, text: String) {
    if !text.is_empty() {
        let _ = replies.send(Reply::Text(text));
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
            input: JobInput {
                prompt: JobPrompt::Turns(Vec::new()),
                images: Vec::new(),
                params: Default::default(),
                stop: Vec::new(),
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
