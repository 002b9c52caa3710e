//! A blocking HTTP client for tests, on hyper.
//!
//! Every request uses a fresh connection, so tests never depend on connection reuse, and header
//! values are raw bytes, so tests can send obs-text (0x80-0xFF) and duplicate header names. The
//! requests run on a background tokio runtime: the functions can be called from plain tests and
//! from inside async code alike (where `Runtime::block_on` would panic).

use std::future::Future;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Every header as received: names in lower case, duplicates kept, values as raw bytes.
    /// Values of one name stay in the order they arrived (they are grouped by name).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The trailers (HTTP/2, or chunked HTTP/1.1), as `headers`; empty when there were none.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }

    /// The first value of header `name` as (lossy) UTF-8.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|value| String::from_utf8_lossy(value).into_owned())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
            .collect()
    }

    /// The first value of trailer `name` (case-insensitive) as (lossy) UTF-8.
    pub fn trailer_str(&self, name: &str) -> Option<String> {
        self.trailers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn try_json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body (status {}) is not JSON: {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body parsed as JSON; panics with the status and body if it is not JSON (for tests).
    pub fn json(&self) -> serde_json::Value {
        match self.try_json() {
            Ok(value) => value,
            Err(error) => panic!("{error:#}"),
        }
    }
}

/// How to send a request.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// For the whole exchange: connect, send, receive the complete body.
    pub timeout: Duration,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            http2: false,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Sends one HTTP/1.1 request on a new connection and reads the whole response.
///
/// `url` is `http://host:port/path?query`. A `Host` header is added from the URL unless
/// `headers` has one. Header values may contain any byte HTTP allows, including obs-text.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &[u8])],
    body: impl AsRef<[u8]>,
) -> Result<Response> {
    http_request_with(&RequestOptions::default(), method, url, headers, body)
}

/// Like [`http_request`], over HTTP/2 with prior knowledge (h2c).
pub fn http2_request(
    method: &str,
    url: &str,
    headers: &[(&str, &[u8])],
    body: impl AsRef<[u8]>,
) -> Result<Response> {
    let options = RequestOptions {
        http2: true,
        ..RequestOptions::default()
    };
    http_request_with(&options, method, url, headers, body)
}

/// Sends one request as `options` say.
pub fn http_request_with(
    options: &RequestOptions,
    method: &str,
    url: &str,
    headers: &[(&str, &[u8])],
    body: impl AsRef<[u8]>,
) -> Result<Response> {
    let request = build_request(options, method, url, headers, body.as_ref())
        .with_context(|| format!("invalid request {method} {url}"))?;
    let authority = request_authority(url)?;
    let http2 = options.http2;
    let timeout = options.timeout;
    let exchange = async move {
        match tokio::time::timeout(timeout, send(authority.clone(), request, http2)).await {
            Ok(result) => result,
            Err(_) => Err(anyhow!("no complete response within {timeout:?}")),
        }
    };
    run_blocking(exchange).with_context(|| format!("{method} {url}"))
}

fn build_request(
    options: &RequestOptions,
    method: &str,
    url: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Request<Full<Bytes>>> {
    let uri: Uri = url.parse().context("cannot parse the URL")?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported");
    }
    let authority = uri
        .authority()
        .context("the URL has no host")?
        .as_str()
        .to_owned();
    let path = uri
        .path_and_query()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    // HTTP/1.1 wants origin-form plus Host; HTTP/2 takes :authority from an absolute URI.
    let target: Uri = if options.http2 {
        uri
    } else {
        path.parse().context("cannot parse the path")?
    };
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).context("invalid method")?)
        .uri(target)
        .body(Full::new(Bytes::copy_from_slice(body)))?;
    let header_map = request.headers_mut();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_bytes(value)
            .with_context(|| format!("invalid value for header {name}"))?;
        header_map.append(name, value);
    }
    if !options.http2 && !header_map.contains_key(HOST) {
        header_map.insert(HOST, HeaderValue::from_str(&authority)?);
    }
    Ok(request)
}

fn request_authority(url: &str) -> Result<String> {
    let uri: Uri = url.parse().context("cannot parse the URL")?;
    let host = uri.host().context("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

async fn send(authority: String, request: Request<Full<Bytes>>, http2: bool) -> Result<Response> {
    let stream = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .context("HTTP/2 handshake failed")?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .context("HTTP/1.1 handshake failed")?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let collected = response
        .into_body()
        .collect()
        .await
        .context("the response body was cut off")?;
    let trailers = collected
        .trailers()
        .map(|trailers| {
            trailers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let body = collected.to_bytes().to_vec();
    Ok(Response {
        status,
        headers,
        body,
        trailers,
    })
}

/// Runs `future` to completion on the shared background runtime and waits for it.
pub(crate) fn run_blocking<T: Send + 'static>(
    future: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (done, result) = mpsc::channel();
    background_runtime()?.spawn(async move {
        let _ = done.send(future.await);
    });
    result
        .recv()
        .map_err(|_| anyhow!("the request task panicked"))?
}

fn background_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::io::Result<tokio::runtime::Runtime>> = OnceLock::new();
    // Built inside get_or_init so that no runtime is ever dropped: dropping one from async
    // code panics.
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("eastwest-e2e-client")
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|error| anyhow!("cannot start the HTTP client's tokio runtime: {error}"))
}
