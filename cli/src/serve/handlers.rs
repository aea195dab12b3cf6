//! HTTP handlers: health, model list, chat completions (whole or streamed), and the guard that
//! keeps a loopback server from answering pages on other sites.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::App;
use super::convert::job_input;
use super::error::ApiError;
use super::openai::{ChatRequest, Choice, Chunk, Completion, Header, Logprobs, Usage};
use super::worker::{Job, Reply};

pub async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "model": app.model }))
}

/// 200 once the model is loaded, 503 before (a readiness probe).
pub async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.loaded.get().is_some() {
        Json(serde_json::json!({ "status": "ready", "model": app.model })).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "loading", "model": app.model })),
        )
            .into_response()
    }
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// With an API key, `/v1/` routes need `Authorization: Bearer KEY` (401 otherwise, in OpenAI's
/// error shape); health, readiness and metrics stay open for probes and scrapers.
pub async fn authorized(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key
        && request.uri().path().starts_with("/v1/")
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized(
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Compares without stopping at the first differing byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{ "id": app.model, "object": "model", "created": 0, "owned_by": "carrot" }],
    }))
}

pub async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(app, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat(app: Arc<App>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        kind: "invalid_request_error",
        code: Some("invalid_body"),
        message: e.body_text(),
    })?;
    let request: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("the request body is not a valid chat request: {e}"),
        )
    })?;
    let stream = request.stream.unwrap_or(false);
    let logprobs = request.logprobs.unwrap_or(false);
    let choices = request.n.unwrap_or(1) as usize;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let loaded = app.loaded.get().ok_or_else(|| {
        ApiError::unavailable(
            "loading",
            "the model is still loading; retry when GET /ready answers 200",
        )
    })?;
    let input = job_input(request, &loaded.capabilities)?;

    let (replies, mut rx) = mpsc::unbounded_channel();
    let timeout = app.limits.request_timeout;
    let header = Header::new(&app.model);
    loaded.queue.submit(Job {
        id: header.id.clone(),
        input,
        deadline: Instant::now() + timeout,
        timeout,
        replies,
    })?;
    match rx.recv().await {
        Some(Reply::Started) => {}
        Some(Reply::Failed(e)) => return Err(e),
        Some(_) | None => {
            return Err(ApiError::internal(
                "the model worker ended the request without an answer",
            ));
        }
    }
    if stream {
        Ok(streamed(header, rx, choices, include_usage, logprobs))
    } else {
        whole(header, rx, choices, logprobs).await
    }
}

async fn whole(
    header: Header,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    choices: usize,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let mut content = vec![String::new(); choices];
    let mut entries = vec![Vec::new(); choices];
    let mut finished = Vec::with_capacity(choices);
    while let Some(reply) = rx.recv().await {
        match reply {
            Reply::Text(index, text, lp) if index < choices => {
                content[index].push_str(&text);
                entries[index].extend(lp);
            }
            Reply::ChoiceDone {
                index,
                finish_reason,
            } if index < choices => {
                let lp = logprobs.then(|| Logprobs {
                    content: std::mem::take(&mut entries[index]),
                });
                let text = std::mem::take(&mut content[index]);
                finished.push(Choice::new(index as u32, text, lp, finish_reason));
            }
            Reply::Done {
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                return Ok(Json(Completion::new(&header, finished, usage)).into_response());
            }
            Reply::Failed(e) => return Err(e),
            Reply::Started | Reply::Text(..) | Reply::ChoiceDone { .. } => {}
        }
    }
    Err(ApiError::internal(
        "the model worker ended the request without an answer",
    ))
}

/// Server-sent events: the role chunk, one chunk per piece of text, the finish chunk, the
/// usage chunk when asked for, then `[DONE]`. A failure mid-stream is sent as an
/// `{"error": …}` event and ends the stream.
fn streamed(
    header: Header,
    rx: mpsc::UnboundedReceiver<Reply>,
    choices: usize,
    include_usage: bool,
    logprobs: bool,
) -> Response {
    struct State {
        rx: mpsc::UnboundedReceiver<Reply>,
        header: Header,
        include_usage: bool,
        pending: std::collections::VecDeque<SseEvent>,
        ended: bool,
    }
    let first: std::collections::VecDeque<SseEvent> = (0..choices)
        .map(|i| json_event(&Chunk::role(&header).at(i as u32)))
        .collect();
    let state = State {
        rx,
        header,
        include_usage,
        pending: first,
        ended: false,
    };
    let events = futures_util::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(event) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.ended {
                return None;
            }
            match st.rx.recv().await {
                Some(Reply::Text(index, text, lp)) => {
                    let lp = logprobs.then_some(Logprobs { content: lp });
                    let chunk = Chunk::content_with(&st.header, text, lp).at(index as u32);
                    st.pending.push_back(json_event(&chunk));
                }
                Some(Reply::ChoiceDone {
                    index,
                    finish_reason,
                }) => {
                    let chunk = Chunk::finish(&st.header, finish_reason).at(index as u32);
                    st.pending.push_back(json_event(&chunk));
                }
                Some(Reply::Done {
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    if st.include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens);
                        st.pending
                            .push_back(json_event(&Chunk::usage(&st.header, usage)));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
                Some(Reply::Failed(e)) => {
                    st.pending
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    st.ended = true;
                }
                Some(Reply::Started) => {}
                None => {
                    let e =
                        ApiError::internal("the model worker ended the request without an answer");
                    st.pending
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn json_event(value: &impl serde::Serialize) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(e) => SseEvent::default().data(
            ApiError::internal(format!("cannot serialise a chunk: {e}"))
                .body()
                .to_string(),
        ),
    }
}

/// On a loopback server, refuse requests that name another host (DNS rebinding) or come from
/// a page on another origin, so that a web page cannot drive the model or read local images.
pub async fn local_only(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if !app.allow_remote {
        let headers = request.headers();
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or_default();
            if !is_loopback_host(host) {
                return ApiError::forbidden(
                    "forbidden_host",
                    format!("host `{host}` is not a loopback name"),
                )
                .into_response();
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            if !host.is_some_and(is_loopback_host) {
                return ApiError::forbidden(
                    "forbidden_origin",
                    format!("requests from origin `{origin}` are refused"),
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

/// `localhost`, a loopback IP (`127.0.0.1`, `[::1]`), each with an optional port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.chars().all(|c| c.is_ascii_digit()) =>
            {
                name
            }
            Some(_) => host,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "localhost.evil.example",
            "[::2]:80",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
