//! Forwarding a request to a provision and streaming the answer back.
//!
//! The answer is never buffered: each chunk goes to the client as it arrives,
//! metered on the way. Only the *end* of the answer waits: the request is
//! settled (charged, rewarded, recorded) before the last bytes — the held
//! `[DONE]` event or the end of the body — reach the client. A client that saw
//! a complete answer was therefore charged, exactly once (settlement is keyed
//! by request id); a gateway killed before settling leaves a hold that is
//! released later, and the client saw a broken answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use cxmpute_protocol::link::REQUEST_ID_HEADER;
use cxmpute_protocol::ErrorBody;
use cxmpute_store::{HoldOutcome, HoldRequest, KeyAuth, Service, UsageRecord};
use http_body::{Body as HttpBody, Frame};

use crate::billing::{self, Bounds};
use crate::config::Pricing;
use crate::error::ApiError;
use crate::meter::{Meter, Observed};
use crate::pools::{InFlight, Provision};
use crate::state::AppState;
use crate::transport::{ForwardError, NodeBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who is asking.
pub struct Caller {
    pub request_id: String,
    pub auth: Arc<KeyAuth>,
}

/// How to read the answer.
#[derive(Debug, Clone, Copy)]
pub enum MeterKind {
    Sse {
        strip_usage: bool,
    },
    Json,
    /// A scrape answer: JSON whose pages are counted as it streams.
    Scrape,
    Opaque,
}

/// One request, ready to go.
pub struct Forward {
    pub service: Service,
    pub model: String,
    /// Path on the node, e.g. `/v1/chat/completions`.
    pub path: &'static str,
    pub body: Bytes,
    pub meter: MeterKind,
    pub bounds: Bounds,
}

/// Everything needed to settle the request once its answer is over.
struct Billing {
    state: AppState,
    request_id: String,
    account_id: String,
    key_id: String,
    service: Service,
    model: String,
    bounds: Bounds,
    hold: i64,
    /// The prices the hold was computed with; the charge uses the same.
    pricing: Arc<Pricing>,
    started: Instant,
    ttfb: Option<Duration>,
    provision: Option<Arc<Provision>>,
}

/// A settlement under way; resolves to whether it committed. It runs in the
/// caller's task, where at low load it finishes on its first poll (SQLite runs
/// the job right there), with no task to spawn and no wake-up between tasks.
/// Dropped before it finished (the client left mid-settlement), it moves to a
/// task of its own, so the transaction is never cancelled half-way.
struct Settlement(Option<Pin<Box<dyn Future<Output = bool> + Send>>>);

impl Future for Settlement {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(settling) = self.0.as_mut() else {
            return Poll::Ready(false);
        };
        let committed = std::task::ready!(settling.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(committed)
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if let Some(settling) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(settling);
            }
        }
    }
}

impl Billing {
    /// The settlement of this request (see [`Settlement`]).
    fn settle(self, seen: Observed, status: u16) -> Settlement {
        Settlement(Some(Box::pin(async move {
            let pricing = &*self.pricing;
            let chargeable = (200..300).contains(&status) || status == 499;
            let units = billing::units(self.service, &self.bounds, &seen);
            let cost = if chargeable {
                billing::cost(pricing, self.service, &self.model, &units).min(self.hold)
            } else {
                0
            };
            let reward = billing::reward(pricing, cost);
            let latency = self.started.elapsed();
            let record = UsageRecord {
                request_id: self.request_id.clone(),
                account_id: self.account_id.clone(),
                key_id: self.key_id.clone(),
                device_id: self.provision.as_ref().map(|p| p.device_id.clone()),
                provider_account_id: self.provision.as_ref().map(|p| p.account_id.clone()),
                provision_id: self.provision.as_ref().map(|p| p.id.clone()),
                service: self.service,
                model: self.model.clone(),
                input_tokens: units.input as i64,
                output_tokens: units.output as i64,
                characters: units.characters as i64,
                pages: units.pages as i64,
                latency_ms: latency.as_millis() as i64,
                ttfb_ms: self.ttfb.map_or(0, |t| t.as_millis() as i64),
                status: i32::from(status),
                cost,
                reward,
                created_at: cxmpute_store::now_millis(),
            };
            self.state.metrics.record(
                self.service,
                status,
                latency.as_millis() as u64,
                units.input,
                units.output,
            );
            if status == 499 {
                self.state.metrics.cancelled();
            }
            match self.state.store.settle(record).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(request_id = %self.request_id, error = %e, "settlement failed");
                    false
                }
            }
        })))
    }
}

