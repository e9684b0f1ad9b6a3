//! `wsbridge-bench`: fan-out throughput and latency over real WebSocket connections.
//!
//! Opens N subscriber sockets on one channel, publishes from one more socket at a fixed rate for a
//! fixed time, and prints deliveries per second, drops and end-to-end latency percentiles.
//! Latency is measured from each message's *intended* send time on the schedule, so a publisher
//! that falls behind shows up as latency instead of hiding it (no coordinated omission).
//!
//! Without `--url` it starts a gateway in-process (the embedded memory default, or `--config`).
//! Traffic goes only to the address given or to 127.0.0.1, and every run stops by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

mod bench_client;

use bench_client::{Ws, subscriber};

/// Fan-out benchmark for wsbridge.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Gateway WebSocket URL; without it a gateway is started in-process on 127.0.0.1.
    #[arg(long)]
    url: Option<String>,
    /// Config for the in-process gateway (default: the embedded memory configuration).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Subscriber connections.
    #[arg(long, short = 'n', default_value_t = 100)]
    subscribers: usize,
    /// Messages published per second.
    #[arg(long, short, default_value_t = 1000)]
    rate: u64,
    /// How long to publish, e.g. 10s.
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Channel to use (default: a fresh one under bench/).
    #[arg(long)]
    channel: Option<String>,
    /// Bytes of padding in each payload.
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// Most publishes awaiting acknowledgement at once; 0 = publish on schedule regardless.
    /// With a high `--rate` this measures the acknowledged publish rate of one client.
    #[arg(long, default_value_t = 0)]
    max_inflight: u64,
    /// How long to wait for the last messages after publishing stops.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

