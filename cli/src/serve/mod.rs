//! `carrot serve`: OpenAI's chat-completions API over HTTP for one loaded model.
//!
//! - `GET /health` → `{"status": "ok", "model": …}` (the process is up)
//! - `GET /ready` → 200 `{"status": "ready"}` once the graphs are loaded, 503 `{"status":
//!   "loading"}` before
//! - `GET /metrics` → Prometheus text ([`metrics`])
//! - `GET /v1/models` → the one model
//! - `POST /v1/chat/completions` → a `chat.completion`, or with `stream: true` server-sent
//!   `chat.completion.chunk` events ending with `data: [DONE]`
//!
//! The pipeline runs on one dedicated thread ([`worker`]) that batches up to
//! [`Limits::max_batch`] requests continuously ([`batch`]); handlers queue requests (at most
//! [`Limits::max_queue`] wait) and read the answer back over a channel. The server listens on loopback only unless told otherwise, and then refuses
//! `file://` image URLs; it never fetches anything from the network.

mod batch;
mod convert;
mod error;
mod handlers;
mod image_url;
pub mod metrics;
mod openai;
mod stop;
mod structured;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use convert::{Capabilities, Template};
pub use error::ApiError;
pub use stop::{Filtered, StopText};
pub use worker::{Queue, Worker};

use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::Pipeline;

/// `carrot serve` flags besides the runtime ones (device, ORT library, threads).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Exported directory (carrot.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Listen on a non-loopback address (needs --api-key); image URLs may then not be file://.
    #[arg(long)]
    pub allow_remote: bool,
    /// Require `Authorization: Bearer KEY` on /v1/ requests (also from $CARROT_API_KEY).
    #[arg(
        long,
        env = "CARROT_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// The model name in responses and /v1/models (default: the model directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Most requests waiting while --max-batch are answered; more are refused with 429.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    pub max_queue: usize,
    /// Requests generating at once; with an `ort`-flavor export they decode in one batch.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_batch, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_batch: usize,
    /// Prompt positions prefilled per step; a long prompt (an image) is split so the requests
    /// already generating keep flowing.
    #[arg(long, value_name = "N", default_value_t = Limits::default().prefill_chunk, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub prefill_chunk: usize,
    /// Seconds a request may take, queueing included; then it ends with a 503 error.
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().request_timeout.as_secs())]
    pub request_timeout: u64,
    /// Images whose vision features are kept, by content, for requests that repeat them.
    #[arg(long, value_name = "N", default_value_t = Limits::default().image_cache)]
    pub image_cache: usize,
    /// After SIGTERM or Ctrl-C: seconds to finish the requests in flight before closing them.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_DRAIN_SECONDS)]
    pub drain_timeout: f64,
}

/// Default `--drain-timeout`: Kubernetes' default termination grace period is 30 s.
pub const DEFAULT_DRAIN_SECONDS: f64 = 25.0;

/// Bounds on what clients can make the server do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests waiting while one runs.
    pub max_queue: usize,
    /// From arrival to the last token.
    pub request_timeout: Duration,
    /// Request body size (images come as base64 inside it).
    pub max_body_bytes: usize,
    /// Images whose features are kept for reuse.
    pub image_cache: usize,
    /// Requests generating at once, in one batch.
    pub max_batch: usize,
    /// Prompt positions prefilled per step, between the decode steps of the others.
    pub prefill_chunk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queue: 16,
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 32 << 20,
            image_cache: 16,
            max_batch: 8,
            prefill_chunk: 256,
        }
    }
}

/// How the router answers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The name reported in responses and by `/health`.
    pub model: String,
    /// Serving beyond loopback: no host/origin check, no `file://` images.
    pub allow_remote: bool,
    pub limits: Limits,
    /// Bearer token required on `/v1/` routes.
    pub api_key: Option<String>,
}