pub async fn relay(state: &AppState, caller: Caller, fwd: Forward) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    if state.pools.pick(fwd.service, &fwd.model, None).is_none() {
        return Err(if state.pools.is_known(fwd.service, &fwd.model) {
            ApiError::no_provider(&fwd.model)
        } else {
            ApiError::model_not_found(&fwd.model)
        });
    }
    let pricing = state.pricing();
    let hold = billing::hold_amount(&pricing, fwd.service, &fwd.model, &fwd.bounds);
    let key = &caller.auth.key;
    let outcome = state
        .store
        .hold(HoldRequest {
            request_id: caller.request_id.clone(),
            account_id: key.account_id.clone(),
            key_id: key.id.clone(),
            amount: hold,
            expires_at: cxmpute_store::now_millis() + (state.config.request_timeout_secs as i64 + 60) * 1000,
        })
        .await?;
    match outcome {
        HoldOutcome::Held => {}
        HoldOutcome::InsufficientBalance => {
            return Err(ApiError::insufficient_credits(format!(
                "Your credit balance does not cover this request, which may cost up to {hold} credits. Add credits and retry."
            )))
        }
        HoldOutcome::KeyLimitReached => {
            return Err(ApiError::insufficient_credits(
                "This API key has reached its credit limit. Raise the limit or use another key.",
            ))
        }
        HoldOutcome::Refused => return Err(ApiError::forbidden("account_suspended", "This account is suspended or the key was revoked.")),
    }
    let mut bill = Billing {
        state: state.clone(),
        request_id: caller.request_id.clone(),
        account_id: key.account_id.clone(),
        key_id: key.id.clone(),
        service: fwd.service,
        model: fwd.model.clone(),
        bounds: fwd.bounds,
        hold,
        pricing,
        started,
        ttfb: None,
        provision: None,
    };

    let timeout = state.first_byte_timeout();
    let mut excluded: Option<String> = None;
    let mut last_error = ApiError::no_provider(&fwd.model);
    for attempt in 0..2 {
        let Some(provision) = state.pools.pick(fwd.service, &fwd.model, excluded.as_deref()) else {
            break;
        };
        if attempt > 0 {
            state.metrics.retry();
        }
        let in_flight = provision.start();
        let req = hyper::Request::post("/")
            .header(header::CONTENT_TYPE, "application/json")
            .header(REQUEST_ID_HEADER, caller.request_id.as_str())
            .body(fwd.body.clone())
            .map_err(|_| ApiError::internal())?;
        let sent = Instant::now();
        match provision.transport.send(req, fwd.path, timeout).await {
            Ok(res) if res.status().is_server_error() => {
                tracing::warn!(request_id = %caller.request_id, provision = %provision.id, status = %res.status(), "provider failed");
                provision.record_failure(state.pools.epoch());
                last_error = ApiError::bad_gateway(format!(
                    "The provider failed to answer (status {}).",
                    res.status().as_u16()
                ));
            }
            Ok(res) => {
                let (parts, body) = res.into_parts();
                // A non-streamed JSON answer is worth nothing to the client until
                // it is complete, so a small one is read whole before anything is
                // sent: a provider dying mid-answer can then still be retried.
                let upstream = if matches!(fwd.meter, MeterKind::Json | MeterKind::Scrape) && parts.status.is_success()
                {
                    match preread(body, timeout).await {
                        Some(pre) => pre,
                        None => {
                            tracing::warn!(request_id = %caller.request_id, provision = %provision.id, "provider failed mid-answer");
                            provision.record_failure(state.pools.epoch());
                            last_error = ApiError::bad_gateway("The provider failed while answering.");
                            excluded = Some(provision.id.clone());
                            continue;
                        }
                    }
                } else {
                    Upstream::Live(body)
                };
                provision.record_success(sent.elapsed());
                bill.provision = Some(provision);
                return Ok(respond(bill, parts, upstream, fwd.meter, in_flight, &caller.request_id));
            }
            Err(ForwardError::Timeout(_)) => {
                provision.record_failure(state.pools.epoch());
                last_error = ApiError::gateway_timeout();
            }
            Err(e) => {
                tracing::warn!(request_id = %caller.request_id, provision = %provision.id, error = %e, "forward failed");
                provision.record_failure(state.pools.epoch());
                last_error = ApiError::bad_gateway("The provider could not be reached.");
            }
        }
        excluded = Some(provision.id.clone());
    }
    // Nothing reached the client: record the failure and give the hold back.
    let status = last_error.status.as_u16();
    let _ = bill.settle(Observed::default(), status).await;
    Err(last_error)
}

/// Non-streamed answers up to this size are read whole before being relayed.
const PREREAD_LIMIT: usize = 1 << 20;

/// The node's answer: still arriving, or (partly) read ahead.
enum Upstream {
    Live(NodeBody),
    Pre {
        buffered: Option<Bytes>,
        rest: Option<NodeBody>,
    },
}

impl Upstream {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Upstream::Live(body) => Pin::new(body).poll_frame(cx),
            Upstream::Pre { buffered, rest } => {
                if let Some(b) = buffered.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                match rest {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }
}

/// Reads up to [`PREREAD_LIMIT`] of an answer; `None` when the provider failed
/// (or stalled past `timeout`) before the answer was complete.
async fn preread(mut body: NodeBody, timeout: Duration) -> Option<Upstream> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > PREREAD_LIMIT {
                        return Some(Upstream::Pre {
                            buffered: Some(buf.freeze()),
                            rest: Some(body),
                        });
                    }
                }
            }
            Ok(None) => {
                return Some(Upstream::Pre {
                    buffered: Some(buf.freeze()),
                    rest: None,
                })
            }
            Ok(Some(Err(_))) | Err(_) => return None,
        }
    }
}

