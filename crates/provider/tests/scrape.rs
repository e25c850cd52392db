//! The scrape engine against a local axum server on 127.0.0.1.
//!
//! Only that loopback server is ever contacted: URLs naming other hosts
//! appear only as link text in pages, or are refused before connecting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use cxmpute_provider::engines::scrape::*;
use futures_util::stream::{self, StreamExt};

const ARTICLE: &str = r#"<!doctype html>
<html><head>
  <title>Welcome  &amp; Hello</title>
  <meta name="description" content="A small test article.">
  <meta property="og:description" content="og fallback">
  <script>window.SECRET = "do-not-leak";</script>
  <style>.x { color: red }</style>
</head><body>
  <nav><a href="/docs/intro">Intro</a> <a href="docs/intro#part">Intro again</a></nav>
  <h1>Welcome to the article</h1>
  <p>This paragraph has <strong>bold</strong> text and an <a href="https://example.org/ext">external link</a>.</p>
  <script>document.write("also-secret")</script>
  <p><a href="mailto:someone@example.org">mail</a> <a href="javascript:void(0)">js</a></p>
</body></html>"#;

/// A news article inside the usual boilerplate: navigation, an ad column,
/// a newsletter box and a footer, all with plenty of links.
const NEWS: &str = r#"<!doctype html>
<html lang="en-GB"><head>
  <title>Tide pools hold more life than expected | Example Gazette</title>
  <meta name="author" content="Ada Lovelace">
  <meta property="og:site_name" content="Example Gazette">
  <meta property="article:published_time" content="2026-03-01T10:00:00Z">
</head><body>
  <header><nav class="site-nav"><ul>
    <li><a href="/">Home</a></li><li><a href="/world">World news</a></li>
    <li><a href="/sport">Sport results</a></li><li><a href="/login">Sign in to your account</a></li>
  </ul></nav></header>
  <div class="layout">
    <aside class="sidebar ad-column"><div class="advert">
      <a href="/ads/1">Buy cheap widgets today</a> <a href="/ads/2">Limited offer on gadgets</a>
    </div></aside>
    <main><article>
      <h1>Tide pools hold more life than expected</h1>
      <p>Researchers counting species along the northern coast found that small tide pools,
      often overlooked by surveys, shelter nearly twice as many kinds of invertebrates as the
      open rocks around them. The team sampled two hundred pools over three summers.</p>
      <p>The pools act as refuges during low tide, when exposed rock heats quickly in the sun.
      Temperatures inside the deeper pools stayed within a few degrees of the sea, while the
      surrounding surfaces grew hot enough to kill most soft-bodied animals within an hour.</p>
      <p>Details of the counting protocol are in <a href="../papers/methods">the methods section</a>,
      and the raw tallies are published as <a href="data/tallies.csv">a spreadsheet</a>.
      The authors caution that a warming sea could narrow the margin the pools provide.</p>
    </article></main>
  </div>
  <div class="newsletter">Subscribe now to our newsletter <a href="/subscribe">Subscribe</a></div>
  <footer class="site-footer"><p>Copyright Example Gazette. <a href="/privacy">Privacy policy</a>
  <a href="/terms">Terms of use</a> <a href="/contact">Contact us</a></p></footer>
</body></html>"#;

/// A directory page: links and a line of text, nothing readability would call
/// an article.
const DIRECTORY: &str = r#"<!doctype html><html><head><title>Index</title></head><body>
  <h1>Files</h1><ul><li><a href="alpha.html">Alpha</a></li><li><a href="sub/beta.html">Beta</a></li>
  <li><a href="/gamma">Gamma</a></li></ul><p>Three files.</p></body></html>"#;

struct Server {
    base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn serve() -> Server {
    let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counter = hits.clone();
    let app = Router::new().fallback(move |uri: Uri| {
        *counter.lock().unwrap().entry(uri.path().to_owned()).or_default() += 1;
        page(uri)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        base: format!("http://{addr}"),
        hits,
    }
}

fn html(body: impl Into<String>) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body.into()).into_response()
}

fn redirect(to: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to.to_owned())]).into_response()
}

