//! `wsbridge-relay-bench`: round trips through a WebSocket relay, against an echo server.
//!
//! Two subcommands:
//! - `echo-server` answers every text or binary message with the same message; it is the upstream
//!   behind a `[[proxies]]` route (or nginx, or nothing at all for the direct baseline).
//! - `run` opens N client connections to a URL, sends a fixed total rate of binary messages spread
//!   evenly over them for a fixed time, and measures each echo's round trip from the message's
//!   *intended* send time on the schedule. A client that falls behind therefore shows up as latency
//!   instead of hiding it (no coordinated omission).
//!
//! Each client's connection is one task: a sender that follows the schedule and a receiver that
//! records latencies, joined; the receiver stops once every message sent was echoed, or at the
//! deadline (`--duration` plus `--drain`), so every run stops by itself. Traffic goes only to
//! loopback addresses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// Echo server and load generator for measuring a WebSocket relay.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Echo every text and binary message back on the same connection, until killed.
    EchoServer(EchoArgs),
    /// Send messages at a fixed total rate over N connections and measure their echoes.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct EchoArgs {
    /// Loopback address to listen on, e.g. 127.0.0.1:9101.
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// WebSocket URL of an echo server, directly or through a relay (loopback hosts only).
    #[arg(long)]
    url: String,
    /// Client connections.
    #[arg(long, short = 'n', default_value_t = 100)]
    clients: usize,
    /// Messages per second over all connections together.
    #[arg(long, short, default_value_t = 10_000)]
    rate: u64,
    /// How long to send, e.g. 10s.
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Bytes in each message (at least 8: the intended send time).
    #[arg(long, default_value_t = 128)]
    payload_size: usize,
    /// How long to wait for the last echoes after sending stops.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Longest time to open all connections.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Print one JSON line with the results instead of text.
    #[arg(long)]
    json: bool,
}

/// Most client connections one run opens.
const MAX_CLIENTS: usize = 10_000;
/// Connections opened at once while connecting.
const CONNECT_BATCH: usize = 100;
/// Socket buffers per connection: messages are small and there are many connections.
const BUFFER_SIZE: usize = 4096;
/// Latencies a connection collects before adding them to the shared histogram.
const LATENCY_BATCH: usize = 64;
/// Messages the echo server answers before it flushes, if more are already waiting.
const ECHO_BATCH: usize = 64;
/// The first message's intended send time is this long after the last connection opened.
const START_DELAY: Duration = Duration::from_millis(100);
/// How long a connection waits for the close handshake after its last echo.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::EchoServer(args) => runtime.block_on(echo_server(args)),
        Command::Run(args) => {
            let target = check_run_args(&args)?;
            runtime.block_on(run(args, target))
        }
    }
}

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(BUFFER_SIZE)
        .write_buffer_size(BUFFER_SIZE)
}

// ---------------------------------------------------------------------------------------------
// echo-server

async fn echo_server(args: EchoArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!("--listen {} is not a loopback address", args.listen);
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("echo server on ws://{}/", listener.local_addr()?);
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to close instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = echo(socket).await;
        });
    }
}

/// Echoes one connection's messages until it closes; flushes once per batch of ready messages.
async fn echo(socket: TcpStream) -> Result<(), tungstenite::Error> {
    socket.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async_with_config(socket, Some(socket_config())).await?;
    while let Some(message) = ws.next().await {
        echo_one(&mut ws, message?).await?;
        for _ in 1..ECHO_BATCH {
            match ws.next().now_or_never() {
                Some(Some(message)) => echo_one(&mut ws, message?).await?,
                // The stream ended: the loop's next `next()` says so again.
                Some(None) => break,
                None => break,
            }
        }
        ws.flush().await?;
    }
    Ok(())
}

