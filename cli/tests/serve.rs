//! `carrot serve` over real HTTP on an ephemeral loopback port, against the fixture model
//! exported here (fp32): answers equal `Pipeline::generate`, streaming adds up to the whole
//! answer, bad requests get OpenAI-style 400s, and the limits hold.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use carrot::serve::{self, Limits, Settings};
use carrot_runtime::engine::LoadOptions;
use carrot_runtime::pipeline::{ImageSource, Params, Pipeline, Prompt};
use carrot_runtime::prompt::Message;
use carrot_tests::workspace_root as root;
use serde_json::{Value, json};

const QUESTION: &str = "What is in this picture?";

fn chelsea() -> PathBuf {
    root().join("fixtures/images/chelsea.png")
}

/// `fixtures/models/NAME` exported (fp32) with the Llama 3 tokenizer.
fn export(name: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve/{name}-fp32"));
    carrot::demo::export_fixture(
        name,
        &out,
        carrot_graphs::config::DType::F32,
        carrot_graphs::llama::Logits::All,
        false,
    )
    .unwrap_or_else(|e| panic!("exporting {name}: {e:#}"));
    out
}

/// The Carrot (vision) fixture, exported once per process.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| export("carrot-tiny"))
}

fn load(dir: &Path) -> Pipeline {
    Pipeline::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// A server on its own thread and runtime; it stops when the returned sender is dropped.
fn start(dir: &Path, settings: Settings) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let pipeline = load(dir);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move {
            let listener = serve::listen("127.0.0.1", 0, false).await.expect("listen");
            addr_tx
                .send(listener.local_addr().expect("address"))
                .expect("report address");
            let (router, worker) = serve::router(pipeline, settings).expect("router");
            serve::serve(listener, router, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("serve");
            worker.join();
        });
    });
    (
        addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server address"),
        stop_tx,
    )
}

/// The server with default settings, shared by the tests of this process.
fn server() -> SocketAddr {
    static SERVER: OnceLock<(SocketAddr, tokio::sync::oneshot::Sender<()>)> = OnceLock::new();
    SERVER
        .get_or_init(|| start(model_dir(), Settings::for_model_dir(model_dir())))
        .0
}

struct HttpResponse {
    status: u16,
    headers: String,
    body: String,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: not JSON: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to the end (chunked bodies de-chunked).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    extra_headers: &[(&str, &str)],
) -> HttpResponse {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !extra_headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in extra_headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, rest) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    HttpResponse {
        status,
        headers: head.to_owned(),
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

fn post(body: &Value) -> HttpResponse {
    http(server(), "POST", "/v1/chat/completions", Some(body), &[])
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("image");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_question(url: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "carrot-tiny",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
        "temperature": 0,
        "max_tokens": 16,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

/// The greedy answer `Pipeline::generate` gives directly.
fn direct_answer() -> &'static String {
    static ANSWER: OnceLock<String> = OnceLock::new();
    ANSWER.get_or_init(|| {
        let params = Params {
            max_new_tokens: Some(16),
            temperature: Some(0.0),
            ..Params::default()
        };
        let prompt = Prompt::Text {
            text: QUESTION.into(),
            raw: false,
        };
        let answer = load(model_dir())
            .generate(&prompt, &[ImageSource::Path(chelsea())], &params, |_| {})
            .unwrap_or_else(|e| panic!("direct generation: {e}"));
        assert_eq!(
            answer.output.token_ids.len(),
            16,
            "the fixture answer runs to the token limit"
        );
        answer.output.text
    })
}

fn content(response: &Value) -> &str {
    response["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
}

#[test]
fn health_names_the_model() {
    let response = http(server(), "GET", "/health", None, &[]);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.json(),
        json!({"status": "ok", "model": "carrot-tiny-fp32"})
    );
}

#[test]
fn greedy_completion_equals_the_pipeline() {
    let response = post(&image_question(&data_url(&chelsea()), json!({})));
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "carrot-tiny-fp32");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{body}"
    );
    assert!(body["created"].as_u64().is_some(), "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&body), direct_answer());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 16, "{body}");
    assert_eq!(usage["prompt_tokens"], 59, "{body}");
    assert_eq!(usage["total_tokens"], 75, "{body}");
}

#[test]
fn a_file_url_gives_the_same_answer_as_a_data_url() {
    let url = format!("file://{}", chelsea().display());
    let response = post(&image_question(
        &url,
        json!({"max_completion_tokens": 16, "max_tokens": 3}),
    ));
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(content(&response.json()), direct_answer());
}

#[test]
fn streamed_chunks_add_up_to_the_answer() {
    let response = post(&image_question(
        &data_url(&chelsea()),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    ));
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .headers
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        response.headers
    );
    let data: Vec<&str> = response
        .body
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{}", response.body);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{chunks:?}"
    );
    assert!(
        chunks.iter().all(|c| c["id"] == chunks[0]["id"]),
        "one id for all chunks"
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(&text, direct_answer());
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);
    let usage = chunks.last().map(|c| &c["usage"]).expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 16, "{usage}");
}