impl Settings {
    /// Loopback serving with default limits; the model is named after its directory.
    pub fn for_model_dir(dir: &Path) -> Self {
        let model = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map_or_else(|| "carrot".to_owned(), |n| n.to_string_lossy().into_owned());
        Self {
            model,
            allow_remote: false,
            limits: Limits::default(),
            api_key: None,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum ServeError {
    #[error("cannot resolve host `{host}`: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host `{host}` resolves to no address")]
    NoAddress { host: String },
    #[error(
        "refusing to listen on {addr}: it is not a loopback address and the server has no \
         authentication (use 127.0.0.1 or ::1, or pass --allow-remote)"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the model worker thread: {0}")]
    Worker(#[source] std::io::Error),
    #[error(
        "--allow-remote needs --api-key (or CARROT_API_KEY): a server beyond loopback must authenticate its clients"
    )]
    NoApiKey,
}

/// Shared by all handlers.
#[derive(Debug)]
pub(crate) struct App {
    model: String,
    allow_remote: bool,
    limits: Limits,
    api_key: Option<String>,
    metrics: Arc<metrics::Metrics>,
    /// Set once the graphs are loaded and the worker runs.
    loaded: OnceLock<Loaded>,
}

#[derive(Debug)]
pub(crate) struct Loaded {
    capabilities: Capabilities,
    queue: Queue,
}

/// Resolve `host` and listen on its first address that binds (port 0: any free port).
/// Without `allow_remote`, every address `host` resolves to must be a loopback address.
pub async fn listen(host: &str, port: u16, allow_remote: bool) -> Result<TcpListener, ServeError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ServeError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    if let Some(&addr) = addrs
        .iter()
        .find(|a| !allow_remote && !a.ip().is_loopback())
    {
        return Err(ServeError::NotLoopback { addr });
    }
    let mut last = None;
    for &addr in &addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(source) => last = Some(ServeError::Bind { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ServeError::NoAddress {
        host: host.to_owned(),
    }))
}

/// The HTTP routes around a worker thread that owns `pipeline`. Join the [`Worker`] after
/// the router (every clone of it) has been dropped.
pub fn router(pipeline: Pipeline, settings: Settings) -> Result<(Router, Worker), ServeError> {
    let (router, loading) = router_loading(settings);
    let worker = loading.attach(pipeline)?;
    Ok((router, worker))
}

/// The HTTP routes before the model is loaded: `/health` and `/metrics` answer, `/ready` and
/// the API answer 503 until [`Loading::attach`] hands over the pipeline.
pub fn router_loading(settings: Settings) -> (Router, Loading) {
    let app = Arc::new(App {
        model: settings.model,
        allow_remote: settings.allow_remote,
        limits: settings.limits,
        api_key: settings.api_key.filter(|k| !k.is_empty()),
        metrics: Arc::new(metrics::Metrics::default()),
        loaded: OnceLock::new(),
    });
    let router = Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            handlers::authorized,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            handlers::local_only,
        ))
        .layer(DefaultBodyLimit::max(settings.limits.max_body_bytes))
        .with_state(app.clone());
    (router, Loading { app })
}

/// A router waiting for its model.
#[derive(Debug)]
pub struct Loading {
    app: Arc<App>,
}

impl Loading {
    /// Start the worker on `pipeline`; from now on the server is ready.
    pub fn attach(self, pipeline: Pipeline) -> Result<Worker, ServeError> {
        let manifest = &pipeline.engine.manifest;
        let capabilities = Capabilities {
            template: Template::from_manifest(&manifest.prompt.template),
            vision: pipeline.engine.has_vision(),
            file_urls: !self.app.allow_remote,
        };
        let (worker, queue) = Worker::spawn(pipeline, self.app.limits, self.app.metrics.clone())
            .map_err(ServeError::Worker)?;
        let _ = self.app.loaded.set(Loaded {
            capabilities,
            queue,
        });
        Ok(worker)
    }
}

/// Answer connections on `listener` until `shutdown` completes, then finish the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Completes on Ctrl-C (and SIGTERM on Unix).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// `carrot serve`: listen, load the model (`/ready` answers 503 meanwhile), answer until Ctrl-C
/// or SIGTERM, then finish the requests in flight.
pub fn run(args: &ServeArgs, load: &LoadOptions) -> anyhow::Result<()> {
    let api_key = args.api_key.clone().filter(|k| !k.is_empty());
    if args.allow_remote && api_key.is_none() {
        return Err(ServeError::NoApiKey.into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime.block_on(listen(&args.host, args.port, args.allow_remote))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let defaults = Settings::for_model_dir(&args.model);
    let settings = Settings {
        model: args.served_model_name.clone().unwrap_or(defaults.model),
        allow_remote: args.allow_remote,
        limits: Limits {
            max_queue: args.max_queue,
            request_timeout: Duration::from_secs(args.request_timeout),
            image_cache: args.image_cache,
            max_batch: args.max_batch,
            prefill_chunk: args.prefill_chunk,
            ..Limits::default()
        },
        api_key,
    };
    let model = settings.model.clone();
    let (router, loading) = router_loading(settings);
    let drain = Duration::try_from_secs_f64(args.drain_timeout).map_err(|_| {
        anyhow::anyhow!(
            "--drain-timeout {}: expected a number of seconds",
            args.drain_timeout
        )
    })?;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(serve(listener, router, async move {
        shutdown_signal().await;
        tracing::info!(
            "stopping: no new connections; finishing the requests in flight (at most {:.0} s)",
            drain.as_secs_f64()
        );
        let _ = stopping_tx.send(());
    }));
    tracing::info!(
        "loading {} (GET /ready answers 503 until done)",
        args.model.display()
    );
    let pipeline = Pipeline::load(&args.model, load)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let worker = loading.attach(pipeline)?;
    tracing::info!(
        "serving {model} on http://{addr} (POST /v1/chat/completions, GET /health, /ready, /metrics); Ctrl-C stops"
    );
    runtime.block_on(async {
        let deadline = async {
            match stopping_rx.await {
                Ok(()) => tokio::time::sleep(drain).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            served = server => served.context("the HTTP server task failed")?.map_err(anyhow::Error::from),
            () = deadline => {
                tracing::warn!("drain deadline passed; closing the requests still running");
                Ok(())
            }
        }
    })?;
    // Dropping the runtime drops the router and its queue: the worker stops at its next token
    // if a request is still running, then ends.
    runtime.shutdown_timeout(Duration::from_secs(1));
    worker.join();
    Ok(())
}