async fn echo_one<S>(ws: &mut S, message: Message) -> Result<(), tungstenite::Error>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    match message {
        // Pings, pongs and the close handshake are answered by tungstenite itself.
        Message::Text(_) | Message::Binary(_) => ws.feed(message).await,
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// run

/// Checks the arguments of `run`; returns the URL's authority for the report.
fn check_run_args(args: &RunArgs) -> anyhow::Result<String> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("--url {:?} is not a URL", args.url))?;
    if uri.scheme_str() != Some("ws") {
        bail!("--url {:?}: only ws:// URLs are supported", args.url);
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !matches!(host, "127.0.0.1" | "::1" | "localhost") {
        bail!(
            "--url {:?}: the host must be 127.0.0.1, ::1 or localhost",
            args.url
        );
    }
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        bail!("--clients must be between 1 and {MAX_CLIENTS}");
    }
    if args.rate == 0 {
        bail!("--rate must be greater than zero");
    }
    if args.duration.is_zero() {
        bail!("--duration must be greater than zero");
    }
    if args.payload_size < 8 {
        bail!("--payload-size must be at least 8 (the send time)");
    }
    Ok(uri.authority().map(|a| a.to_string()).unwrap_or_default())
}

/// The send schedule: message `k` (counted over all connections) is due `k / rate` seconds after
/// the epoch and goes out on connection `k % clients`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    clients: u64,
    rate: u64,
    /// Messages over all connections.
    total: u64,
}

impl Schedule {
    fn new(clients: usize, rate: u64, duration: Duration) -> Self {
        Schedule {
            clients: clients as u64,
            rate,
            total: (rate as f64 * duration.as_secs_f64()) as u64,
        }
    }

    /// How many messages connection `index` sends.
    fn count(&self, index: u64) -> u64 {
        if index >= self.total {
            0
        } else {
            (self.total - index).div_ceil(self.clients)
        }
    }

    /// When connection `index`'s `n`th message is due, after the epoch.
    fn due(&self, index: u64, n: u64) -> Duration {
        let k = index + n * self.clients;
        Duration::from_nanos((k as u128 * 1_000_000_000 / self.rate as u128) as u64)
    }
}

/// What all connections counted together.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    echoed: AtomicU64,
    /// Echoes that were not a binary message carrying a send time.
    unexpected: AtomicU64,
    /// Connections that ended with an error before their last echo.
    failed: AtomicU64,
    /// When the last echo arrived, in nanoseconds after the epoch.
    last_echo_ns: AtomicU64,
}

/// The latencies of all connections, in nanoseconds.
type Latencies = Mutex<Histogram<u64>>;