#[test]
fn a_stop_string_ends_and_trims_the_answer() {
    let full = direct_answer();
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let (start, _) = chars[chars.len() / 2];
    let end = chars
        .get(chars.len() / 2 + 2)
        .map_or(full.len(), |&(i, _)| i);
    let stop = &full[start..end];
    let expected = &full[..full.find(stop).expect("stop string in the answer")];
    for stream in [false, true] {
        let response = post(&image_question(
            &data_url(&chelsea()),
            json!({"stop": [stop], "stream": stream}),
        ));
        assert_eq!(response.status, 200, "{}", response.body);
        let (text, finish) = if stream {
            let chunks: Vec<Value> = response
                .body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).expect("chunk"))
                .collect();
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            let finish = chunks
                .iter()
                .rev()
                .map(|c| c["choices"][0]["finish_reason"].clone())
                .find(|f| !f.is_null());
            (text, finish.unwrap_or(Value::Null))
        } else {
            let body = response.json();
            (
                content(&body).to_owned(),
                body["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, expected, "stop {stop:?}, stream {stream}");
        assert_eq!(finish, "stop", "stream {stream}");
    }
}

fn assert_400(body: Value, needle: &str) {
    let response = post(&body);
    assert_eq!(response.status, 400, "{body}: {}", response.body);
    let error = &response.json()["error"];
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{body}: message {message:?} lacks {needle:?}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    assert!(error.get("code").is_some(), "{error}");
}

#[test]
fn bad_requests_are_refused_with_a_message() {
    assert_400(json!({"model": "m"}), "messages");
    assert_400(json!({"messages": []}), "at least one message");
    assert_400(
        json!({"messages": [{"role": "tool", "content": "x"}]}),
        "role `tool`",
    );
    assert_400(
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        "max_tokens",
    );
    assert_400(
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 17}),
        "`n` = 17",
    );
    assert_400(
        image_question("data:image/png;base64,not*base64", json!({})),
        "invalid base64",
    );
    assert_400(
        image_question("data:image/png;base64,aGVsbG8=", json!({})),
        "cannot decode image",
    );
    assert_400(
        image_question("http://example.com/cat.png", json!({})),
        "never fetches",
    );
    assert_400(
        image_question("https://example.com/cat.png", json!({})),
        "never fetches",
    );
    assert_400(
        image_question("file:///nonexistent/cat.png", json!({})),
        "/nonexistent/cat.png",
    );
    assert_400(
        json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(&chelsea())}}]}]}),
        "first user message",
    );
    let response = http(server(), "POST", "/v1/chat/completions", None, &[]);
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(response.json()["error"]["message"].is_string());
}

