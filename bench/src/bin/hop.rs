//! A bare HTTP/1.1 forwarding proxy: the least any process between a client
//! and the upstream can do. `bench/run.sh` chains two of them in front of
//! `fake-upstream` (the same number of processes as gateway and node) to
//! measure what two hops cost on this machine with no authentication,
//! routing, metering or accounting at all: the floor under the gateway's
//! figures.
//!
//! Each client connection gets one keep-alive connection of its own to the
//! upstream (no pool to look up, no task per request). A request goes out as
//! it came in, with its body streamed; the answer comes back the same way.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Bare HTTP/1.1 forwarding proxy on 127.0.0.1 (benchmark floor)")]
struct Args {
    /// Port to listen on (0 picks a free one; the chosen port is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to forward, as host:port on loopback (e.g. 127.0.0.1:8080).
    #[arg(long)]
    to: SocketAddr,
}

type Answer = Response<BoxBody<Bytes, hyper::Error>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.to.ip().is_loopback(), "--to must be a loopback address");
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let to = args.to;
    tokio::select! {
        res = accept(listener, to) => res,
        res = tokio::signal::ctrl_c() => res.context("waiting for Ctrl-C"),
    }
}

async fn accept(listener: TcpListener, to: SocketAddr) -> anyhow::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(client, to).await {
                eprintln!("hop: connection ended: {e:#}");
            }
        });
    }
}

/// Serves one client connection through one upstream connection of its own.
async fn serve(client: TcpStream, to: SocketAddr) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let upstream = TcpStream::connect(to).await.context("connecting to the upstream")?;
    upstream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // HTTP/1 serves one request at a time per connection, so this lock is
    // never contended; it only hands the sender to each request in turn.
    let sender = Arc::new(Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move { Ok::<_, std::convert::Infallible>(forward(&sender, req).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}

async fn forward(sender: &Mutex<SendRequest<Incoming>>, req: Request<Incoming>) -> Answer {
    let mut sender = sender.lock().await;
    let sent = match sender.ready().await {
        Ok(()) => sender.send_request(req).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(answer) => answer.map(BodyExt::boxed),
        Err(e) => {
            let body = Full::new(Bytes::from(format!("hop: upstream failed: {e}\n")))
                .map_err(|never| match never {})
                .boxed();
            let mut answer = Response::new(body);
            *answer.status_mut() = StatusCode::BAD_GATEWAY;
            answer
        }
    }
}