/// Everything a connection task shares with the others.
struct Shared {
    epoch: Instant,
    deadline: Instant,
    schedule: Schedule,
    payload_size: usize,
    totals: Totals,
    latencies: Latencies,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn run(args: RunArgs, target: String) -> anyhow::Result<()> {
    let connect_deadline = Instant::now() + args.connect_timeout;
    let mut sockets = Vec::with_capacity(args.clients);
    while sockets.len() < args.clients {
        let batch = CONNECT_BATCH.min(args.clients - sockets.len());
        let connecting = (0..batch).map(|_| connect(&args.url));
        let opened =
            tokio::time::timeout_at(connect_deadline, futures_util::future::join_all(connecting))
                .await
                .with_context(|| {
                    format!(
                        "opened only {} of {} connections within {}",
                        sockets.len(),
                        args.clients,
                        humantime::format_duration(args.connect_timeout)
                    )
                })?;
        for ws in opened {
            sockets.push(ws?);
        }
    }

    let epoch = Instant::now() + START_DELAY;
    let schedule = Schedule::new(args.clients, args.rate, args.duration);
    let shared = Arc::new(Shared {
        epoch,
        deadline: epoch + args.duration + args.drain,
        schedule,
        payload_size: args.payload_size,
        totals: Totals::default(),
        latencies: Mutex::new(Histogram::new_with_bounds(1, 60_000_000_000, 3)?),
    });
    if !args.json {
        println!(
            "{} connections to {}; {} msg/s in total for {} ({} bytes each)",
            args.clients,
            args.url,
            args.rate,
            humantime::format_duration(args.duration),
            args.payload_size
        );
    }
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, ws)| tokio::spawn(connection(ws, index as u64, shared.clone())))
        .collect();
    for task in tasks {
        task.await?;
    }

    let totals = &shared.totals;
    let sent = totals.sent.load(Ordering::Relaxed);
    let echoed = totals.echoed.load(Ordering::Relaxed);
    let last_echo = Duration::from_nanos(totals.last_echo_ns.load(Ordering::Relaxed));
    // From the first message's intended send time to the last echo (or the schedule's end).
    let span = last_echo.max(args.duration).as_secs_f64();
    let histogram = shared
        .latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("a connection task panicked"))?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1e6;
    let report = Report {
        target,
        clients: args.clients,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        payload_size: args.payload_size,
        scheduled: schedule.total,
        sent,
        echoed,
        lost: sent.saturating_sub(echoed),
        unexpected: totals.unexpected.load(Ordering::Relaxed),
        failed_connections: totals.failed.load(Ordering::Relaxed),
        echoes_per_s: echoed as f64 / span,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1e6,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(socket_config()), true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

/// Sends connection `index`'s share of the schedule and receives the echoes, then closes.
async fn connection(ws: Ws, index: u64, shared: Arc<Shared>) {
    let (mut sink, mut stream) = ws.split();
    let sent = AtomicU64::new(0);
    let finished = tokio::sync::Notify::new();
    let sending = async {
        let result =
            tokio::time::timeout_at(shared.deadline, send(&mut sink, index, &shared, &sent)).await;
        finished.notify_one();
        matches!(result, Ok(Ok(())))
    };
    let receiving = receive(&mut stream, &shared, &sent, &finished);
    let (sent_all, echoed_all) = tokio::join!(sending, receiving);
    if !(sent_all && echoed_all) {
        shared.totals.failed.fetch_add(1, Ordering::Relaxed);
    }
    shared
        .totals
        .sent
        .fetch_add(sent.load(Ordering::Relaxed), Ordering::Relaxed);

    // Close politely so that a relay sees a normal end, not a reset, but never wait long.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = sink.close().await;
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Sends each message of this connection when it is due, or at once when behind.
async fn send<S>(
    sink: &mut S,
    index: u64,
    shared: &Shared,
    sent: &AtomicU64,
) -> Result<(), tungstenite::Error>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let schedule = shared.schedule;
    for n in 0..schedule.count(index) {
        let due = schedule.due(index, n);
        if shared.epoch.elapsed() < due {
            // Caught up: send what is buffered, then wait for this message's slot.
            sink.flush().await?;
            tokio::time::sleep_until(shared.epoch + due).await;
        }
        let mut payload = vec![b'x'; shared.payload_size];
        payload[..8].copy_from_slice(&(due.as_nanos() as u64).to_le_bytes());
        sink.feed(Message::Binary(payload.into())).await?;
        sent.fetch_add(1, Ordering::Relaxed);
    }
    sink.flush().await
}

/// Records the echoes' latencies until all sent messages came back or the deadline passed;
/// returns whether they all came back.
async fn receive<S>(
    stream: &mut S,
    shared: &Shared,
    sent: &AtomicU64,
    finished: &tokio::sync::Notify,
) -> bool
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut echoed = 0u64;
    let mut unexpected = 0u64;
    let mut last_echo_ns = 0u64;
    let mut sending = true;
    let mut batch: Vec<u64> = Vec::with_capacity(LATENCY_BATCH);
    let all_back = loop {
        if !sending && echoed + unexpected >= sent.load(Ordering::Relaxed) {
            break true;
        }
        tokio::select! {
            next = stream.next() => {
                let Some(Ok(message)) = next else {
                    break false;
                };
                let Message::Binary(data) = message else {
                    if matches!(message, Message::Text(_)) {
                        unexpected += 1;
                    }
                    continue;
                };
                let Some(due) = data.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                    unexpected += 1;
                    continue;
                };
                let now = shared.epoch.elapsed().as_nanos() as u64;
                batch.push(now.saturating_sub(u64::from_le_bytes(due)).max(1));
                echoed += 1;
                last_echo_ns = now;
                if batch.len() == LATENCY_BATCH {
                    record(&shared.latencies, &mut batch);
                }
            }
            () = finished.notified(), if sending => sending = false,
            () = tokio::time::sleep_until(shared.deadline) => break false,
        }
    };
    record(&shared.latencies, &mut batch);
    let totals = &shared.totals;
    totals.echoed.fetch_add(echoed, Ordering::Relaxed);
    totals.unexpected.fetch_add(unexpected, Ordering::Relaxed);
    totals
        .last_echo_ns
        .fetch_max(last_echo_ns, Ordering::Relaxed);
    all_back
}