#[test]
fn a_system_message_is_ignored_by_the_bunny_template() {
    let mut body = image_question(&data_url(&chelsea()), json!({}));
    if let Some(messages) = body["messages"].as_array_mut() {
        messages.insert(0, json!({"role": "system", "content": "Answer in French."}));
    }
    let response = post(&body);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(content(&response.json()), direct_answer());
}

#[test]
fn only_loopback_names_and_origins_are_served() {
    let refused = http(
        server(),
        "GET",
        "/health",
        None,
        &[("Host", "evil.example")],
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    let refused = http(
        server(),
        "GET",
        "/health",
        None,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    let allowed = http(
        server(),
        "GET",
        "/health",
        None,
        &[
            ("Host", "localhost:1234"),
            ("Origin", "http://127.0.0.1:3000"),
        ],
    );
    assert_eq!(allowed.status, 200, "{}", allowed.body);
}

#[test]
fn listening_beyond_loopback_needs_allow_remote() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = runtime
        .block_on(serve::listen("0.0.0.0", 0, false))
        .expect_err("0.0.0.0 refused");
    assert!(err.to_string().contains("not a loopback address"), "{err}");
    let listener = runtime
        .block_on(serve::listen("localhost", 0, false))
        .expect("localhost");
    assert!(listener.local_addr().expect("address").ip().is_loopback());
}

#[test]
fn a_request_past_its_deadline_gets_503() {
    let settings = Settings {
        limits: Limits {
            request_timeout: Duration::ZERO,
            ..Limits::default()
        },
        ..Settings::for_model_dir(model_dir())
    };
    let (addr, _stop) = start(model_dir(), settings);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let response = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "timeout");
}

#[test]
fn a_chat_template_model_takes_system_messages_and_no_images() {
    let dir = export("llama-base-tiny");
    let messages = [
        Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        Message {
            role: "user".into(),
            content: "Name a colour.".into(),
        },
    ];
    let mut pipeline = load(&dir);
    let ids: Vec<i64> = pipeline
        .tokenizer
        .encode_chat(&messages)
        .expect("chat ids")
        .into_iter()
        .map(i64::from)
        .collect();
    let params = Params {
        max_new_tokens: Some(8),
        temperature: Some(0.0),
        ..Params::default()
    };
    let direct = pipeline
        .generate_ids(&ids, &[], &params, |_| {})
        .expect("direct generation");
    drop(pipeline);

    let (addr, _stop) = start(&dir, Settings::for_model_dir(&dir));
    let body = json!({"messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        "temperature": 0, "max_tokens": 8});
    let response = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(content(&body), direct.output.text);
    assert_eq!(
        body["usage"]["completion_tokens"],
        direct.output.token_ids.len()
    );
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());

    let with_image = image_question(&data_url(&chelsea()), json!({}));
    let response = http(addr, "POST", "/v1/chat/completions", Some(&with_image), &[]);
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(response.body.contains("text-only"), "{}", response.body);
}

/// A server whose model is attached only when the returned sender fires: `/ready` is 503 and
/// the API refuses with 503 `loading` until then.
#[test]
fn ready_is_503_until_the_model_is_attached_then_200() {
    let pipeline = load(model_dir());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (attach_tx, attach_rx) = std::sync::mpsc::channel::<()>();
    let settings = Settings {
        model: "carrot-served".into(),
        ..Settings::for_model_dir(model_dir())
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(serve::listen("127.0.0.1", 0, false))
            .expect("listen");
        addr_tx
            .send(listener.local_addr().expect("address"))
            .expect("report address");
        let (router, loading) = serve::router_loading(settings);
        let server = runtime.spawn(serve::serve(listener, router, std::future::pending()));
        attach_rx.recv().expect("attach signal");
        let _worker = loading.attach(pipeline).expect("attach");
        let _ = runtime.block_on(server);
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server address");
    let before = http(addr, "GET", "/ready", None, &[]);
    assert_eq!(before.status, 503, "{}", before.body);
    assert_eq!(before.json()["status"], "loading");
    assert_eq!(http(addr, "GET", "/health", None, &[]).status, 200);
    let body = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2});
    let early = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(early.status, 503, "{}", early.body);
    assert_eq!(early.json()["error"]["code"], "loading");

    attach_tx.send(()).expect("attach");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http(addr, "GET", "/ready", None, &[]).status != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["model"], "carrot-served");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[test]
