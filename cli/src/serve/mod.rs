//! `carrot serve`: OpenAI's chat-completions API over HTTP for one loaded model.
//!
//! - `GET /health` → `{"status": "ok", "model": …}`
//! - `GET /v1/models` → the one model
//! - `POST /v1/chat/completions` → a `chat.completion`, or with `stream: true` server-sent
//!   `chat.completion.chunk` events ending with `data: [DONE]`
//!
//! The pipeline runs on one dedicated thread ([`worker`]) and answers requests one at a time;
//! handlers queue requests (at most [`Limits::max_queue`] wait) and read the answer back over a
//! channel. The server listens on loopback only unless told otherwise, and then refuses
//! `file://` image URLs; it never fetches anything from the network.

mod convert;
mod error;
mod handlers;
mod image_url;
mod openai;
mod stop;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Listen on a non-loopback address. The server has no authentication; with this flag it
    /// refuses file:// image URLs.
    #[arg(long)]
    pub allow_remote: bool,
    /// Most requests waiting while one is answered; more are refused with 503.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    pub max_queue: usize,
    /// Seconds a request may take, queueing included; then it ends with a 503 error.
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().request_timeout.as_secs())]
    pub request_timeout: u64,
}

/// Bounds on what clients can make the server do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests waiting while one runs.
    pub max_queue: usize,
    /// From arrival to the last token.
    pub request_timeout: Duration,
    /// Request body size (images come as base64 inside it).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queue: 16,
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 32 << 20,
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
}

/// Shared by all handlers.
#[derive(Debug)]
pub(crate) struct App {
    model: String,
    allow_remote: bool,
    limits: Limits,
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
    let manifest = &pipeline.engine.manifest;
    let capabilities = Capabilities {
        template: Template::from_manifest(&manifest.prompt.template),
        vision: pipeline.engine.has_vision(),
        file_urls: !settings.allow_remote,
    };
    let (worker, queue) =
        Worker::spawn(pipeline, settings.limits.max_queue).map_err(ServeError::Worker)?;
    let app = Arc::new(App {
        model: settings.model,
        allow_remote: settings.allow_remote,
        limits: settings.limits,
        capabilities,
        queue,
    });
    let router = Router::new()
        .route("/health", get(handlers::health))
        .route("/v1/models", get(handlers::models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            handlers::local_only,
        ))
        .layer(DefaultBodyLimit::max(settings.limits.max_body_bytes))
        .with_state(app);
    Ok((router, worker))
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

/// `carrot serve`: load the model, listen, answer until Ctrl-C.
pub fn run(args: &ServeArgs, load: &LoadOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime.block_on(listen(&args.host, args.port, args.allow_remote))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let pipeline = Pipeline::load(&args.model, load)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let settings = Settings {
        allow_remote: args.allow_remote,
        limits: Limits {
            max_queue: args.max_queue,
            request_timeout: Duration::from_secs(args.request_timeout),
            ..Limits::default()
        },
        ..Settings::for_model_dir(&args.model)
    };
    let model = settings.model.clone();
    let (router, worker) = router(pipeline, settings)?;
    tracing::info!(
        "serving {model} on http://{addr} (POST /v1/chat/completions, GET /health); Ctrl-C stops"
    );
    runtime.block_on(serve(listener, router, async {
        shutdown_signal().await;
        tracing::info!("stopping; finishing requests in flight");
    }))?;
    worker.join();
    Ok(())
}