fn record(latencies: &Latencies, batch: &mut Vec<u64>) {
    if let Ok(mut histogram) = latencies.lock() {
        for &ns in batch.iter() {
            histogram.saturating_record(ns);
        }
    }
    batch.clear();
}

/// The numbers of one run; `--json` prints them as one line.
#[derive(serde::Serialize, Debug)]
struct Report {
    target: String,
    clients: usize,
    rate: u64,
    duration_s: f64,
    payload_size: usize,
    scheduled: u64,
    sent: u64,
    echoed: u64,
    lost: u64,
    unexpected: u64,
    failed_connections: u64,
    echoes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Report {
    fn print(&self) {
        println!(
            "sent:          {} of {} scheduled",
            self.sent, self.scheduled
        );
        println!(
            "echoed:        {} ({} lost, {} unexpected frames, {} connections failed)",
            self.echoed, self.lost, self.unexpected, self.failed_connections
        );
        println!("echoes/s:      {:.0}", self.echoes_per_s);
        println!(
            "latency ms:    p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec!["wsbridge-relay-bench", "run"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => check_run_args(&args),
            Command::EchoServer(_) => bail!("parsed as echo-server"),
        }
    }

    #[test]
    fn only_loopback_urls_are_accepted() {
        for url in [
            "ws://127.0.0.1:9101/",
            "ws://localhost:9101/echo",
            "ws://[::1]:9101/",
        ] {
            assert!(run_args(&["--url", url]).is_ok(), "{url}");
        }
        for url in [
            "ws://10.0.0.1:9101/",
            "ws://example.com/",
            "wss://127.0.0.1/",
            "not a url",
        ] {
            assert!(run_args(&["--url", url]).is_err(), "{url}");
        }
    }

    #[test]
    fn rejects_arguments_that_cannot_make_a_run() {
        let url = ["--url", "ws://127.0.0.1:1/"];
        for bad in [
            &["-n", "0"][..],
            &["--rate", "0"],
            &["--duration", "0s"],
            &["--payload-size", "7"],
        ] {
            let argv: Vec<&str> = url.iter().chain(bad).copied().collect();
            assert!(run_args(&argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_schedule_spreads_every_message_over_the_connections_in_order() {
        let schedule = Schedule::new(3, 1000, Duration::from_millis(10));
        assert_eq!(schedule.total, 10);
        let counts: Vec<u64> = (0..3).map(|i| schedule.count(i)).collect();
        assert_eq!(counts, [4, 3, 3]);
        assert_eq!(schedule.due(0, 0), Duration::ZERO);
        assert_eq!(schedule.due(1, 0), Duration::from_millis(1));
        assert_eq!(schedule.due(0, 1), Duration::from_millis(3));
        assert_eq!(schedule.due(0, 3), Duration::from_millis(9));
        // More connections than messages: the extra connections send nothing.
        assert_eq!(
            Schedule::new(20, 1000, Duration::from_millis(10)).count(15),
            0
        );
    }
}