fn metrics_count_requests_tokens_images_and_latencies() {
    let (addr, _stop) = start(model_dir(), Settings::for_model_dir(model_dir()));
    let before = http(addr, "GET", "/metrics", None, &[]);
    assert_eq!(before.status, 200);
    assert!(
        before
            .headers
            .to_ascii_lowercase()
            .contains("application/openmetrics-text"),
        "{}",
        before.headers
    );
    assert_eq!(metric(&before.body, "carrot_generated_tokens_total"), 0.0);
    assert_eq!(metric(&before.body, "carrot_requests_waiting"), 0.0);
    let image =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(chelsea()).expect("photo"));
    let body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}}
        ]}],
        "max_tokens": 5,
        "temperature": 0,
    });
    let answer = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let usage = &answer.json()["usage"];
    let after = http(addr, "GET", "/metrics", None, &[]).body;
    assert_eq!(
        metric(&after, "carrot_generated_tokens_total"),
        usage["completion_tokens"]
            .as_f64()
            .expect("completion_tokens")
    );
    assert_eq!(
        metric(&after, "carrot_prompt_tokens_total"),
        usage["prompt_tokens"].as_f64().expect("prompt_tokens")
    );
    assert_eq!(metric(&after, "carrot_images_encoded_total"), 1.0);
    assert_eq!(metric(&after, "carrot_requests_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(metric(&after, "carrot_requests_running"), 0.0);
    assert_eq!(
        metric(&after, "carrot_time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(
        metric(&after, "carrot_inter_token_latency_seconds_count"),
        usage["completion_tokens"].as_f64().expect("n") - 1.0
    );
}

#[test]
fn an_api_key_guards_the_api_but_not_the_probes() {
    let settings = Settings {
        api_key: Some("s3cret".into()),
        ..Settings::for_model_dir(model_dir())
    };
    let (addr, _stop) = start(model_dir(), settings);
    let body = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2});
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cre"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &headers);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert_eq!(http(addr, "GET", "/v1/models", None, &headers).status, 401);
    }
    let ok = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(http(addr, "GET", open, None, &[]).status, 200, "{open}");
    }
}

#[test]
fn serving_beyond_loopback_without_an_api_key_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carrot"))
        .args(["serve", "--model"])
        .arg(model_dir())
        .args(["--host", "0.0.0.0", "--port", "0", "--allow-remote"])
        .env_remove("CARROT_API_KEY")
        .output()
        .expect("run carrot serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--allow-remote needs --api-key"),
        "{stderr}"
    );
}

fn image_message(text: &str) -> Value {
    let image =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(chelsea()).expect("photo"));
    json!({"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}}
    ]})
}

fn chat_text(addr: SocketAddr, messages: &Value) -> (String, Value) {
    let body = json!({"messages": messages, "max_tokens": 6, "temperature": 0});
    let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned(),
        v["usage"].clone(),
    )
}

