//! `wsbridge-storm`: delivery latency through a disconnect storm.
//!
//! Starts a gateway (`wsbridge run`, from the same build, on 127.0.0.1 with the memory backend
//! and no connection limits) as a child process, so that each process holds only its own end of
//! the sockets. Opens `--live` sockets on one channel and `--idle` sockets spread over other
//! channels, publishes `--rate` messages per second to the live channel, and after `--before`
//! closes every idle socket at once. Prints the live sockets' end-to-end latency (p50, p99,
//! max) in three windows: before the storm, the `--during` window after it, and the rest.
//! Latency is measured from each message's scheduled send time. Everything stops by itself.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

mod bench_client;

use bench_client::{Ws, subscriber};

/// Disconnect-storm benchmark for wsbridge.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Sockets that receive the stream.
    #[arg(long, default_value_t = 1000)]
    live: usize,
    /// Sockets subscribed elsewhere that disconnect at once.
    #[arg(long, default_value_t = 9000)]
    idle: usize,
    /// Messages per second to the live channel.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Streaming time before the storm.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    before: Duration,
    /// The window right after the storm reported as "during".
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    during: Duration,
    /// Streaming time after the "during" window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// The gateway binary (default: `wsbridge` next to this one).
    #[arg(long)]
    gateway: Option<std::path::PathBuf>,
}

/// Latencies by window: before, during, after the storm.
struct Windows([Mutex<Histogram<u64>>; 3]);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 {
        bail!("--rate must be greater than zero");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("wsbridge-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("storm.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nqueue_capacity = 4096\n[limits]\nmax_connections = 0\nmax_connections_per_ip = 0\nnew_connections_per_second_per_ip = 0\npublish_per_second = 0\npublish_bytes_per_second = 0\nsubscribe_per_second = 0\n[backends.local]\ntype = \"memory\"\n[[routes]]\nchannel = \"#\"\nbackend = \"local\"\ntopic = \"#\"\nallow = [\"subscribe\", \"publish\"]\n"
        ),
    )?;
    let binary = match &args.gateway {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("wsbridge"),
    };
    let mut gateway = tokio::process::Command::new(&binary)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the gateway did not listen on 127.0.0.1:{port} within 10s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = storm(&args, &url).await;
    let _ = gateway.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn storm(args: &Args, url: &str) -> anyhow::Result<()> {
    let live_channel = "storm/live";
    let mut live = Vec::with_capacity(args.live);
    let mut idle = Vec::with_capacity(args.idle);
    for (n, count) in [(0, args.live), (1, args.idle)] {
        for start in (0..count).step_by(200) {
            let batch = (start..count.min(start + 200)).map(|i| {
                let channel = if n == 0 {
                    live_channel.to_owned()
                } else {
                    format!("storm/idle/{}", i % 100)
                };
                subscriber(url.to_owned(), channel)
            });
            for ws in futures_util::future::join_all(batch).await {
                if n == 0 {
                    live.push(ws?);
                } else {
                    idle.push(ws?);
                }
            }
        }
    }
    println!(
        "{} live sockets on {live_channel:?}, {} idle sockets; {} msg/s; storm after {:?}",
        args.live, args.idle, args.rate, args.before
    );

    let epoch = Instant::now();
    let storm_at = epoch + args.before;
    let after_at = storm_at + args.during;
    let end = after_at + args.after;
    let windows = Arc::new(Windows(std::array::from_fn(|_| {
        Mutex::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"))
    })));
    let expected = (args.rate as f64 * (end - epoch).as_secs_f64()) as u64;
    let mut readers = Vec::new();
    for ws in live {
        readers.push(tokio::spawn(read(
            ws,
            epoch,
            [storm_at, after_at],
            end + Duration::from_secs(3),
            windows.clone(),
        )));
    }
    let publisher = tokio::spawn(publish(
        subscriber(url.to_owned(), "storm/publisher".into()).await?,
        epoch,
        args.rate,
        expected,
    ));

    tokio::time::sleep_until(storm_at).await;
    let closing = Instant::now();
    // Every idle socket goes away at once: dropped without a close handshake, as when a
    // load balancer or a client network fails.
    drop(idle);
    println!(
        "storm: {} idle sockets dropped in {:?}",
        args.idle,
        closing.elapsed()
    );

    publisher.await??;
    let mut received = 0u64;
    for reader in readers {
        received += reader.await?;
    }
    println!(
        "delivered {received} of {} messages to the live sockets",
        expected * args.live as u64
    );
    for (name, histogram) in ["before", "during", "after"].iter().zip(windows.0.iter()) {
        let h = histogram.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |v: u64| v as f64 / 1e6;
        println!(
            "{name:>6}: {:>8} deliveries  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max())
        );
    }
    Ok(())
}

/// Publishes `{"t": <scheduled ns since epoch>}` on the schedule; the publisher socket also
/// subscribed (to an unused channel) only to share the connection helper.
async fn publish(mut ws: Ws, epoch: Instant, rate: u64, total: u64) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for seq in 0..total {
        let scheduled = epoch + interval * seq as u32;
        tokio::time::sleep_until(scheduled).await;
        let t = scheduled.duration_since(epoch).as_nanos() as u64;
        let frame = format!(
            r#"{{"type":"publish","id":{seq},"channel":"storm/live","payload":{{"t":{t}}}}}"#
        );
        ws.send(Message::Text(frame.into())).await?;
        // Replies are read by nobody; drain them so the gateway never sees a slow reader.
        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(ws.next()) {}
    }
    Ok(())
}

/// Reads the stream until `until`, recording each latency in its window; returns the count.
async fn read(
    mut ws: Ws,
    epoch: Instant,
    [storm_at, after_at]: [Instant; 2],
    until: Instant,
    windows: Arc<Windows>,
) -> u64 {
    let mut local: [Histogram<u64>; 3] = std::array::from_fn(|_| {
        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
    });
    let mut count = 0;
    loop {
        let next = tokio::time::timeout_at(until, ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            match next {
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
        };
        let Some(t) = text
            .split("\"t\":")
            .nth(1)
            .and_then(|rest| rest.split(['}', ',']).next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let sent = epoch + Duration::from_nanos(t);
        let now = Instant::now();
        let window = if sent < storm_at {
            0
        } else if sent < after_at {
            1
        } else {
            2
        };
        let _ = local[window].record(now.saturating_duration_since(sent).as_nanos().max(1) as u64);
        count += 1;
    }
    for (shared, local) in windows.0.iter().zip(local.iter()) {
        let _ = shared.lock().unwrap_or_else(|e| e.into_inner()).add(local);
    }
    count
}