async fn page(uri: Uri) -> Response {
    match uri.path() {
        "/article" => html(ARTICLE),
        "/news/2026/tide-pools" => html(NEWS),
        "/dir/" => html(DIRECTORY),
        "/wait" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            html("<title>Waited</title><p>done</p>")
        }
        "/redirect" => redirect("/article"),
        "/loop" => redirect("/loop"),
        "/to-file" => redirect("file:///etc/passwd"),
        "/to-ftp" => redirect("ftp://127.0.0.1/x"),
        // 0.0.0.0 is "this host": were the check missing, this would reach
        // this same local server, nothing else.
        "/to-unspecified" => {
            let port = uri.query().unwrap_or_default().to_owned();
            redirect(&format!("http://0.0.0.0:{port}/article"))
        }
        "/missing" => (StatusCode::NOT_FOUND, "no such page").into_response(),
        "/big" => html(format!("<p>{}</p>", "x".repeat(200_000))),
        // No Content-Length and no end: the engine must stop by itself.
        "/endless" => {
            let chunk = Bytes::from(vec![b'a'; 16 * 1024]);
            let body = stream::repeat(Ok::<_, Infallible>(chunk));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(Body::from_stream(body))
                .unwrap()
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            html("<p>too late</p>")
        }
        // Headers at once, then a body that never finishes.
        "/slow-body" => {
            let first = stream::once(async { Ok::<_, Infallible>(Bytes::from_static(b"<p>start")) });
            let body = first.chain(stream::pending());
            Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(Body::from_stream(body))
                .unwrap()
        }
        "/delayed" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            html("<title>Delayed</title><p>finally</p>")
        }
        "/image" => (
            [(header::CONTENT_TYPE, "image/png")],
            vec![0x89, b'P', b'N', b'G', 0, 0, 0],
        )
            .into_response(),
        "/untyped-binary" => Response::new(Body::from(vec![0u8, 1, 2, 3, 0, 0, 7])),
        "/plain" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "just some *text*",
        )
            .into_response(),
        _ => (StatusCode::NOT_FOUND, "unknown").into_response(),
    }
}

fn engine(tweak: impl FnOnce(&mut ScrapeConfig)) -> ScrapeEngine {
    let mut cfg = ScrapeConfig {
        allow_loopback: true,
        ..ScrapeConfig::default()
    };
    tweak(&mut cfg);
    ScrapeEngine::new(cfg).unwrap()
}

fn request(urls: Vec<String>) -> ScrapeRequest {
    ScrapeRequest {
        urls,
        ..ScrapeRequest::default()
    }
}

async fn scrape_one(engine: &ScrapeEngine, url: String) -> PageResult {
    let mut res = engine.scrape(request(vec![url])).await.unwrap();
    assert_eq!(res.results.len(), 1);
    res.results.remove(0)
}

fn error_of(page: &PageResult) -> &str {
    page.error
        .as_deref()
        .unwrap_or_else(|| panic!("expected an error for {}: {page:?}", page.url))
}

#[tokio::test]
async fn article_becomes_markdown_with_metadata() {
    let srv = serve().await;
    let res = engine(|_| {}).scrape(request(vec![srv.url("/article")])).await.unwrap();
    assert_eq!(res.pages_ok(), 1);
    let page = &res.results[0];
    assert_eq!(page.error, None);
    assert_eq!(page.status, Some(200));
    assert_eq!(page.final_url.as_deref(), Some(srv.url("/article").as_str()));
    assert_eq!(page.title.as_deref(), Some("Welcome & Hello"));
    assert_eq!(page.description.as_deref(), Some("A small test article."));
    let md = page.markdown.as_deref().unwrap();
    assert!(md.contains("# Welcome to the article"), "{md}");
    assert!(md.contains("This paragraph has **bold** text"), "{md}");
    assert!(
        md.contains(&format!("[Intro]({})", srv.url("/docs/intro"))),
        "relative links made absolute: {md}"
    );
    assert!(md.contains("[external link](https://example.org/ext)"), "{md}");
    for leaked in ["do-not-leak", "also-secret", "color: red", "javascript:"] {
        assert!(!md.contains(leaked), "{leaked:?} leaked into {md}");
    }
    assert_eq!(
        page.links.as_deref().unwrap(),
        [srv.url("/docs/intro"), "https://example.org/ext".to_owned()]
    );
    assert_eq!(
        (page.html.as_deref(), page.text.as_deref()),
        (None, None),
        "only markdown by default"
    );
    // None fields are left out of the JSON.
    let json = serde_json::to_value(page).unwrap();
    assert!(json.get("html").is_none() && json.get("error").is_none(), "{json}");
}

