//! Built-in web-scrape engine: fetch URLs and return them as markdown, HTML
//! or plain text, with title, description, byline, site name, language,
//! publication time and links.
//!
//! Markdown and text hold the page's main content: a readability pass
//! (`dom_smoothie`, a port of Firefox's Reader View) picks the article out of
//! navigation, ads and footers; when it finds no article (too little text, or
//! a page it cannot handle) the whole sanitized page is converted instead.
//!
//! Requests come from strangers, so every fetch goes through
//! [`net_guard`](super::net_guard) (no private/loopback/link-local targets,
//! http(s) only, checked redirects), is bounded in time and size, and never
//! executes scripts: pages are parsed, not rendered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use htmd::element_handler::{HandlerResult, Handlers};
use htmd::{Element, Node};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::net_guard::{self, AddressPolicy};

/// Deeper DOM subtrees are cut off before conversion. The converter recurses
/// per level (~1 KiB of stack each): 2,000 nested `<div>`s (10 KiB of HTML)
/// would overflow a 2 MiB stack and abort the whole node. [`sanitize_html`]
/// already caps nesting lower; this guards `to_markdown` on its own.
const MAX_DOM_DEPTH: usize = 512;
/// Stack for the conversion thread: generous against the depth above, so a
/// different converter (e.g. a readability pass) keeps a wide margin too.
const RENDER_STACK_BYTES: usize = 32 << 20;
/// Readability's article must hold this much text (characters) to be used;
/// with less, it most likely picked a fragment, and the whole page is used.
const MIN_ARTICLE_CHARS: usize = 140;
/// Elements readability will score; larger pages go straight to the whole-page
/// conversion, which bounds readability's (superlinear) work per page.
const MAX_READABILITY_ELEMENTS: usize = 20_000;
/// Elements whose content is never page text.
const SKIP_TAGS: [&str; 11] = [
    "head", "script", "style", "noscript", "template", "iframe", "svg", "canvas", "object", "embed", "button",
];

#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// Allow loopback targets (tests / local development only).
    pub allow_loopback: bool,
    /// Per-URL limit for connecting, redirects and reading the body.
    pub timeout: Duration,
    /// Per-page body limit; larger pages fail instead of being truncated.
    pub max_bytes: usize,
    /// URLs fetched at the same time within one request.
    pub max_concurrency: usize,
    /// URLs accepted in one request.
    pub max_urls: usize,
    pub user_agent: String,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            timeout: Duration::from_secs(15),
            max_bytes: 5 << 20,
            max_concurrency: 50,
            max_urls: 50,
            user_agent: format!(
                "Mozilla/5.0 (compatible; cxmpute-scraper/{}; +https://cxmpute.cloud)",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Markdown,
    Html,
    Text,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrapeRequest {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formats: Option<Vec<Format>>,
    /// The original API's single format; `formats` and `format` are merged,
    /// and markdown is the default when neither is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
}

impl ScrapeRequest {
    /// The requested formats, deduplicated, in request order.
    pub fn requested_formats(&self) -> Vec<Format> {
        let mut out = Vec::new();
        for f in self.formats.iter().flatten().chain(self.format.iter()) {
            if !out.contains(f) {
                out.push(*f);
            }
        }
        if out.is_empty() {
            out.push(Format::Markdown);
        }
        out
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrapeResponse {
    pub results: Vec<PageResult>,
}

impl ScrapeResponse {
    /// Pages that came back without error (what the caller is billed for).
    pub fn pages_ok(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_none()).count()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageResult {
    /// The URL as given in the request.
    pub url: String,
    /// Where the page was fetched from after redirects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Absolute http(s) links found on the page, deduplicated, without fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<String>>,
    /// The author, from readability or `<meta name="author">`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byline: Option<String>,
    /// `og:site_name`, or what readability found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_name: Option<String>,
    /// The page's language: `<html lang>`, else `content-language`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// `article:published_time` (as the page writes it), or readability's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_time: Option<String>,
    /// With the `html` format: the main content as clean HTML (the article
    /// readability found, else the sanitized page), links absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_html: Option<String>,
    /// Where markdown/text came from: `article` (readability) or `page`
    /// (the whole page, when readability found no article).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<Extracted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Extracted {
    Article,
    Page,
}

/// Request-level problems (HTTP 400 upstream). Per-URL problems are reported
/// in [`PageResult::error`] instead, so one bad URL does not fail the rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeError {
    #[error("Provide at least one URL in \"urls\"")]
    NoUrls,
    #[error("Too many URLs in \"urls\": {given} given, at most {max} allowed")]
    TooManyUrls { given: usize, max: usize },
}

pub struct ScrapeEngine {
    client: reqwest::Client,
    cfg: ScrapeConfig,
    policy: AddressPolicy,
    /// Bounds CPU-heavy conversions (and their threads) across all requests.
    render_slots: Arc<Semaphore>,
}

/// A downloaded body, before conversion.
struct Fetched {
    final_url: Url,
    status: u16,
    is_html: bool,
    body: String,
}

/// A per-URL failure, with whatever was known when it happened.
struct Failure {
    message: String,
    status: Option<u16>,
    final_url: Option<Url>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            status: None,
            final_url: None,
        }
    }
}

impl ScrapeEngine {
    pub fn new(cfg: ScrapeConfig) -> anyhow::Result<Self> {
        let policy = AddressPolicy {
            allow_loopback: cfg.allow_loopback,
        };
        let client = net_guard::client_builder(policy)
            .user_agent(cfg.user_agent.clone())
            .connect_timeout(cfg.timeout)
            .build()?;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            client,
            cfg,
            policy,
            render_slots: Arc::new(Semaphore::new(cpus)),
        })
    }

    pub fn config(&self) -> &ScrapeConfig {
        &self.cfg
    }

    pub async fn scrape(&self, req: ScrapeRequest) -> Result<ScrapeResponse, ScrapeError> {
        if req.urls.is_empty() {
            return Err(ScrapeError::NoUrls);
        }
        if req.urls.len() > self.cfg.max_urls {
            return Err(ScrapeError::TooManyUrls {
                given: req.urls.len(),
                max: self.cfg.max_urls,
            });
        }
        let formats = req.requested_formats();
        // Unordered completion so one slow URL does not hold back the
        // concurrency slots; results are put back in input order afterwards.
        let mut slots: Vec<Option<PageResult>> = vec![None; req.urls.len()];
        let mut done = stream::iter(req.urls.into_iter().enumerate())
            .map(|(i, url)| {
                let formats = &formats;
                async move { (i, self.scrape_one(url, formats).await) }
            })
            .buffer_unordered(self.cfg.max_concurrency.max(1));
        while let Some((i, page)) = done.next().await {
            slots[i] = Some(page);
        }
        Ok(ScrapeResponse {
            results: slots.into_iter().flatten().collect(),
        })
    }

    async fn scrape_one(&self, url: String, formats: &[Format]) -> PageResult {
        let mut page = PageResult {
            url: url.clone(),
            ..PageResult::default()
        };
        let fetched = match tokio::time::timeout(self.cfg.timeout, self.fetch(&url)).await {
            Ok(Ok(f)) => f,
            Ok(Err(fail)) => {
                page.status = fail.status;
                page.final_url = fail.final_url.map(String::from);
                page.error = Some(fail.message);
                return page;
            }
            Err(_) => {
                page.error = Some(format!("timed out after {:?}", self.cfg.timeout));
                return page;
            }
        };
        page.status = Some(fetched.status);
        page.final_url = Some(fetched.final_url.to_string());
        let wants = |f: Format| formats.contains(&f);
        if !fetched.is_html {
            // Plain text (or JSON, XML, ...) is already what we would produce.
            page.markdown = wants(Format::Markdown).then(|| fetched.body.clone());
            page.text = wants(Format::Text).then(|| fetched.body.clone());
            page.html = wants(Format::Html).then_some(fetched.body);
            return page;
        }
        match self.render_off_thread(fetched, formats.to_vec()).await {
            Ok(r) => {
                page.title = r.title;
                page.description = r.description;
                page.links = Some(r.links);
                page.markdown = r.markdown;
                page.text = r.text;
                page.html = r.html;
                page.byline = r.byline;
                page.site_name = r.site_name;
                page.language = r.language;
                page.published_time = r.published_time;
                page.main_html = r.main_html;
                page.extracted = r.extracted;
            }
            Err(e) => page.error = Some(e),
        }
        page
    }

    async fn fetch(&self, raw: &str) -> Result<Fetched, Failure> {
        let url = Url::parse(raw.trim()).map_err(|e| format!("invalid URL: {e}"))?;
        // IP-literal hosts never reach the guarded resolver, so check here.
        net_guard::check_url(&url, self.policy).map_err(|e| e.to_string())?;
        let mut resp = self
            .client
            .get(url)
            .header(ACCEPT, "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5")
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = resp.status();
        let final_url = resp.url().clone();
        let fail = |message: String| Failure {
            message,
            status: Some(status.as_u16()),
            final_url: Some(final_url.clone()),
        };
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(CONTENT_TYPE).filter(|ct| !ct.trim().is_empty());
        let declared_html = match content_type.as_deref().map(classify_content_type) {
            Some(Ok(is_html)) => Some(is_html),
            Some(Err(ct)) => {
                return Err(fail(format!(
                    "unsupported content type {ct:?}: only HTML and text pages can be scraped"
                )))
            }
            None => None,
        };
        let limit = self.cfg.max_bytes;
        let too_large = || fail(format!("body too large: over the {limit}-byte limit"));
        if header(CONTENT_LENGTH)
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > limit as u64)
        {
            return Err(too_large());
        }
        // Read incrementally so a huge or endless body costs at most `limit`.
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(format!("error reading body: {}", describe(&e).message)))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let is_html = match declared_html {
            Some(is_html) => is_html,
            None => sniff_html(&body).ok_or_else(|| fail("unsupported content: binary data".to_owned()))?,
        };
        let body = decode(&body, content_type.as_deref());
        Ok(Fetched {
            final_url,
            status: status.as_u16(),
            is_html,
            body,
        })
    }

    /// Parsing and conversion are CPU-bound and recursive, so they run on a
    /// dedicated thread with a large stack rather than on the async runtime
    /// (whose worker and blocking threads may have small stacks). A panic in
    /// the converter becomes a per-URL error instead of taking the node down.
    async fn render_off_thread(&self, fetched: Fetched, formats: Vec<Format>) -> Result<Rendered, String> {
        let _permit = self
            .render_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("scrape-render".into())
            .stack_size(RENDER_STACK_BYTES)
            .spawn(move || {
                let _ = tx.send(render_html(&fetched.body, &fetched.final_url, &formats));
            })
            .map_err(|e| format!("could not start page conversion: {e}"))?;
        rx.await.map_err(|_| "failed to convert page".to_owned())
    }
}