fn respond(
    bill: Billing,
    parts: http::response::Parts,
    upstream: Upstream,
    kind: MeterKind,
    in_flight: InFlight,
    request_id: &str,
) -> Response<Body> {
    let status = parts.status;
    let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let meter = match kind {
        _ if !status.is_success() => Meter::Opaque,
        MeterKind::Sse { strip_usage } if is_sse => Meter::sse(strip_usage),
        MeterKind::Sse { .. } | MeterKind::Json => Meter::json(),
        MeterKind::Scrape => Meter::scrape(),
        MeterKind::Opaque => Meter::Opaque,
    };
    let body = MeteredBody {
        inner: upstream,
        meter,
        seen: Observed::default(),
        is_sse,
        status: status.as_u16(),
        bill: Some(bill),
        phase: Phase::Streaming,
        _in_flight: in_flight,
    };
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = status;
    let h = out.headers_mut();
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    if is_sse {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    out
}

enum Then {
    Tail(Option<Bytes>),
    ErrorEvent,
    Abort,
}

enum Phase {
    Streaming,
    Settling(Settlement, Option<Then>),
    Tail(Option<Bytes>),
    Failed,
    Done,
}

struct MeteredBody {
    inner: Upstream,
    meter: Meter,
    seen: Observed,
    is_sse: bool,
    status: u16,
    bill: Option<Billing>,
    phase: Phase,
    _in_flight: InFlight,
}

impl MeteredBody {
    fn begin_settle(&mut self, status: u16, then: Then) {
        match self.bill.take() {
            Some(bill) => self.phase = Phase::Settling(bill.settle(self.seen, status), Some(then)),
            None => self.phase = Phase::Done,
        }
    }
}

fn error_event() -> Bytes {
    let body = ErrorBody::new(
        "The provider's connection was lost before the answer was complete.",
        "server_error",
        None,
        Some("provider_error"),
    );
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&body.to_json());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Streaming => match this.inner.poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        let Ok(data) = frame.into_data() else { continue };
                        if let Some(bill) = this.bill.as_mut() {
                            bill.ttfb.get_or_insert_with(|| bill.started.elapsed());
                        }
                        if let Some(out) = this.meter.push(data, &mut this.seen) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(error = %e, "provider stream broke");
                        if let Some(p) = this.bill.as_ref().and_then(|b| b.provision.as_ref()) {
                            p.record_failure(this.bill.as_ref().map_or_else(Instant::now, |b| b.state.pools.epoch()));
                        }
                        let then = if this.is_sse { Then::ErrorEvent } else { Then::Abort };
                        this.begin_settle(StatusCode::BAD_GATEWAY.as_u16(), then);
                    }
                    Poll::Ready(None) => {
                        let tail = this.meter.finish(&mut this.seen);
                        let status = this.status;
                        this.begin_settle(status, Then::Tail(tail));
                    }
                },
                Phase::Settling(settlement, then) => {
                    let committed = match Pin::new(settlement).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(committed) => committed,
                    };
                    let then = then.take();
                    this.phase = match (committed, then) {
                        // Not charged: the client must not see a complete answer.
                        (false, _) | (true, Some(Then::Abort)) | (true, None) => Phase::Failed,
                        (true, Some(Then::Tail(t))) => Phase::Tail(t),
                        (true, Some(Then::ErrorEvent)) => Phase::Tail(Some(error_event())),
                    };
                }
                Phase::Tail(tail) => {
                    let tail = tail.take();
                    this.phase = Phase::Done;
                    if let Some(t) = tail {
                        return Poll::Ready(Some(Ok(Frame::data(t))));
                    }
                }
                Phase::Failed => {
                    this.phase = Phase::Done;
                    return Poll::Ready(Some(Err("the answer could not be completed".into())));
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // The client went away before the end: the node's stream is dropped with
        // us (which cancels it upstream); charge what was delivered so far.
        if let Some(bill) = self.bill.take() {
            // Dropped unpolled, the settlement goes to a task of its own.
            drop(bill.settle(self.seen, 499));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A settlement waiting on `go`, which records that it ran to the end.
    fn waiting_settlement(go: tokio::sync::oneshot::Receiver<()>, finished: Arc<AtomicBool>) -> Settlement {
        Settlement(Some(Box::pin(async move {
            let _ = go.await;
            finished.store(true, Ordering::SeqCst);
            true
        })))
    }

    #[tokio::test]
    async fn a_settlement_that_is_ready_completes_in_place() {
        let finished = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel();
        go.send(()).expect("send");
        assert!(waiting_settlement(wait, finished.clone()).await);
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_settlement_dropped_half_way_still_runs_to_the_end() {
        let finished = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel();
        let mut settlement = waiting_settlement(wait, finished.clone());
        // Polled once and left pending, as when the client goes away while
        // the store commits.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut settlement).poll(cx))).await;
        assert!(first.is_pending());
        drop(settlement);
        go.send(()).expect("the settlement still waits");
        for _ in 0..100 {
            if finished.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the dropped settlement was cancelled");
    }
}