/// A repeated image is not encoded again, and a request that continues the previous one's
/// conversation prefills only its new positions — with the answer a fresh server gives.
#[test]
fn repeated_images_and_continued_conversations_come_from_the_caches() {
    let (addr, _stop) = start(model_dir(), Settings::for_model_dir(model_dir()));
    let first = json!([image_message(QUESTION)]);
    let (answer, usage) = chat_text(addr, &first);
    let (again, _) = chat_text(addr, &first);
    assert_eq!(again, answer, "the same request, answered from the caches");
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    assert_eq!(metric(&m, "carrot_images_encoded_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "carrot_image_cache_hits_total"), 1.0);
    let reused_before = metric(&m, "carrot_prompt_tokens_reused_total");
    assert!(
        reused_before > 0.0,
        "the repeat reuses the first request's prompt"
    );

    let turn2 = json!([
        image_message(QUESTION),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"}
    ]);
    let (continued, usage2) = chat_text(addr, &turn2);
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    let reused = metric(&m, "carrot_prompt_tokens_reused_total") - reused_before;
    let prompt2 = usage2["prompt_tokens"].as_f64().expect("prompt_tokens");
    // Everything up to the first answer (prompt and answer, but for the answer's last token and
    // whatever the template re-renders differently) comes from the cache.
    assert!(
        reused >= usage["prompt_tokens"].as_f64().expect("prompt_tokens") && reused < prompt2,
        "reused {reused} of {prompt2}"
    );
    assert_eq!(metric(&m, "carrot_images_encoded_total"), 1.0);

    let (fresh_addr, _fresh_stop) = start(model_dir(), Settings::for_model_dir(model_dir()));
    let (fresh, _) = chat_text(fresh_addr, &turn2);
    assert_eq!(
        continued, fresh,
        "answer from the cached prefix vs a fresh prefill"
    );

    // Turn 3 prefills only what follows turn 2's prompt and answer.
    let turn3 = json!([
        image_message(QUESTION),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"},
        {"role": "assistant", "content": continued},
        {"role": "user", "content": "Is it asleep?"}
    ]);
    let reused_before = metric(&m, "carrot_prompt_tokens_reused_total");
    let (_, usage3) = chat_text(addr, &turn3);
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    let reused = metric(&m, "carrot_prompt_tokens_reused_total") - reused_before;
    let prompt3 = usage3["prompt_tokens"].as_f64().expect("prompt_tokens");
    assert!(
        reused >= prompt2 && reused < prompt3,
        "turn 3 reused {reused} of {prompt3} (turn 2's prompt: {prompt2})"
    );
}

#[test]
fn an_image_cache_of_zero_encodes_every_time() {
    let settings = Settings {
        limits: Limits {
            image_cache: 0,
            ..Limits::default()
        },
        ..Settings::for_model_dir(model_dir())
    };
    let (addr, _stop) = start(model_dir(), settings);
    let first = json!([image_message(QUESTION)]);
    chat_text(addr, &first);
    chat_text(addr, &first);
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    assert_eq!(metric(&m, "carrot_images_encoded_total"), 2.0, "{m}");
    assert_eq!(metric(&m, "carrot_image_cache_hits_total"), 0.0);
}

#[test]
fn logprobs_report_every_token_with_its_alternatives() {
    let addr = server();
    let body = json!({
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3,
    });
    let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content")
        .clone();
    assert_eq!(
        entries.len() as u64,
        v["usage"]["completion_tokens"].as_u64().expect("usage")
    );
    for e in &entries {
        let lp = e["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0, "{e}");
        let top = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{e}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["logprob"], e["logprob"], "{e}");
        assert_eq!(top[0]["token"], e["token"], "{e}");
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        assert_eq!(bytes, e["token"].as_str().expect("token").as_bytes());
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
    }
    // Without the flag there is none.
    let plain = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2});
    let v = http(addr, "POST", "/v1/chat/completions", Some(&plain), &[]).json();
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");

    // Streamed: the entries of all chunks add up to the tokens.
    let streamed = json!({
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 5, "temperature": 0, "logprobs": true, "stream": true,
    });
    let r = http(addr, "POST", "/v1/chat/completions", Some(&streamed), &[]);
    let chunks: Vec<Value> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect();
    let streamed_entries: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    let tokens: Vec<&Value> = streamed_entries.iter().map(|e| &e["token"]).collect();
    let whole: Vec<&Value> = entries.iter().map(|e| &e["token"]).collect();
    assert_eq!(
        tokens, whole,
        "streamed and whole logprobs name the same tokens"
    );
    assert!(
        streamed_entries
            .iter()
            .all(|e| e["top_logprobs"] == json!([]))
    );
}