/// Turn a reqwest error into a message, surfacing the guard's own wording.
fn describe(err: &reqwest::Error) -> Failure {
    let message = if let Some(g) = net_guard::find_guard_error(err) {
        g.to_string()
    } else if err.is_timeout() {
        "timed out".to_owned()
    } else {
        let mut msg = err.to_string();
        let mut src = std::error::Error::source(err);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    };
    Failure {
        message,
        status: err.status().map(|s| s.as_u16()),
        final_url: err.url().cloned(),
    }
}

/// `Ok(true)` for HTML, `Ok(false)` for text we return as-is, `Err(essence)`
/// for anything binary.
fn classify_content_type(ct: &str) -> Result<bool, String> {
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "text/html" | "application/xhtml+xml" => Ok(true),
        e if e.starts_with("text/") => Ok(false),
        "application/json" | "application/xml" | "application/javascript" => Ok(false),
        e if !e.starts_with("image/") && (e.ends_with("+json") || e.ends_with("+xml")) => Ok(false),
        _ => Err(essence),
    }
}

/// For bodies without a Content-Type: `None` if binary, else whether it
/// looks like HTML.
fn sniff_html(body: &[u8]) -> Option<bool> {
    let head = &body[..body.len().min(1024)];
    if head.contains(&0) {
        return None;
    }
    let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
    Some(
        ["<!doctype html", "<html", "<head", "<body", "<title"]
            .iter()
            .any(|m| lower.contains(m)),
    )
}

/// Decode a body: UTF-8 (lossy) unless the charset is Latin-1/Windows-1252,
/// the only other encoding simple enough to do without a dependency.
fn decode(body: &[u8], content_type: Option<&str>) -> String {
    let from_meta = || {
        // <meta charset=...> / http-equiv, searched in the first KiB only.
        let head = String::from_utf8_lossy(&body[..body.len().min(1024)]).to_ascii_lowercase();
        head.find("charset=")
            .map(|i| head[i + 8..].trim_start_matches(['"', '\'']).to_owned())
    };
    let charset = content_type
        .map(str::to_ascii_lowercase)
        .and_then(|ct| {
            ct.find("charset=")
                .map(|i| ct[i + 8..].trim_start_matches(['"', '\'']).to_owned())
        })
        .or_else(from_meta)
        .unwrap_or_default();
    let latin = [
        "iso-8859-1",
        "iso8859-1",
        "latin1",
        "latin-1",
        "windows-1252",
        "cp1252",
        "us-ascii",
    ];
    if latin.iter().any(|l| charset.starts_with(l)) {
        return body.iter().map(|&b| windows_1252(b)).collect();
    }
    let text = String::from_utf8_lossy(body);
    text.strip_prefix('\u{feff}').unwrap_or(&text).to_owned()
}

fn windows_1252(b: u8) -> char {
    // 0x80..0x9F differ from Latin-1 (WHATWG decodes "iso-8859-1" as 1252).
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘',
        '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
    ];
    if (0x80..0xa0).contains(&b) {
        HIGH[usize::from(b - 0x80)]
    } else {
        char::from(b)
    }
}