#[tokio::test]
async fn html_and_text_formats() {
    let srv = serve().await;
    let req: ScrapeRequest =
        serde_json::from_value(serde_json::json!({ "urls": [srv.url("/article")], "formats": ["html", "text"] }))
            .unwrap();
    let res = engine(|_| {}).scrape(req).await.unwrap();
    let page = &res.results[0];
    assert_eq!(page.html.as_deref(), Some(ARTICLE), "html is the page as served");
    let text = page.text.as_deref().unwrap();
    assert!(text.contains("Welcome to the article\n"), "{text}");
    assert!(
        text.contains("This paragraph has bold text and an external link."),
        "{text}"
    );
    assert!(
        !text.contains('#') && !text.contains("](") && !text.contains("do-not-leak"),
        "{text}"
    );
    assert_eq!(page.markdown, None);

    // The original API's single `format` field.
    let req: ScrapeRequest =
        serde_json::from_value(serde_json::json!({ "urls": [srv.url("/plain")], "format": "text" })).unwrap();
    let res = engine(|_| {}).scrape(req).await.unwrap();
    assert_eq!(
        res.results[0].text.as_deref(),
        Some("just some *text*"),
        "text/plain comes back as is"
    );
}

#[tokio::test]
async fn redirects_are_followed_and_bounded() {
    let srv = serve().await;
    let eng = engine(|_| {});
    let page = scrape_one(&eng, srv.url("/redirect")).await;
    assert_eq!(page.error, None);
    assert_eq!(page.final_url.as_deref(), Some(srv.url("/article").as_str()));
    assert_eq!(page.title.as_deref(), Some("Welcome & Hello"));

    let page = scrape_one(&eng, srv.url("/loop")).await;
    assert!(error_of(&page).contains("more than 5 redirects"), "{page:?}");
    assert_eq!(srv.hits("/loop"), 6, "the first request and five redirects");

    let page = scrape_one(&eng, srv.url("/to-ftp")).await;
    assert!(error_of(&page).starts_with("refused: scheme \"ftp\""), "{page:?}");
    // reqwest does not even consider a Location without an authority.
    let page = scrape_one(&eng, srv.url("/to-file")).await;
    assert!(error_of(&page).contains("302"), "{page:?}");

    // Every hop is checked, not only the first URL.
    let port = srv.base.rsplit(':').next().unwrap();
    let page = scrape_one(&eng, srv.url(&format!("/to-unspecified?{port}"))).await;
    assert_eq!(
        error_of(&page),
        "refused: 0.0.0.0 resolves to a private/loopback/link-local address"
    );
    assert_eq!(srv.hits("/article"), 1, "only the first, direct fetch");
}

#[tokio::test]
async fn http_errors_carry_the_status() {
    let srv = serve().await;
    let page = scrape_one(&engine(|_| {}), srv.url("/missing")).await;
    assert_eq!(page.status, Some(404));
    assert!(error_of(&page).contains("404"), "{page:?}");
    assert_eq!(page.markdown, None);
}