#[test]
fn bad_logprobs_requests_are_400s() {
    let addr = server();
    for (body, code) in [
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            "invalid_top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            "invalid_top_logprobs",
        ),
    ] {
        let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], code);
    }
}

fn choices_text(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{c}");
            c["message"]["content"]
                .as_str()
                .expect("content")
                .to_owned()
        })
        .collect()
}

/// `n` choices share the prompt's prefill (each after the first prefills one position); greedy
/// choices are equal, seeded sampled ones reproducible, the first equal to `n = 1`'s.
#[test]
fn n_choices_share_the_prefill() {
    let (addr, _stop) = start(model_dir(), Settings::for_model_dir(model_dir()));
    let ask = |extra: Value| {
        let mut body = json!({"messages": [image_message(QUESTION)], "max_tokens": 5});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let one = ask(json!({"temperature": 0}));
    let reused_before = metric(
        &http(addr, "GET", "/metrics", None, &[]).body,
        "carrot_prompt_tokens_reused_total",
    );
    let three = ask(json!({"temperature": 0, "n": 3}));
    let texts = choices_text(&three);
    assert_eq!(texts.len(), 3);
    assert!(
        texts.iter().all(|t| *t == choices_text(&one)[0]),
        "{texts:?}"
    );
    assert_eq!(
        three["usage"]["completion_tokens"],
        3 * one["usage"]["completion_tokens"].as_u64().expect("tokens")
    );
    let prompt = one["usage"]["prompt_tokens"].as_f64().expect("prompt");
    let reused = metric(
        &http(addr, "GET", "/metrics", None, &[]).body,
        "carrot_prompt_tokens_reused_total",
    ) - reused_before;
    assert_eq!(
        reused,
        3.0 * (prompt - 1.0),
        "every choice prefilled one position"
    );

    let sampled = json!({"temperature": 1.0, "seed": 11, "n": 2});
    let a = choices_text(&ask(sampled.clone()));
    let b = choices_text(&ask(sampled));
    assert_eq!(a, b, "seeded choices are reproducible");
    let single = choices_text(&ask(json!({"temperature": 1.0, "seed": 11})));
    assert_eq!(a[0], single[0]);

    // Streamed: chunks carry each choice's index, each choice ends with its finish chunk.
    let body = json!({"messages": [image_message(QUESTION)], "max_tokens": 5, "temperature": 0,
                      "n": 2, "stream": true});
    let r = http(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
    let mut streamed = vec![String::new(); 2];
    let mut finishes = 0;
    for data in r.body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk");
        let c = &chunk["choices"][0];
        let i = c["index"].as_u64().expect("index") as usize;
        if let Some(t) = c["delta"]["content"].as_str() {
            streamed[i].push_str(t);
        }
        finishes += usize::from(c["finish_reason"].is_string());
    }
    assert_eq!(finishes, 2);
    assert_eq!(streamed, texts[..2].to_vec());
}

/// `carrot serve` as a process: its address (from the log line on stderr) and the child.
fn serve_process(extra: &[&str]) -> (SocketAddr, std::process::Child) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_carrot"))
        .args(["serve", "--model"])
        .arg(model_dir())
        .args(["--port", "0"])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start carrot serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("http://").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serving line")
        .parse()
        .expect("address");
    (addr, child)
}

/// Sends a long streaming request and returns the stream once its first event arrived.
fn open_stream(addr: SocketAddr) -> TcpStream {
    let body = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1800,
                      "stream": true, "temperature": 0})
    .to_string();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "stream closed before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

