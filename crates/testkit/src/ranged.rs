//! Serving a file body the way download servers do: `Range: bytes=N-`
//! honoured with `206 Partial Content`, and a connection cut on demand.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

/// The `Range` header's value, if any.
pub(crate) fn range_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `body` from the start `range` asks for; with `cut_after`, the stream
/// breaks after that many bytes instead of ending.
pub(crate) fn ranged_body(body: &[u8], range: Option<&str>, cut_after: Option<usize>) -> Response {
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
        .unwrap_or(0)
        .min(body.len());
    let rest = &body[start..];
    let mut res = Response::builder().header(header::CONTENT_LENGTH, rest.len());
    if start > 0 {
        res = res.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", body.len().saturating_sub(1), body.len()),
        );
    }
    if let Some(cut) = cut_after {
        let head = Bytes::copy_from_slice(&rest[..cut.min(rest.len())]);
        let stream = futures_util::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(head),
            Err(std::io::Error::other("connection cut")),
        ]);
        return res.body(Body::from_stream(stream)).unwrap_or_default();
    }
    let stream = futures_util::stream::iter(
        rest.chunks(64 * 1024)
            .map(|c| Ok::<Bytes, Infallible>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    res.body(Body::from_stream(stream)).unwrap_or_default()
}