#[tokio::test]
async fn bodies_over_the_limit_fail() {
    let srv = serve().await;
    let eng = engine(|c| c.max_bytes = 64 * 1024);
    for path in ["/big", "/endless"] {
        let started = Instant::now();
        let page = scrape_one(&eng, srv.url(path)).await;
        assert!(error_of(&page).contains("body too large"), "{page:?}");
        assert_eq!(page.status, Some(200));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn slow_pages_time_out() {
    let srv = serve().await;
    let eng = engine(|c| c.timeout = Duration::from_millis(500));
    for path in ["/slow", "/slow-body"] {
        let started = Instant::now();
        let page = scrape_one(&eng, srv.url(path)).await;
        assert!(error_of(&page).contains("timed out"), "{page:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn binary_content_is_refused() {
    let srv = serve().await;
    let eng = engine(|_| {});
    let page = scrape_one(&eng, srv.url("/image")).await;
    assert!(
        error_of(&page).contains("unsupported content type \"image/png\""),
        "{page:?}"
    );
    let page = scrape_one(&eng, srv.url("/untyped-binary")).await;
    assert!(error_of(&page).contains("binary"), "{page:?}");
}

#[tokio::test]
async fn results_keep_input_order() {
    let srv = serve().await;
    let urls = vec![
        srv.url("/delayed"), // finishes last, listed first
        srv.url("/missing"),
        "not a url".to_owned(),
        srv.url("/article"),
        srv.url("/plain"),
    ];
    let res = engine(|c| c.max_concurrency = 3)
        .scrape(request(urls.clone()))
        .await
        .unwrap();
    let got: Vec<&str> = res.results.iter().map(|r| r.url.as_str()).collect();
    assert_eq!(got, urls);
    assert_eq!(res.results[0].title.as_deref(), Some("Delayed"));
    assert_eq!(res.results[1].status, Some(404));
    assert!(
        error_of(&res.results[2]).starts_with("invalid URL"),
        "{:?}",
        res.results[2]
    );
    assert_eq!(res.results[3].title.as_deref(), Some("Welcome & Hello"));
    assert_eq!(res.pages_ok(), 3);
}

#[tokio::test]
async fn request_level_errors() {
    let srv = serve().await;
    let eng = engine(|_| {});
    let err = eng.scrape(request(vec![])).await.unwrap_err();
    assert_eq!(err, ScrapeError::NoUrls);
    assert_eq!(err.to_string(), "Provide at least one URL in \"urls\"");
    let err = eng.scrape(request(vec![srv.url("/article"); 51])).await.unwrap_err();
    assert_eq!(err, ScrapeError::TooManyUrls { given: 51, max: 50 });
    assert_eq!(srv.total_hits(), 0, "request-level errors fetch nothing");
    assert_eq!(
        eng.scrape(request(vec![srv.url("/plain"); 50]))
            .await
            .unwrap()
            .pages_ok(),
        50
    );
}

#[tokio::test]
async fn loopback_is_refused_without_opt_in() {
    let srv = serve().await;
    let port = srv.base.rsplit(':').next().unwrap();
    let eng = ScrapeEngine::new(ScrapeConfig::default()).unwrap();
    let urls = vec![
        srv.url("/article"),
        format!("http://localhost:{port}/article"),
        format!("http://2130706433:{port}/article"), // 127.0.0.1 in decimal
        format!("http://[::ffff:127.0.0.1]:{port}/article"),
    ];
    let res = eng.scrape(request(urls)).await.unwrap();
    for page in &res.results {
        let err = error_of(page);
        assert!(
            err.starts_with("refused: ") && err.contains("private/loopback/link-local"),
            "{page:?}"
        );
        assert_eq!(page.status, None);
    }
    assert_eq!(res.pages_ok(), 0);
    assert_eq!(srv.total_hits(), 0, "refused before any request was made");
}

#[tokio::test]
async fn host_names_go_through_the_guarded_resolver() {
    // "localhost" resolves from the hosts file, so this exercises the
    // resolver without any DNS traffic.
    let srv = serve().await;
    let port = srv.base.rsplit(':').next().unwrap();
    let page = scrape_one(&engine(|_| {}), format!("http://localhost:{port}/plain")).await;
    assert_eq!(page.error, None, "{page:?}");
    assert_eq!(page.markdown.as_deref(), Some("just some *text*"));
}

#[tokio::test]
async fn readability_keeps_the_article_and_drops_the_boilerplate() {
    let srv = serve().await;
    let req: ScrapeRequest = serde_json::from_value(serde_json::json!({
        "urls": [srv.url("/news/2026/tide-pools")],
        "formats": ["markdown", "text", "html"],
    }))
    .unwrap();
    let res = engine(|_| {}).scrape(req).await.unwrap();
    let page = &res.results[0];
    assert_eq!(page.error, None);
    assert_eq!(page.extracted, Some(Extracted::Article));
    let md = page.markdown.as_deref().unwrap();
    for kept in [
        "Researchers counting species along the northern coast",
        "Temperatures inside the deeper pools",
        "a warming sea could narrow the margin",
    ] {
        assert!(md.contains(kept), "{kept:?} missing from {md}");
    }
    for boilerplate in [
        "World news",
        "Sport results",
        "Sign in",
        "Buy cheap widgets",
        "Subscribe now",
        "Privacy policy",
        "Copyright",
    ] {
        assert!(!md.contains(boilerplate), "{boilerplate:?} kept in {md}");
    }
    // Relative links inside the article are absolute, against the page URL.
    assert!(
        md.contains(&format!("[the methods section]({})", srv.url("/news/papers/methods"))),
        "{md}"
    );
    assert!(
        md.contains(&format!("[a spreadsheet]({})", srv.url("/news/2026/data/tallies.csv"))),
        "{md}"
    );
    let text = page.text.as_deref().unwrap();
    assert!(
        text.contains("shelter nearly twice as many kinds") && !text.contains("Buy cheap"),
        "{text}"
    );
    assert!(!text.contains("]("), "{text}");

    // html: the page as served, plus the article alone.
    assert_eq!(page.html.as_deref(), Some(NEWS));
    let main = page.main_html.as_deref().unwrap();
    assert!(main.contains("Temperatures inside the deeper pools"), "{main}");
    assert!(main.contains(&srv.url("/news/papers/methods")), "{main}");
    assert!(
        !main.contains("Buy cheap widgets") && !main.contains("Sport results"),
        "{main}"
    );

    // Metadata.
    assert_eq!(
        page.title.as_deref(),
        Some("Tide pools hold more life than expected | Example Gazette")
    );
    assert_eq!(page.byline.as_deref(), Some("Ada Lovelace"));
    assert_eq!(page.site_name.as_deref(), Some("Example Gazette"));
    assert_eq!(page.language.as_deref(), Some("en-GB"));
    assert_eq!(page.published_time.as_deref(), Some("2026-03-01T10:00:00Z"));
    // Links list the whole page, nav included, all absolute.
    let links = page.links.as_deref().unwrap();
    assert!(links.contains(&srv.url("/world")) && links.contains(&srv.url("/news/papers/methods")));

    // The new fields are additions: every field the response had before
    // keeps its name.
    let json = serde_json::to_value(page).unwrap();
    for key in [
        "url",
        "final_url",
        "status",
        "title",
        "markdown",
        "html",
        "text",
        "links",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
    assert_eq!(json["extracted"], "article");
}

#[tokio::test]
async fn pages_without_an_article_fall_back_to_the_whole_page() {
    let srv = serve().await;
    let req: ScrapeRequest = serde_json::from_value(serde_json::json!({
        "urls": [srv.url("/dir/")],
        "formats": ["markdown", "html"],
    }))
    .unwrap();
    let res = engine(|_| {}).scrape(req).await.unwrap();
    let page = &res.results[0];
    assert_eq!(page.error, None);
    assert_eq!(page.extracted, Some(Extracted::Page));
    let md = page.markdown.as_deref().unwrap();
    assert!(md.contains("# Files"), "{md}");
    assert!(md.contains("Three files."), "{md}");
    for (text, path) in [
        ("Alpha", "/dir/alpha.html"),
        ("Beta", "/dir/sub/beta.html"),
        ("Gamma", "/gamma"),
    ] {
        assert!(md.contains(&format!("[{text}]({})", srv.url(path))), "{text} in {md}");
    }
    // main_html is the sanitized page with absolute links.
    let main = page.main_html.as_deref().unwrap();
    assert!(
        main.contains(&format!("href=\"{}\"", srv.url("/dir/sub/beta.html"))),
        "{main}"
    );
    assert_eq!(page.title.as_deref(), Some("Index"));
    assert_eq!(page.byline, None);

    // The short test article of the other tests falls back too, nav and all.
    let page = scrape_one(&engine(|_| {}), srv.url("/article")).await;
    assert_eq!(page.extracted, Some(Extracted::Page));
}

#[tokio::test]
async fn fifty_urls_are_fetched_at_once() {
    let srv = serve().await;
    let eng = engine(|_| {});
    assert_eq!(eng.config().max_concurrency, 50);
    let started = Instant::now();
    let res = eng.scrape(request(vec![srv.url("/wait"); 50])).await.unwrap();
    let took = started.elapsed();
    assert_eq!(res.pages_ok(), 50);
    assert!(res.results.iter().all(|p| p.title.as_deref() == Some("Waited")));
    // Each page takes 600 ms: 16 at a time would need four rounds (2.4 s).
    assert!(took < Duration::from_millis(1800), "50 pages took {took:?}");
}