fn terminate(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "carrot serve did not exit in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_lets_the_stream_in_flight_finish_then_exits() {
    let (addr, mut child) = serve_process(&[]);
    let mut stream = open_stream(addr);
    terminate(&child);
    let mut rest = String::new();
    stream.read_to_string(&mut rest).expect("read the rest");
    assert!(rest.contains("data: [DONE]"), "the stream was cut:\n{rest}");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

#[test]
fn the_drain_deadline_bounds_the_wait_for_requests_in_flight() {
    let (addr, mut child) = serve_process(&["--drain-timeout", "0"]);
    let mut stream = open_stream(addr);
    terminate(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    assert!(
        !rest.contains("data: [DONE]"),
        "a 1800-token stream finished within the deadline"
    );
}

#[test]
fn the_official_openai_client_works_with_every_parameter() {
    let settings = Settings {
        api_key: Some("k3y".into()),
        ..Settings::for_model_dir(model_dir())
    };
    let (addr, _stop) = start(model_dir(), settings);
    let url = format!("http://{addr}/v1");
    let args = [std::ffi::OsStr::new(&url), std::ffi::OsStr::new("k3y")];
    if let Some(Err(report)) = carrot_tests::run_python_script("openai", "openai_client.py", &args)
    {
        panic!("the OpenAI client failed:\n{report}");
    }
}

/// Requests in flight together decode in one batch (an `ort`-flavor export, up to 4 rows, image
/// prompts prefilled in chunks of 8 between the others' steps), and each answer equals the one
/// the same server gives that request alone.
#[test]
fn concurrent_requests_batch_and_answer_as_they_do_alone() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve/carrot-tiny-ort-fp32");
    carrot::demo::export_fixture_as(
        "carrot-tiny",
        &out,
        carrot_export::pipeline::WeightFormat::Float(carrot_graphs::config::DType::F32),
        "ort",
        carrot_graphs::llama::Logits::Last,
        false,
    )
    .unwrap_or_else(|e| panic!("exporting: {e:#}"));
    let settings = Settings {
        limits: Limits {
            max_batch: 4,
            prefill_chunk: 8,
            ..Limits::default()
        },
        ..Settings::for_model_dir(&out)
    };
    let (addr, _stop) = start(&out, settings);
    let questions = [
        "What is in this picture?",
        "Describe the animal.",
        "What colour is the fur?",
        "Is it day or night?",
        "Count the eyes.",
        "Where was this taken?",
    ];
    let bodies: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let message = if i % 2 == 0 {
                image_message(q)
            } else {
                json!({"role": "user", "content": q})
            };
            json!({"messages": [message], "max_tokens": 6 + 3 * i, "temperature": 0})
        })
        .collect();
    let answer = |body: &Value| {
        let r = http(addr, "POST", "/v1/chat/completions", Some(body), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned()
    };
    let alone: Vec<String> = bodies.iter().map(answer).collect();
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    assert_eq!(
        metric(&m, "carrot_decode_batch_size_sum"),
        metric(&m, "carrot_decode_batch_size_count"),
        "one request at a time decodes alone"
    );
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies.iter().map(|b| s.spawn(|| answer(b))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    assert_eq!(together, alone, "answers in a batch vs alone");
    let m = http(addr, "GET", "/metrics", None, &[]).body;
    let steps = metric(&m, "carrot_decode_batch_size_count");
    let rows = metric(&m, "carrot_decode_batch_size_sum");
    assert!(rows > steps, "some decode steps ran several requests: {m}");
    assert_eq!(metric(&m, "carrot_requests_total{outcome=\"ok\"}"), 12.0);
}

/// `response_format: json_schema` through the official OpenAI client's `parse` (a Pydantic
/// model): sampled answers of the random-weight fixture always finish, parse and validate.
#[test]
fn structured_output_always_parses_and_validates() {
    let (addr, _stop) = start(model_dir(), Settings::for_model_dir(model_dir()));
    let url = format!("http://{addr}/v1");
    let args = [std::ffi::OsStr::new(&url)];
    if let Some(Err(report)) =
        carrot_tests::run_python_script("openai", "structured_output.py", &args)
    {
        panic!("structured output failed:\n{report}");
    }
}