/// Everything produced from one HTML page.
struct Rendered {
    title: Option<String>,
    description: Option<String>,
    links: Vec<String>,
    markdown: Option<String>,
    text: Option<String>,
    html: Option<String>,
    byline: Option<String>,
    site_name: Option<String>,
    language: Option<String>,
    published_time: Option<String>,
    main_html: Option<String>,
    extracted: Option<Extracted>,
}

/// What readability made of a page.
struct Article {
    /// The article's HTML, links already absolute.
    html: String,
    title: Option<String>,
    excerpt: Option<String>,
    byline: Option<String>,
    site_name: Option<String>,
    language: Option<String>,
    published_time: Option<String>,
}

fn non_empty(s: Option<impl AsRef<str>>) -> Option<String> {
    s.map(|s| s.as_ref().split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
}

/// The page's main article, or `None` when readability finds none worth
/// using (an error, or under [`MIN_ARTICLE_CHARS`] of text). `clean` is
/// the output of [`sanitize_html`], so readability's parser only sees
/// balanced, shallow markup.
fn readable_article(clean: &str, base: &Url) -> Option<Article> {
    let cfg = dom_smoothie::Config {
        max_elements_to_parse: MAX_READABILITY_ELEMENTS,
        ..dom_smoothie::Config::default()
    };
    let mut readability = dom_smoothie::Readability::new(clean, Some(base.as_str()), Some(cfg)).ok()?;
    let article = readability.parse().ok()?;
    if article.text_content.trim().chars().count() < MIN_ARTICLE_CHARS {
        return None;
    }
    Some(Article {
        html: article.content.to_string(),
        title: non_empty(Some(&article.title)),
        excerpt: non_empty(article.excerpt.as_ref()),
        byline: non_empty(article.byline.as_ref()),
        site_name: non_empty(article.site_name.as_ref()),
        language: non_empty(article.lang.as_ref()),
        published_time: non_empty(article.published_time.as_ref()),
    })
}

fn render_html(html: &str, page_url: &Url, formats: &[Format]) -> Rendered {
    let meta = extract_meta(html, &html.to_ascii_lowercase(), page_url);
    let wants = |f: Format| formats.contains(&f);
    let clean = sanitize_html(html);
    let article = readable_article(&clean, &meta.base);
    let (main, extracted) = match &article {
        Some(a) => (a.html.as_str(), Extracted::Article),
        None => (clean.as_str(), Extracted::Page),
    };
    let markdown = (wants(Format::Markdown) || wants(Format::Text)).then(|| to_markdown(main, &meta.base));
    let main_html = wants(Format::Html).then(|| match &article {
        Some(a) => a.html.clone(),
        None => absolute_links_html(&clean, &meta.base),
    });
    let a = article.as_ref();
    Rendered {
        text: wants(Format::Text).then(|| markdown_to_text(markdown.as_deref().unwrap_or_default())),
        markdown: markdown.filter(|_| wants(Format::Markdown)),
        html: wants(Format::Html).then(|| html.to_owned()),
        title: meta.title.or_else(|| a.and_then(|a| a.title.clone())),
        description: meta.description.or_else(|| a.and_then(|a| a.excerpt.clone())),
        byline: meta.author.or_else(|| a.and_then(|a| a.byline.clone())),
        site_name: meta.site_name.or_else(|| a.and_then(|a| a.site_name.clone())),
        language: meta.language.or_else(|| a.and_then(|a| a.language.clone())),
        published_time: meta.published_time.or_else(|| a.and_then(|a| a.published_time.clone())),
        links: meta.links,
        main_html,
        extracted: (wants(Format::Markdown) || wants(Format::Text)).then_some(extracted),
    }
}

/// The sanitized page with `href`/`src` attributes made absolute, for
/// `main_html` when there is no article. The sanitizer escapes `<` in text and
/// writes every attribute as ` name="value"` with `"` escaped, so a `<` always
/// opens a tag and a `"` inside a tag always opens or closes a value.
fn absolute_links_html(clean: &str, base: &Url) -> String {
    let b = clean.as_bytes();
    let mut out = String::with_capacity(clean.len() + clean.len() / 8);
    let (mut i, mut copied, mut in_tag) = (0, 0, false);
    while i < b.len() {
        match b[i] {
            b'<' if !in_tag => in_tag = true,
            b'>' if in_tag => in_tag = false,
            b'"' if in_tag => {
                let value_start = i + 1;
                let value_end = clean[value_start..].find('"').map_or(b.len(), |n| value_start + n);
                let name = clean[..i].trim_end_matches('=');
                if name.ends_with(" href") || name.ends_with(" src") {
                    let raw = &clean[value_start..value_end];
                    let value = raw.replace("&quot;", "\"").replace("&lt;", "<").replace("&amp;", "&");
                    if let Ok(u) = base.join(&value) {
                        if matches!(u.scheme(), "http" | "https" | "mailto") {
                            out.push_str(&clean[copied..value_start]);
                            out.push_str(&u.as_str().replace('&', "&amp;").replace('"', "&quot;"));
                            copied = value_end;
                        }
                    }
                }
                i = value_end;
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&clean[copied.min(clean.len())..]);
    out
}

/// HTML to markdown, with links and images made absolute against `base_url`.
/// The single place to swap in main-content extraction (readability).
pub fn to_markdown(html: &str, base_url: &Url) -> String {
    let (link_base, img_base) = (base_url.clone(), base_url.clone());
    let converter = htmd::HtmlToMarkdown::builder()
        .skip_tags(SKIP_TAGS.to_vec())
        .add_handler(vec!["a"], move |h: &dyn Handlers, el: Element| {
            link_md(h, &el, &link_base)
        })
        .add_handler(vec!["img"], move |_: &dyn Handlers, el: Element| {
            image_md(&el, &img_base)
        })
        .build();
    let Ok(tree) = converter.html_to_tree(html) else {
        return String::new();
    };
    prune_deep(&tree, MAX_DOM_DEPTH);
    converter.tree_to_markdown(&tree)
}

/// Drop everything nested deeper than `max` (iteratively: no recursion here).
fn prune_deep(root: &std::rc::Rc<Node>, max: usize) {
    let mut stack = vec![(root.clone(), 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth >= max {
            node.children.borrow_mut().clear();
            continue;
        }
        stack.extend(node.children.borrow().iter().map(|c| (c.clone(), depth + 1)));
    }
}

fn attr(el: &Element, name: &str) -> Option<String> {
    el.attrs
        .iter()
        .find(|a| &*a.name.local == name)
        .map(|a| a.value.trim().to_owned())
}

/// A markdown link destination; angle brackets when it has characters that
/// would end an inline link early.
fn md_dest(url: &Url) -> String {
    let s = url.as_str();
    if s.contains(['(', ')', ' ']) {
        format!("<{s}>")
    } else {
        s.to_owned()
    }
}

fn link_md(h: &dyn Handlers, el: &Element, base: &Url) -> Option<HandlerResult> {
    let content = h.walk_children(el.node).content;
    let target = attr(el, "href")
        .and_then(|href| base.join(&href).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https" | "mailto"));
    let text = content.trim();
    match target {
        // javascript: and friends keep their text but lose the link.
        None => Some(content.into()),
        Some(_) if text.is_empty() => None,
        Some(url) => {
            let lead = if content.starts_with(char::is_whitespace) {
                " "
            } else {
                ""
            };
            let trail = if content.ends_with(char::is_whitespace) {
                " "
            } else {
                ""
            };
            Some(format!("{lead}[{text}]({}){trail}", md_dest(&url)).into())
        }
    }
}

fn image_md(el: &Element, base: &Url) -> Option<HandlerResult> {
    // data: URIs can be megabytes of base64; lazy-loaded images keep the real
    // URL in data-src.
    let src = attr(el, "src")
        .filter(|s| !s.starts_with("data:"))
        .or_else(|| attr(el, "data-src"))?;
    let url = base
        .join(&src)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))?;
    let alt = attr(el, "alt").unwrap_or_default().replace(['[', ']', '\n'], " ");
    Some(format!("![{}]({})", alt.trim(), md_dest(&url)).into())
}

/// Markdown (as produced by [`to_markdown`]) to plain text: syntax removed,
/// link and image text kept, code kept verbatim.
pub fn markdown_to_text(md: &str) -> String {
    let mut out = String::with_capacity(md.len());
    let mut in_fence = false;
    for line in md.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut l = trimmed;
        while let Some(rest) = l.strip_prefix('>') {
            l = rest.trim_start();
        }
        if l.starts_with('|') && l.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
            continue; // table header separator
        }
        if l.len() >= 3 && l.chars().all(|c| matches!(c, '*' | '-' | '_' | ' ')) {
            out.push('\n'); // thematic break
            continue;
        }
        let heading = l.trim_start_matches('#');
        if heading.len() < l.len() && heading.starts_with(' ') {
            l = heading.trim_start();
        }
        let bullet = ["* ", "- ", "+ "].iter().find_map(|b| l.strip_prefix(b));
        if let Some(rest) = bullet {
            out.push_str("- ");
            l = rest.trim_start();
        }
        let inline = inline_to_text(l);
        if l.starts_with('|') {
            let cells: Vec<&str> = inline.trim_matches('|').split('|').map(str::trim).collect();
            out.push_str(&cells.join("\t"));
        } else {
            out.push_str(inline.trim_end());
        }
        out.push('\n');
    }
    collapse_blank_lines(&out)
}

fn collapse_blank_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.trim().lines() {
        blank = if line.trim().is_empty() { blank + 1 } else { 0 };
        if blank <= 1 {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim_end().to_owned()
}

/// Inline markdown to text: `\x` escapes, emphasis, code spans, links.
fn inline_to_text(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    // Links being read: (index of the `]`, index past the `)`). Their text is
    // kept in place and their destination skipped, without recursion.
    let mut links: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if let Some(&(close, after)) = links.last() {
            if i >= close {
                links.pop();
                i = i.max(after);
                continue;
            }
        }
        match chars[i] {
            '\\' if chars.get(i + 1).is_some_and(|c| c.is_ascii_punctuation()) => {
                out.push(chars[i + 1]);
                i += 2;
            }
            '`' => {
                // Code span: verbatim up to the closing backtick.
                match chars[i + 1..].iter().position(|&c| c == '`') {
                    Some(len) => {
                        out.extend(&chars[i + 1..i + 1 + len]);
                        i += len + 2;
                    }
                    None => i += 1,
                }
            }
            '*' | '_' => i += 1, // literal ones were escaped by the converter
            '!' if chars.get(i + 1) == Some(&'[') => i += 1,
            '[' => {
                match link_end(&chars, i) {
                    Some(link) => links.push(link),
                    None => out.push('['),
                }
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// For `[text](dest)` starting at `open`: the index of the closing `]` and
/// the index just past the closing `)`.
fn link_end(chars: &[char], open: usize) -> Option<(usize, usize)> {
    // Bounded, so stray brackets cannot make this quadratic.
    let chars = &chars[..chars.len().min(open + 16 * 1024)];
    let (mut depth, mut i) = (0usize, open);
    let close = loop {
        match chars.get(i)? {
            '\\' => i += 1,
            '[' => depth += 1,
            ']' if depth == 1 => break i,
            ']' => depth -= 1,
            _ => {}
        }
        i += 1;
    };
    if chars.get(close + 1) != Some(&'(') {
        return None;
    }
    let mut i = close + 2;
    if chars.get(i) == Some(&'<') {
        i += chars[i..].iter().position(|&c| c == '>')?;
    }
    let mut parens = 1usize;
    while parens > 0 {
        match chars.get(i)? {
            '\\' => i += 1,
            '(' => parens += 1,
            ')' => parens -= 1,
            _ => {}
        }
        i += 1;
    }
    Some((close, i))
}

/// One token of the tolerant tag scanner. Names are lowercase; `attrs` is the
/// raw attribute source; raw-text elements (script, title, ...) carry their
/// content, which is not scanned for tags.
enum Tok<'a> {
    Start {
        name: &'a str,
        attrs: &'a str,
        self_closing: bool,
        raw: Option<&'a str>,
    },
    End {
        name: &'a str,
    },
    Text(&'a str),
}

/// Elements whose content the HTML5 tokenizer reads as text (noscript too,
/// as parsers run with scripting enabled, as htmd and dom_smoothie do).
#[rustfmt::skip]
const RAW_TEXT: [&str; 10] = [
    "title", "script", "style", "textarea", "noscript", "iframe", "xmp", "noembed", "noframes",
    "plaintext"
];

/// A forgiving HTML tokenizer (no DOM) used for metadata and by
/// [`sanitize_html`]. `lower` is `html` ASCII-lowercased: same byte offsets,
/// and every offset used falls on an ASCII delimiter, hence a char boundary.
struct Tokens<'a> {
    html: &'a str,
    lower: &'a str,
    pos: usize,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        let (html, lower, len) = (self.html, self.lower, self.html.len());
        loop {
            if self.pos >= len {
                return None;
            }
            let Some(off) = lower[self.pos..].find('<') else {
                let text = &html[self.pos..];
                self.pos = len;
                return Some(Tok::Text(text));
            };
            if off > 0 {
                let text = &html[self.pos..self.pos + off];
                self.pos += off;
                return Some(Tok::Text(text));
            }
            let start = self.pos;
            let rest = &lower[start..];
            let after = |p: Option<usize>, skip: usize| p.map_or(len, |p| start + p + skip);
            if rest.starts_with("<!--") {
                self.pos = after(rest.find("-->"), 3);
                continue;
            }
            if rest.starts_with("<!") || rest.starts_with("<?") {
                self.pos = after(rest.find('>'), 1);
                continue;
            }
            let closing = rest.starts_with("</");
            let name_start = start + 1 + usize::from(closing);
            let name_len = lower[name_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == ':'))
                .unwrap_or(len - name_start);
            let name = &lower[name_start..name_start + name_len];
            if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
                self.pos = start + 1; // a stray '<' is text
                return Some(Tok::Text("<"));
            }
            let attrs_end = tag_close(lower.as_bytes(), name_start + name_len);
            self.pos = (attrs_end + 1).min(len);
            if closing {
                return Some(Tok::End { name });
            }
            let attrs = &html[name_start + name_len..attrs_end];
            let raw = RAW_TEXT.contains(&name).then(|| {
                let close = lower[self.pos..]
                    .find(&format!("</{name}"))
                    .map_or(len, |p| self.pos + p);
                let content = &html[self.pos..close];
                self.pos = close;
                content
            });
            return Some(Tok::Start {
                name,
                attrs,
                self_closing: attrs.trim_end().ends_with('/'),
                raw,
            });
        }
    }
}

fn tokens<'a>(html: &'a str, lower: &'a str) -> Tokens<'a> {
    Tokens { html, lower, pos: 0 }
}

/// Title, description, base URL and links, from the tag scanner over the raw
/// HTML (kept apart from [`to_markdown`], whose output may be reduced to the
/// main content).
#[derive(Debug)]
struct PageMeta {
    title: Option<String>,
    description: Option<String>,
    base: Url,
    links: Vec<String>,
    author: Option<String>,
    site_name: Option<String>,
    language: Option<String>,
    published_time: Option<String>,
}

fn extract_meta(html: &str, lower: &str, page_url: &Url) -> PageMeta {
    let (mut title, mut og_title, mut base_href) = (None, None, None);
    let (mut author, mut site_name, mut published, mut lang, mut content_language) = (None, None, None, None, None);
    let mut descriptions: [Option<String>; 3] = Default::default(); // name=, og:, twitter:
    let mut hrefs = Vec::new();
    let mut in_svg = 0usize; // an icon's <title> is not the page title
    for tok in tokens(html, lower) {
        let Tok::Start { name, attrs, raw, .. } = tok else {
            if let Tok::End { name: "svg" } = tok {
                in_svg = in_svg.saturating_sub(1);
            }
            continue;
        };
        let attrs = parse_attrs(attrs);
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match name {
            "a" | "area" => hrefs.extend(get("href")),
            "html" if lang.is_none() => lang = get("lang").or_else(|| get("xml:lang")),
            "svg" => in_svg += 1,
            "base" if base_href.is_none() => base_href = get("href"),
            "title" if title.is_none() && in_svg == 0 => title = raw.map(decode_entities),
            "meta" => {
                let key = get("name")
                    .or_else(|| get("property"))
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let slot = ["description", "og:description", "twitter:description"]
                    .iter()
                    .position(|k| *k == key);
                if let (Some(s), Some(content)) = (slot, get("content")) {
                    descriptions[s].get_or_insert(content);
                }
                let slot = match key.as_str() {
                    "og:title" => Some(&mut og_title),
                    "author" => Some(&mut author),
                    "og:site_name" => Some(&mut site_name),
                    "article:published_time" => Some(&mut published),
                    _ => None,
                };
                if let Some(slot) = slot.filter(|s| s.is_none()) {
                    *slot = get("content");
                }
                if published.is_none() && get("itemprop").is_some_and(|p| p.eq_ignore_ascii_case("datePublished")) {
                    published = get("content").or_else(|| get("datetime"));
                }
                let equiv = get("http-equiv").unwrap_or_default();
                if content_language.is_none() && equiv.eq_ignore_ascii_case("content-language") {
                    content_language = get("content");
                }
            }
            _ => {}
        }
    }
    let clean = |s: Option<String>| {
        s.map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty())
    };
    let base = base_href
        .and_then(|h| page_url.join(&h).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .unwrap_or_else(|| page_url.clone());
    let mut seen = HashSet::new();
    let links = hrefs
        .iter()
        .filter(|h| !h.starts_with('#'))
        .filter_map(|h| base.join(h).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .map(|mut u| {
            u.set_fragment(None);
            String::from(u)
        })
        .filter(|u| seen.insert(u.clone()))
        .collect();
    let [d0, d1, d2] = descriptions;
    PageMeta {
        title: clean(title).or_else(|| clean(og_title)),
        description: clean(d0.or(d1).or(d2)),
        base,
        links,
        author: clean(author),
        site_name: clean(site_name),
        language: clean(lang).or_else(|| clean(content_language)),
        published_time: clean(published),
    }
}

/// Nesting kept by [`sanitize_html`]; deeper tags are dropped (their text
/// stays). Converters copy a subtree's text once per level, so this bounds
/// their work per byte.
const MAX_NESTING: usize = 128;
/// Formatting elements open at once; more are dropped (text stays).
const MAX_FORMATTING: usize = 16;
/// Nested quotes and lists, each of which prefixes every line of markdown
/// inside it ("> ", indentation): 256 levels would turn 2 bytes into 500.
const MAX_PREFIXING: usize = 8;
const PREFIXING: [&str; 4] = ["blockquote", "ul", "ol", "dl"];

const FORMATTING: [&str; 14] = [
    "a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt", "u",
];
/// Void elements worth keeping; other void ones (input, embed, ...) are dropped.
const VOID: [&str; 8] = ["area", "base", "br", "hr", "img", "link", "meta", "wbr"];
/// Dropped with everything inside: not page text (controls, embeds), or
/// parsed by rules this builder does not model (foreign content, select,
/// template).
#[rustfmt::skip]
const DROP: [&str; 10] = [
    "svg", "math", "select", "template", "object", "applet", "canvas", "datalist", "frameset",
    "button",
];
/// Dropped, content kept: tags with special parsing rules but whose text matters.
#[rustfmt::skip]
const UNWRAP: [&str; 20] = [
    "html", "head", "body", "form", "option", "optgroup", "rb", "rt", "rp", "rtc", "colgroup",
    "col", "input", "embed", "keygen", "param", "source", "track", "frame", "image",
];
/// The spec's "special" elements: end tags of other elements do not close them.
#[rustfmt::skip]
const SPECIAL: [&str; 55] = [
    "address", "applet", "article", "aside", "blockquote", "caption", "center", "dd", "details",
    "dir", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "h1", "h2", "h3", "h4",
    "h5", "h6", "header", "hgroup", "li", "listing", "main", "marquee", "menu", "nav", "ol", "p",
    "pre", "search", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
    "ul", "iframe", "noembed", "noframes", "noscript", "plaintext", "script", "style", "textarea",
    "title", "xmp"
];
/// Elements that bound "has an element in (button) scope".
const SCOPE: [&str; 9] = [
    "applet", "caption", "html", "table", "td", "th", "marquee", "object", "template",
];
/// Start tags that close an open `<p>` first.
#[rustfmt::skip]
const CLOSES_P: [&str; 34] = [
    "address", "article", "aside", "blockquote", "center", "details", "dialog", "dir", "div", "dl",
    "fieldset", "figcaption", "figure", "footer", "header", "hgroup", "main", "menu", "nav", "ol",
    "p", "search", "section", "summary", "ul", "pre", "listing", "table", "xmp", "plaintext", "li",
    "dd", "dt", "hr"
];
const HEADINGS: [&str; 6] = ["h1", "h2", "h3", "h4", "h5", "h6"];

/// Builds the sanitized document: a stack of open elements, emitting every
/// end tag explicitly.
struct Builder<'a> {
    out: String,
    stack: Vec<&'a str>,
    open: std::collections::HashMap<&'a str, usize>,
    formatting: usize,
    prefixing: usize,
}

impl<'a> Builder<'a> {
    fn is_open(&self, name: &str) -> bool {
        self.open.get(name).is_some_and(|&n| n > 0)
    }

    /// Index of the nearest open element in `targets`, looking down the
    /// stack only through elements for which `through` holds.
    fn find(&self, targets: &[&str], through: impl Fn(&str) -> bool) -> Option<usize> {
        if !targets.iter().any(|t| self.is_open(t)) {
            return None;
        }
        let i = self.stack.iter().rposition(|e| targets.contains(e) || !through(e))?;
        targets.contains(&self.stack[i]).then_some(i)
    }

    /// Close the stack down to `len` elements, writing each end tag.
    fn close_to(&mut self, len: usize) {
        while self.stack.len() > len {
            if let Some(top) = self.stack.pop() {
                self.open.entry(top).and_modify(|n| *n -= 1);
                self.formatting -= usize::from(FORMATTING.contains(&top));
                self.prefixing -= usize::from(PREFIXING.contains(&top));
                self.out.push_str("</");
                self.out.push_str(top);
                self.out.push('>');
            }
        }
    }

    fn close(&mut self, targets: &[&str], through: impl Fn(&str) -> bool) {
        if let Some(i) = self.find(targets, through) {
            self.close_to(i);
        }
    }

    fn in_table_context(&self) -> bool {
        self.stack
            .last()
            .is_some_and(|t| matches!(*t, "table" | "thead" | "tbody" | "tfoot" | "tr"))
    }

    fn text(&mut self, text: &str) {
        if !self.in_table_context() {
            // Re-escaping '<' means the parser sees exactly our tags.
            self.out.push_str(&text.replace('<', "&lt;"));
        }
    }

    fn start(&mut self, name: &'a str, attrs: &str) {
        let not_scope = |e: &str| !SCOPE.contains(&e);
        let not_table = |e: &str| !matches!(e, "table" | "html");
        let item_through = |e: &str| !SPECIAL.contains(&e) || matches!(e, "address" | "div" | "p");
        // The implicit closes of the HTML5 tree builder, made explicit.
        match name {
            "li" => self.close(&["li"], item_through),
            "dt" | "dd" => self.close(&["dt", "dd"], item_through),
            "td" | "th" => self.close(&["td", "th"], not_table),
            "tr" => self.close(&["tr"], not_table),
            "thead" | "tbody" | "tfoot" => self.close(&["thead", "tbody", "tfoot"], not_table),
            "a" | "nobr" => self.close(&[name], not_scope),
            _ => {}
        }
        if CLOSES_P.contains(&name) || HEADINGS.contains(&name) {
            self.close(&["p"], not_scope);
        }
        if HEADINGS.contains(&name) && self.stack.last().is_some_and(|t| HEADINGS.contains(t)) {
            self.close_to(self.stack.len() - 1);
        }
        // Table parts only where they belong, and only they directly in
        // tables: elsewhere the parser moves or re-parents things.
        let top = self.stack.last().copied().unwrap_or_default();
        let misplaced = match name {
            "td" | "th" => !matches!(top, "tr" | "tbody" | "thead" | "tfoot" | "table"),
            "tr" => !matches!(top, "tbody" | "thead" | "tfoot" | "table"),
            "thead" | "tbody" | "tfoot" | "caption" => top != "table",
            _ => self.in_table_context(),
        };
        if misplaced
            || self.stack.len() >= MAX_NESTING
            || FORMATTING.contains(&name) && self.formatting >= MAX_FORMATTING
            || PREFIXING.contains(&name) && self.prefixing >= MAX_PREFIXING
        {
            return;
        }
        // The parser would add these wrappers itself; adding them here keeps
        // our stack the same as its.
        if matches!(name, "td" | "th") && matches!(top, "table" | "thead" | "tbody" | "tfoot") {
            self.start("tr", "");
        } else if name == "tr" && top == "table" {
            self.start("tbody", "");
        }
        self.out.push('<');
        self.out.push_str(name);
        for (attr, value) in parse_attrs(attrs) {
            let valid = !attr.is_empty() && attr.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
            if valid && !attr.starts_with("on") {
                let value = value.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
                self.out.push_str(&format!(" {attr}=\"{value}\""));
            }
        }
        self.out.push('>');
        if !VOID.contains(&name) {
            self.stack.push(name);
            *self.open.entry(name).or_default() += 1;
            self.formatting += usize::from(FORMATTING.contains(&name));
            self.prefixing += usize::from(PREFIXING.contains(&name));
        }
    }

    fn end(&mut self, name: &str) {
        if VOID.contains(&name) {
            return;
        }
        if HEADINGS.contains(&name) {
            self.close(&HEADINGS, |e| !SCOPE.contains(&e));
        } else if SPECIAL.contains(&name) || FORMATTING.contains(&name) {
            self.close(&[name], |e| {
                !(SCOPE.contains(&e) || name == "li" && matches!(e, "ul" | "ol"))
            });
        } else {
            self.close(&[name], |e| !SPECIAL.contains(&e));
        }
    }
}

/// Re-emit untrusted HTML as balanced markup that any HTML5 parser handles
/// in linear time and space, for the converter (htmd, or a readability crate).
///
/// Raw pages can make the HTML5 tree builder (html5ever) do pathological
/// work: it is quadratic in nesting depth (40,000 nested `<div>`s, 200 KB,
/// take ~9 s), and it re-creates unclosed formatting elements after every
/// block that closed them implicitly ("reconstruct the active formatting
/// elements"), so 160 KB of `<p><b><i>...` then `</p><p>x` builds a 200 MB
/// tree. Here every element is closed explicitly, the parser's implicit
/// closes are made explicit, nesting is capped, and constructs with special
/// parsing rules (svg, math, select, template, ...) are dropped, so the
/// parser never restructures anything. Scripts, styles, comments and event
/// handler attributes are dropped too; text and other attributes are kept.
pub fn sanitize_html(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let mut b = Builder {
        out: String::with_capacity(html.len()),
        stack: Vec::new(),
        open: Default::default(),
        formatting: 0,
        prefixing: 0,
    };
    b.out.push_str("<!DOCTYPE html>"); // no-quirks mode: one set of rules
    let mut dropping: Option<(&str, usize)> = None; // inside a DROP element
    for tok in tokens(html, &lower) {
        if let Some((name, depth)) = dropping.as_mut() {
            match tok {
                Tok::Start {
                    name: n,
                    self_closing: false,
                    ..
                } if n == *name => *depth += 1,
                Tok::End { name: n } if n == *name => *depth -= 1,
                _ => {}
            }
            if *depth == 0 {
                dropping = None;
            }
            continue;
        }
        match tok {
            Tok::Text(text) => b.text(text),
            Tok::End { name } => b.end(name),
            Tok::Start { name, self_closing, .. } if DROP.contains(&name) => {
                if !self_closing {
                    dropping = Some((name, 1));
                }
            }
            Tok::Start {
                name, raw: Some(raw), ..
            } => match name {
                "title" => {
                    b.out.push_str("<title>");
                    b.out.push_str(&raw.replace('<', "&lt;"));
                    b.out.push_str("</title>");
                }
                "xmp" | "plaintext" => {
                    b.start("pre", "");
                    b.text(raw);
                    b.end("pre");
                }
                _ => {} // script, style, noscript, iframe, textarea, ...
            },
            Tok::Start { name, .. } if UNWRAP.contains(&name) => {}
            Tok::Start { name, attrs, .. } => b.start(name, attrs),
        }
    }
    b.close_to(0);
    b.out
}

/// Index of the `>` closing a tag whose attributes start at `from` (or the
/// end of input); quotes only count after `=`, as in the HTML tokenizer.
fn tag_close(b: &[u8], from: usize) -> usize {
    let (mut i, mut quote, mut prev) = (from, None, b' ');
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'>' => return i,
            None if (c == b'"' || c == b'\'') && prev == b'=' => quote = Some(c),
            None => {}
        }
        if !c.is_ascii_whitespace() {
            prev = c;
        }
        i += 1;
    }
    b.len()
}

