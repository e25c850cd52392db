//! HTML building blocks: escaping, the page frame, and value formatting.
//!
//! Pages are assembled with `format!` from small functions; every value that
//! comes from a user or the database passes through [`esc`] on the way in.
//! No template engine: the pages are few and static in shape, and this keeps
//! the build free of another macro crate.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cxmpute_store::{day_of, Millis};

/// Escapes text for use in element content and in double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1a1a1a;--bg:#fff;--muted:#555;--line:#ccc;--accent:#0b57d0;--bad:#b3261e;--ok:#146c2e}\
@media (prefers-color-scheme:dark){:root{--fg:#eee;--bg:#121212;--muted:#aaa;--line:#444;--accent:#8ab4f8;--bad:#f2b8b5;--ok:#6dd58c}}\
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,sans-serif;color:var(--fg);background:var(--bg)}\
header,main{max-width:60rem;margin:0 auto;padding:1rem}header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid var(--line)}\
a{color:var(--accent)}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}\
label{display:block;margin:.75rem 0 .25rem;font-weight:600}\
input[type=email],input[type=text],input[type=number]{font:inherit;padding:.5rem;width:100%;max-width:24rem;border:1px solid var(--muted);border-radius:4px;background:var(--bg);color:var(--fg)}\
button{font:inherit;padding:.5rem 1rem;margin-top:.75rem;border:0;border-radius:4px;background:var(--accent);color:var(--bg);cursor:pointer}\
button.link{background:none;color:var(--accent);padding:0;margin:0;text-decoration:underline}\
:focus-visible{outline:3px solid var(--accent);outline-offset:2px}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line)}\
.msg{padding:.75rem;border-left:4px solid var(--accent)}.err{border-color:var(--bad)}.ok{border-color:var(--ok)}\
.secret{font-family:ui-monospace,monospace;word-break:break-all}.muted{color:var(--muted)}\
fieldset{border:1px solid var(--line);border-radius:4px}fieldset label{display:inline;font-weight:normal;margin-right:1rem}\
pre{overflow-x:auto;padding:.75rem;border:1px solid var(--line);border-radius:4px}textarea,select{font:inherit}\
.chart{color:var(--muted);height:12rem}.chart .bar{fill:var(--accent)}figure{margin:1rem 0}";

/// A whole page. `header` is already HTML (escaped by its builder).
pub fn page(title: &str, header: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · cxmpute</title><style>{STYLE}</style></head><body>\
         <header><strong>cxmpute</strong>{header}</header><main>{body}</main></body></html>",
        title = esc(title),
    )
}

/// An HTML response that is never cached (pages show balances and secrets).
pub fn respond(status: StatusCode, html: String) -> Response {
    let mut res = (status, axum::response::Html(html)).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    res
}

/// A page that only says something, e.g. an error.
pub fn message_page(status: StatusCode, title: &str, message: &str, link: (&str, &str)) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"msg err\" role=\"alert\">{}</p><p><a href=\"{}\">{}</a></p>",
        esc(title),
        esc(message),
        esc(link.0),
        esc(link.1)
    );
    respond(status, page(title, "", &body))
}

/// Credits (10⁻⁹ USD) as dollars with six decimals, e.g. `$1.250000`.
pub fn usd(credits: i64) -> String {
    let sign = if credits < 0 { "-" } else { "" };
    let abs = credits.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000_000, (abs % 1_000_000_000) / 1_000)
}

/// `YYYY-MM-DD HH:MM` (UTC).
pub fn when(ms: Millis) -> String {
    let in_day = ms.rem_euclid(86_400_000) / 60_000;
    format!("{} {:02}:{:02}", day_of(ms), in_day / 60, in_day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn money_and_time() {
        assert_eq!(usd(1_250_000_000), "$1.250000");
        assert_eq!(usd(-2_400), "-$0.000002");
        assert_eq!(usd(0), "$0.000000");
        assert_eq!(when(0), "1970-01-01 00:00");
        assert_eq!(when(3_723_000), "1970-01-01 01:02");
    }
}