#[derive(Default)]
struct Totals {
    delivered: AtomicU64,
    out_of_order: AtomicU64,
    reported_dropped: AtomicU64,
    last_delivery_ns: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 {
        bail!("--rate must be greater than zero");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (url, gateway) = match &args.url {
        Some(url) => (url.clone(), None),
        None => {
            let mut config = match &args.config {
                Some(path) => wsbridge::Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
                None => wsbridge::Config::embedded_default(),
            };
            config.server.listen = "127.0.0.1:0".parse()?;
            // The benchmark is one client publishing fast to many sockets from one address.
            config.limits = wsbridge::limits::LimitsConfig::unlimited();
            config.server.queue_capacity = config.server.queue_capacity.max(4096);
            let gw = wsbridge::Gateway::start(config).await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !gw.hub().is_ready() {
                if Instant::now() > deadline {
                    bail!("the gateway's backends did not connect within 30s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (format!("ws://{}/ws", gw.local_addr()), Some(gw))
        }
    };
    let channel = args.channel.clone().unwrap_or_else(|| {
        format!(
            "bench/{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        )
    });

    let epoch = Instant::now();
    let totals = Arc::new(Totals::default());
    let expected_last = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for batch in (0..args.subscribers).collect::<Vec<_>>().chunks(100) {
        let mut connecting = Vec::new();
        for _ in batch {
            connecting.push(subscriber(url.clone(), channel.clone()));
        }
        for ws in futures_util::future::join_all(connecting).await {
            let ws = ws?;
            subscribers.push(tokio::spawn(receive(
                ws,
                epoch,
                totals.clone(),
                expected_last,
                args.duration + args.drain + Duration::from_secs(2),
            )));
        }
    }
    println!(
        "{} subscribers on {channel:?}; publishing {} msg/s for {} ({} bytes padding)",
        args.subscribers,
        args.rate,
        humantime::format_duration(args.duration),
        args.payload_size
    );

    let publish_start = epoch.elapsed();
    let Published {
        published,
        acked,
        failed,
        ack_span,
    } = publish(&url, &channel, &args, epoch).await?;
    let publish_end = epoch.elapsed();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for task in subscribers {
        let h = task.await?;
        histogram.add(h)?;
    }
    let delivered = totals.delivered.load(Ordering::Relaxed);
    let expected = published * args.subscribers as u64;
    let last = Duration::from_nanos(totals.last_delivery_ns.load(Ordering::Relaxed));
    let span = (last.max(publish_end) - publish_start).as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1e6;

    println!("published:     {published} ({acked} acknowledged, {failed} failed)");
    println!(
        "acks/s:        {:.0} (first publish to last acknowledgement, {:.2}s)",
        acked as f64 / ack_span.as_secs_f64().max(1e-9),
        ack_span.as_secs_f64()
    );
    println!(
        "delivered:     {delivered} of {expected} expected ({:.2}%)",
        100.0 * delivered as f64 / expected.max(1) as f64
    );
    println!(
        "deliveries/s:  {:.0} (over {:.2}s, first publish to last delivery)",
        delivered as f64 / span,
        span
    );
    println!(
        "drops:         {} missing, {} reported by the gateway, {} out of order",
        expected.saturating_sub(delivered),
        totals.reported_dropped.load(Ordering::Relaxed),
        totals.out_of_order.load(Ordering::Relaxed)
    );
    println!(
        "latency ms:    p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        histogram.max() as f64 / 1e6
    );
    if let Some(gw) = gateway {
        gw.shutdown().await;
    }
    Ok(())
}

/// Reads messages until the last expected sequence number or the deadline; returns latencies.
async fn receive(
    mut ws: Ws,
    epoch: Instant,
    totals: Arc<Totals>,
    expected_last: u64,
    limit: Duration,
) -> Histogram<u64> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let deadline = epoch + limit;
    let mut last_seq: Option<u64> = None;
    let mut delivered = 0;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            if matches!(next, Ok(Some(Ok(_)))) {
                continue;
            }
            break;
        };
        let text = text.as_str();
        if text.contains("\"type\":\"status\"") {
            if let Some(count) = number_after(text, "\"count\":") {
                totals.reported_dropped.fetch_add(count, Ordering::Relaxed);
            }
            continue;
        }
        if !text.starts_with("{\"type\":\"message\"") {
            continue;
        }
        // Protobuf JSON omits fields at their default, so a missing number is 0.
        let seq = number_after(text, "\"seq\":").unwrap_or(0);
        let sent = number_after(text, "\"sent\":").unwrap_or(0);
        let now = epoch.elapsed().as_nanos() as u64;
        histogram.saturating_record(now.saturating_sub(sent).max(1));
        delivered += 1;
        if last_seq.is_some_and(|l| seq <= l) {
            totals.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        last_seq = Some(seq);
        totals.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
        if seq + 1 >= expected_last {
            break;
        }
    }
    totals.delivered.fetch_add(delivered, Ordering::Relaxed);
    let _ = ws.close(None).await;
    histogram
}

/// The unsigned integer after `key`, quoted or not (Protobuf JSON quotes 64-bit integers).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = text[start..].trim_start_matches('"');
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// What the publisher did.
struct Published {
    published: u64,
    acked: u64,
    failed: u64,
    /// From the first publish to the last acknowledgement.
    ack_span: Duration,
}

/// Publishes on schedule (or as fast as `--max-inflight` acknowledgements allow).
async fn publish(
    url: &str,
    channel: &str,
    args: &Args,
    epoch: Instant,
) -> anyhow::Result<Published> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let (mut sink, mut stream) = ws.split();
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_ack_ns = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(tokio::sync::Notify::new());
    let count = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let reader = {
        let (acked, failed, last_ack_ns, answered) = (
            acked.clone(),
            failed.clone(),
            last_ack_ns.clone(),
            answered.clone(),
        );
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                if text.starts_with("{\"type\":\"ok\"") {
                    acked.fetch_add(1, Ordering::Relaxed);
                } else if text.starts_with("{\"type\":\"error\"") {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("publish failed: {text}");
                    }
                } else {
                    continue;
                }
                last_ack_ns.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                answered.notify_one();
                if acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) >= count {
                    break;
                }
            }
        })
    };
    let padding = "x".repeat(args.payload_size);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = epoch.elapsed();
    let mut published = 0;
    for seq in 0..count {
        let intended = start + interval.mul_f64(seq as f64);
        if epoch.elapsed() < intended {
            // Caught up: send what is queued, then wait for this message's slot.
            sink.flush().await?;
            tokio::time::sleep_until(epoch + intended).await;
        }
        while args.max_inflight > 0
            && published - acked.load(Ordering::Relaxed) - failed.load(Ordering::Relaxed)
                >= args.max_inflight
        {
            sink.flush().await?;
            answered.notified().await;
        }
        let frame = format!(
            r#"{{"type":"publish","id":{seq},"channel":{},"payload":{{"seq":{seq},"sent":{},"pad":"{padding}"}}}}"#,
            serde_json::to_string(channel)?,
            intended.as_nanos()
        );
        sink.feed(Message::Text(frame.into())).await?;
        published += 1;
    }
    sink.flush().await?;
    let _ = tokio::time::timeout(args.drain, reader).await;
    let last_ack = Duration::from_nanos(last_ack_ns.load(Ordering::Relaxed));
    Ok(Published {
        published,
        acked: acked.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        ack_span: last_ack.saturating_sub(start),
    })
}