/// Attributes as (lowercase name, entity-decoded value).
fn parse_attrs(src: &str) -> Vec<(String, String)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i].is_ascii_whitespace() || b[*i] == b'/') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            return out;
        }
        let name_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' && b[i] != b'/' {
            i += 1;
        }
        let name = src[name_start..i].to_ascii_lowercase();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            let (start, end) = match b.get(i) {
                Some(&q) if q == b'"' || q == b'\'' => {
                    let end = src[i + 1..].find(char::from(q)).map_or(b.len(), |p| i + 1 + p);
                    (i + 1, end)
                }
                _ => (
                    i,
                    src[i..]
                        .find(|c: char| c.is_ascii_whitespace())
                        .map_or(b.len(), |p| i + p),
                ),
            };
            value = decode_entities(&src[start..end]);
            i = (end + 1).min(b.len()).max(start);
        }
        // An empty name means a stray '=', which the value branch consumed.
        if !name.is_empty() {
            out.push((name, value));
        }
    }
}

/// Decode the character references that matter in titles, descriptions and
/// URLs: numeric ones and a few common names. Unknown ones stay as written.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let semi = rest.as_bytes().iter().take(12).position(|&b| b == b';');
        let decoded = semi.and_then(|semi| {
            let name = &rest[1..semi];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ => name.strip_prefix('#').and_then(|n| {
                    let code = match n.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => n.parse().ok(),
                    };
                    code.and_then(char::from_u32)
                }),
            };
            c.map(|c| (c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    const PAGE: &str = r##"<!doctype html><html><head><title> A &amp; B
        title</title><meta name="description" content="Desc &quot;q&quot;">
        <meta property="og:description" content="og"><base href="/docs/">
        <script>var secret = "SCRIPT";</script><style>p { color: red }</style></head>
        <body><svg><title>icon</title></svg><h1>Hello <em>world</em></h1>
        <p>snake_case, 2*3 and <a href="page?x=1#frag">a link</a> and <a href='https://other.example/'>abs</a>.</p>
        <a href="#top">top</a><a href="javascript:alert(1)">js</a><a href="mailto:a@b.c">mail</a>
        <a href=page?x=1>dup</a><img src="/i.png" alt="pic"><img src="data:image/png;base64,AAAA">
        <ul><li>one</li><li>two <code>c_d</code></li></ul><noscript>NOSCRIPT</noscript></body></html>"##;

    #[test]
    fn meta_title_description_links() {
        let m = extract_meta(PAGE, &PAGE.to_ascii_lowercase(), &url("https://site.example/a/b.html"));
        assert_eq!(m.title.as_deref(), Some("A & B title"));
        assert_eq!(m.description.as_deref(), Some("Desc \"q\""));
        assert_eq!(m.base.as_str(), "https://site.example/docs/");
        assert_eq!(
            m.links,
            ["https://site.example/docs/page?x=1", "https://other.example/"]
        );
    }

    #[test]
    fn markdown_is_clean_and_absolute() {
        let md = to_markdown(PAGE, &url("https://site.example/docs/"));
        assert!(md.contains("# Hello *world*"), "{md}");
        assert!(md.contains("[a link](https://site.example/docs/page?x=1#frag)"), "{md}");
        assert!(md.contains("![pic](https://site.example/i.png)"), "{md}");
        for gone in [
            "SCRIPT",
            "color: red",
            "NOSCRIPT",
            "icon",
            "data:",
            "javascript",
            "A & B",
        ] {
            assert!(!md.contains(gone), "{gone:?} in {md}");
        }
        let text = markdown_to_text(&md);
        assert!(text.starts_with("Hello world\n"), "{text}");
        assert!(text.contains("snake_case, 2*3 and a link and abs."), "{text}");
        assert!(text.contains("- two c_d"), "{text}");
        assert!(!text.contains("](") && !text.contains('\\'), "{text}");
    }

    #[test]
    fn text_from_markdown_edge_cases() {
        let md = "## Title\n\n> quoted **bold**\n\n[![alt](x.png)](https://a/(b))\n\n```\nlet a_b = *p;\n```\n\n* * *\n\n| h | i |\n| --- | --- |\n| v | w |";
        assert_eq!(
            markdown_to_text(md),
            "Title\n\nquoted bold\n\nalt\n\nlet a_b = *p;\n\nh\ti\nv\tw"
        );
    }

    #[test]
    fn deep_trees_are_pruned_before_conversion() {
        // Unpruned, 3,000 levels overflow a 2 MiB stack (~1 KiB per level).
        let n = 3_000;
        let html = format!(
            "<p>top</p>{}<ul><li><a href=x>deep</a>{}",
            "<div>".repeat(n),
            "</div>".repeat(n)
        );
        let md = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || to_markdown(&html, &Url::parse("https://x.example/").unwrap()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(md, "top");
    }

    #[test]
    fn sanitizer_makes_implicit_structure_explicit() {
        let cases = [
            ("<p><b>bold<div>block</div>", "<p><b>bold</b></p><div>block</div>"),
            ("<ul><li>a<li>b</ul>", "<ul><li>a</li><li>b</li></ul>"),
            (
                "<table><tr><td>1<td>2<tr><td>3</table>",
                "<table><tbody><tr><td>1</td><td>2</td></tr><tr><td>3</td></tr></tbody></table>",
            ),
            (
                "<table>stray<div>x</div><td>ok</table>",
                "<table><tbody><tr><td>ok</td></tr></tbody></table>",
            ),
            ("<td>no table</td>", "no table"),
            (
                "<a href=1>one<a href=2>two",
                "<a href=\"1\">one</a><a href=\"2\">two</a>",
            ),
            ("<h1>a<h2>b</h1>c", "<h1>a</h1><h2>b</h2>c"),
            ("<div><span>x</div>y", "<div><span>x</span></div>y"),
            (
                "1 < 2 <script>if (a<b) x()</script><style>p{}</style><!-- c -->",
                "1 &lt; 2 ",
            ),
            ("<svg><g><title>t</title></g></svg><select><option>o</select>ok", "ok"),
            (
                "<p onclick=evil() class=\"a&amp;b\" x=\"q&quot;\">t",
                "<p class=\"a&amp;b\" x=\"q&quot;\">t</p>",
            ),
            ("<xmp><b></xmp>", "<pre>&lt;b></pre>"),
            (
                "<form><label>q</label><button>go</button><input name=q></form>",
                "<label>q</label>",
            ),
        ];
        for (html, want) in cases {
            assert_eq!(sanitize_html(html), format!("<!DOCTYPE html>{want}"), "{html}");
        }
    }

    /// Pathological shapes found by fuzzing the raw parser: after
    /// sanitizing, each parses into a shallow tree of proportionate size.
    #[test]
    fn sanitized_pathological_markup_parses_shallow() {
        let attr_bombs: String = (0..40).map(|i| format!("<b a={i}>")).collect();
        let shapes = [
            "<div>".repeat(20_000),
            format!("<svg>{}", "<g>".repeat(20_000)),
            format!("<p>{attr_bombs}{}", "</p><p>x".repeat(20_000)),
            format!(
                "<p>{}{}",
                "<b><i><u><s><em><strong><font><tt><big>".repeat(3),
                "</p><p>x".repeat(20_000)
            ),
            "<table><tr><td>".repeat(5_000),
            "<math><div><li><b><button>".repeat(5_000),
            "<a href=y><pre><code>".repeat(5_000),
            "<a href=y><li><h1></g><dd><dl><strong><li>".repeat(5_000),
            "<tr></p><s><code>".repeat(5_000),
            "<span><pre><nobr><em><i x=1>".repeat(5_000),
            format!("<template><p></td><mi><form>{}", "<pre>".repeat(20_000)),
            "<strong><nobr><form>".repeat(5_000),
            "<b><p>misnested</b></p>".repeat(5_000),
        ];
        let converter = htmd::HtmlToMarkdown::new();
        for html in &shapes {
            let clean = sanitize_html(html);
            let tree = converter.html_to_tree(&clean).unwrap();
            let (mut nodes, mut depth, mut stack) = (0, 0, vec![(tree, 0)]);
            while let Some((node, d)) = stack.pop() {
                nodes += 1;
                depth = depth.max(d);
                stack.extend(node.children.borrow().iter().map(|c| (c.clone(), d + 1)));
            }
            assert!(depth <= MAX_NESTING + 8, "depth {depth} for {}", &html[..60]);
            assert!(nodes <= 2 * html.len() / 3 + 100, "{nodes} nodes for {}", &html[..60]);
        }
    }

    #[test]
    fn content_types_and_decoding() {
        assert_eq!(classify_content_type("text/html; charset=utf-8"), Ok(true));
        assert_eq!(classify_content_type("Application/XHTML+XML"), Ok(true));
        assert_eq!(classify_content_type("text/plain"), Ok(false));
        assert_eq!(classify_content_type("application/rss+xml"), Ok(false));
        assert!(classify_content_type("image/svg+xml").is_err());
        assert!(classify_content_type("application/octet-stream").is_err());
        assert!(classify_content_type("application/pdf").is_err());
        assert_eq!(sniff_html(b"<!DOCTYPE html><p>x"), Some(true));
        assert_eq!(sniff_html(b"just words"), Some(false));
        assert_eq!(sniff_html(b"\x89PNG\r\n\x1a\n\0\0"), None);
        assert_eq!(
            decode(b"caf\xe9 \x93q\x94", Some("text/html; charset=ISO-8859-1")),
            "café “q”"
        );
        assert_eq!(
            decode(b"<meta charset=\"windows-1252\">\xe9", None),
            "<meta charset=\"windows-1252\">é"
        );
        assert_eq!(decode("\u{feff}café".as_bytes(), Some("text/html")), "café");
        assert_eq!(
            decode_entities("a&amp;b &#233;&#xE9; &bogus; & &#xZZ;"),
            "a&b éé &bogus; & &#xZZ;"
        );
    }

    #[test]
    fn scanner_survives_malformed_markup() {
        for html in [
            "<",
            "<a",
            "<a href=\"x",
            "<a =\"é\"é>",
            "<title>unterminated",
            "<!-- x",
            "<meta content=é name=description",
            "é<é>é</",
        ] {
            let _ = extract_meta(html, &html.to_ascii_lowercase(), &url("https://x.example/"));
            let _ = sanitize_html(html);
        }
        let html = "<meta content='é ok' name=description><a href=é>";
        let m = extract_meta(html, &html.to_ascii_lowercase(), &url("https://x.example/"));
        assert_eq!(m.description.as_deref(), Some("é ok"));
        assert_eq!(m.links, ["https://x.example/%C3%A9"]);
    }

    #[test]
    fn page_metadata_beyond_title() {
        let html = r#"<html lang=de><head><meta name=author content=" Ann  Lee ">
            <meta property="og:site_name" content="Site"><meta http-equiv="Content-Language" content="fr">
            <meta itemprop="datePublished" content="2026-01-02"></head></html>"#;
        let m = extract_meta(html, &html.to_ascii_lowercase(), &url("https://x.example/"));
        assert_eq!(m.author.as_deref(), Some("Ann Lee"));
        assert_eq!(m.site_name.as_deref(), Some("Site"));
        assert_eq!(m.language.as_deref(), Some("de"));
        assert_eq!(m.published_time.as_deref(), Some("2026-01-02"));
        let html = r#"<meta http-equiv="content-language" content="fr">"#;
        let m = extract_meta(html, &html.to_ascii_lowercase(), &url("https://x.example/"));
        assert_eq!(m.language.as_deref(), Some("fr"));
    }

    #[test]
    fn fallback_html_gets_absolute_links() {
        let clean = sanitize_html(
            r#"<p title='a href="x"'>see href="y" <a href="b?x=1&amp;y=2">b</a><img src=/i.png alt=">"><a href="javascript:x()">j</a>"#,
        );
        let out = absolute_links_html(&clean, &url("https://x.example/d/"));
        assert_eq!(
            out,
            "<!DOCTYPE html><p title=\"a href=&quot;x&quot;\">see href=\"y\" \
             <a href=\"https://x.example/d/b?x=1&amp;y=2\">b</a>\
             <img src=\"https://x.example/i.png\" alt=\">\">\
             <a href=\"javascript:x()\">j</a></p>"
        );
    }

    #[test]
    fn formats_merge_and_default() {
        let req: ScrapeRequest = serde_json::from_str(r#"{"urls":["u"]}"#).unwrap();
        assert_eq!(req.requested_formats(), [Format::Markdown]);
        let req: ScrapeRequest =
            serde_json::from_str(r#"{"urls":["u"],"format":"text","formats":["html","text"]}"#).unwrap();
        assert_eq!(req.requested_formats(), [Format::Html, Format::Text]);
    }
}
