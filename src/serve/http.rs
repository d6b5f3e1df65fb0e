//! The HTTP side of `rcx serve`, on hyper: routing, the bearer token, body limits and
//! timeouts, JSON errors, and the accept loop that drains in-flight requests on shutdown.
//! Nothing here runs the model: a request's sequences go to the batcher and its answer
//! comes back on a channel.

use super::batcher::{Batcher, Refused};
use super::metrics::Metrics;
use super::requests::{self, BadRequest, Parsed};
use crate::reward_norm::RewardStats;
use crate::tokenizer::Tokenizer;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The largest request body read, in bytes; a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What every request handler shares.
pub struct State {
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Tokenizer,
    pub max_length: usize,
    pub max_queue: usize,
    /// The bearer token every endpoint but /health requires, if any.
    pub token: Option<String>,
    /// How long a client has to send its headers, and then its body.
    pub read_timeout: Duration,
    /// With `--normalize`: the statistics the rewards are normalised with.
    pub normalization: Option<RewardStats>,
}

type Answer = Response<Full<Bytes>>;

/// Serves connections from `listener` until `stop()` says so, then lets the requests
/// under way finish (at most DRAIN_LIMIT) and closes idle connections.
pub async fn serve(listener: TcpListener, state: Arc<State>, stop: impl Fn() -> bool) {
    let graceful = GracefulShutdown::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        eprintln!("rcx serve: accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small answers go out at once, not held back for coalescing.
                let _ = stream.set_nodelay(true);
                let for_service = Arc::clone(&state);
                let service = service_fn(move |req| handle(Arc::clone(&for_service), req));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(state.read_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    // A connection's failure (a reset, a timed-out client) is its own.
                    let _ = conn.await;
                });
            }
            _ = tick.tick() => {
                if stop() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_LIMIT) => {
            eprintln!("rcx serve: requests still under way after {DRAIN_LIMIT:?}: abandoned");
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    let started = Instant::now();
    let (endpoint, answer) = route(&state, req).await;
    state
        .metrics
        .record_request(endpoint, answer.status().as_u16(), started.elapsed());
    Ok(answer)
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> (&'static str, Answer) {
    let endpoint = match req.uri().path() {
        "/score" => "score",
        "/get_reward" => "get_reward",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    };
    if endpoint != "health" && !authorized(state, &req) {
        let mut answer = error(
            StatusCode::UNAUTHORIZED,
            "this server needs the header `Authorization: Bearer <token>` (rcx serve --token)",
        );
        answer
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return (endpoint, answer);
    }
    let answer = match (endpoint, req.method()) {
        ("other", _) => error(
            StatusCode::NOT_FOUND,
            "no such endpoint: POST /score, POST /get_reward, GET /health, GET /metrics",
        ),
        ("health", &Method::GET) => json_answer(StatusCode::OK, &json!({"status": "ok"})),
        ("metrics", &Method::GET) => {
            let mut answer = Response::new(Full::new(Bytes::from(
                state.metrics.render(state.batcher.depth()),
            )));
            answer.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            answer
        }
        ("score" | "get_reward", &Method::POST) => score(state, req, endpoint).await,
        (_, _) => {
            let allowed = if matches!(endpoint, "score" | "get_reward") {
                "POST"
            } else {
                "GET"
            };
            let mut answer = error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} takes {allowed} only", req.uri().path()),
            );
            answer
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            answer
        }
    };
    (endpoint, answer)
}

/// Whether the request carries the server's bearer token (always, without one).
fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    // Every byte compared whatever the first difference, so that the time taken does not
    // tell how much of a guess was right.
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Reads, checks and queues a scoring request, and answers with its rewards.
async fn score(state: &Arc<State>, req: Request<Incoming>, endpoint: &'static str) -> Answer {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(state.read_timeout, body.collect()).await {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not arrive within {} s",
                    state.read_timeout.as_secs()
                ),
            );
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read: {e}"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // Tokenizing a large body takes milliseconds: off the executor's threads.
    let parsing = Arc::clone(state);
    let parsed = tokio::task::spawn_blocking(move || {
        let tok = &parsing.tokenizer;
        match endpoint {
            "score" => requests::parse_score(&bytes, tok, parsing.max_length),
            _ => requests::parse_get_reward(&bytes, tok, parsing.max_length),
        }
    })
    .await;
    let Parsed { sequences, shape } = match parsed {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(BadRequest(why))) => return error(StatusCode::BAD_REQUEST, &why),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading the request failed: {e}"),
            );
        }
    };
    if sequences.len() > state.max_queue {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the request holds {} sequences; the queue holds at most {} (--max-queue)",
                sequences.len(),
                state.max_queue
            ),
        );
    }
    let receiver = match state.batcher.submit(sequences) {
        Ok(receiver) => receiver,
        Err(refused) => {
            let why = match refused {
                Refused::Full => "the queue is full: retry later",
                Refused::Closed => "the server is shutting down",
            };
            let mut answer = error(StatusCode::SERVICE_UNAVAILABLE, why);
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return answer;
        }
    };
    match receiver.await {
        Ok(Ok(logits)) => json_answer(
            StatusCode::OK,
            &requests::answer(&shape, &logits, state.normalization.as_ref()),
        ),
        Ok(Err(why)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the model failed: {why}"),
        ),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model thread stopped before answering",
        ),
    }
}

fn too_large() -> Answer {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}

fn json_answer(status: StatusCode, value: &impl serde::Serialize) -> Answer {
    // Serializing rewards, logits and strings cannot fail; an empty body would say so.
    let text = serde_json::to_string(value).unwrap_or_default();
    let mut answer = Response::new(Full::new(Bytes::from(text)));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}
