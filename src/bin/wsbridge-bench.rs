//! `wsbridge-bench`: fan-out throughput and latency over real WebSocket connections.
//!
//! Opens N subscriber sockets on one channel, publishes from one more socket at a fixed rate for a
//! fixed time, and prints deliveries per second, drops and end-to-end latency percentiles.
//! Latency is measured from each message's *intended* send time on the schedule, so a publisher
//! that falls behind shows up as latency instead of hiding it (no coordinated omission).
//!
//! Without `--url` it starts a gateway in-process (the embedded memory default, or `--config`).
//! Traffic goes only to the address given or to 127.0.0.1, and every run stops by itself.
//!
//! With `--keys K` it measures conflation instead: one subscriber on a `latest_per_key` route
//! reads at `--read-fraction` of the publish rate while the publisher streams over K channels (one
//! per key); it prints the gateway's memory (in-process only), what the subscriber received, the
//! conflated and dropped counts, and whether every key's last value arrived.

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
    /// Conflation mode: publish over this many channels (keys) to one slow subscriber on a
    /// `latest_per_key` route (the in-process gateway's default route in this mode).
    #[arg(long)]
    keys: Option<u64>,
    /// Conflation mode: the subscriber reads at this fraction of `--rate` while the stream runs,
    /// then as fast as it can.
    #[arg(long, default_value_t = 0.1)]
    read_fraction: f64,
}

/// The in-process gateway's configuration in conflation mode.
const CONFLATION_CONFIG: &str = r##"
[backends.local]
type = "memory"

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
slow_consumer = "latest_per_key"
"##;

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
    if args.keys == Some(0) {
        bail!("--keys must be greater than zero");
    }
    if !(args.read_fraction > 0.0 && args.read_fraction <= 1.0) {
        bail!("--read-fraction must be in (0, 1]");
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
            let mut config = match (&args.config, args.keys) {
                (Some(path), _) => {
                    wsbridge::Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?
                }
                (None, Some(_)) => wsbridge::Config::from_toml(CONFLATION_CONFIG)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                (None, None) => wsbridge::Config::embedded_default(),
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

    if let Some(keys) = args.keys {
        conflation(&url, &channel, keys, &args, gateway.is_some()).await?;
        if let Some(gw) = gateway {
            gw.shutdown().await;
        }
        return Ok(());
    }

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

/// The process's resident set size in KiB (Linux), from /proc/self/status.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What the slow subscriber of the conflation mode saw.
#[derive(Default)]
struct Conflated {
    received: u64,
    conflated: u64,
    dropped: u64,
    /// The newest round received per key.
    newest: Vec<Option<u64>>,
}

/// Conflation mode: a fast stream over `keys` channels under `base`, one subscriber reading at a
/// fraction of its rate.
async fn conflation(
    url: &str,
    base: &str,
    keys: u64,
    args: &Args,
    in_process: bool,
) -> anyhow::Result<()> {
    let ws = subscriber(url.to_owned(), format!("{base}/#")).await?;
    let rounds = ((args.rate as f64 * args.duration.as_secs_f64()) as u64).div_ceil(keys);
    let total = rounds * keys;
    println!(
        "1 subscriber on {base}/#, reading at {} of {} msg/s over {keys} keys for {} ({rounds} rounds)",
        args.read_fraction,
        args.rate,
        humantime::format_duration(args.duration)
    );

    // The gateway's memory over the run, sampled every 100 ms.
    let sampling = tokio_util::sync::CancellationToken::new();
    let rss = in_process.then(|| {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !sampling.is_cancelled() {
                samples.extend(rss_kib());
                tokio::select! {
                    _ = sampling.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            samples.extend(rss_kib());
            samples
        })
    });

    let streaming = tokio_util::sync::CancellationToken::new();
    let read_interval = Duration::from_secs_f64(1.0 / (args.rate as f64 * args.read_fraction));
    let reader = tokio::spawn(read_slowly(
        ws,
        keys,
        rounds - 1,
        read_interval,
        streaming.clone(),
        args.duration + args.drain + Duration::from_secs(2),
    ));

    let started = Instant::now();
    let published = publish_keys(url, base, keys, rounds, args).await?;
    let stream_time = started.elapsed();
    streaming.cancel();
    let seen = reader.await?;
    let after_stop = started.elapsed().saturating_sub(stream_time);
    sampling.cancel();

    let last_arrived = seen
        .newest
        .iter()
        .filter(|n| **n == Some(rounds - 1))
        .count();
    println!(
        "published:     {published} of {total} in {:.2}s",
        stream_time.as_secs_f64()
    );
    println!(
        "received:      {} ({:.1}% of published)",
        seen.received,
        100.0 * seen.received as f64 / published.max(1) as f64
    );
    println!(
        "reported:      {} conflated, {} dropped; received + conflated + dropped = {}",
        seen.conflated,
        seen.dropped,
        seen.received + seen.conflated + seen.dropped
    );
    println!(
        "last values:   {last_arrived} of {keys} keys got their last value ({:.2}s after the stream stopped)",
        after_stop.as_secs_f64()
    );
    if let Some(rss) = rss {
        let samples = rss.await?;
        let (first, last) = (
            samples.first().copied().unwrap_or(0),
            samples.last().copied().unwrap_or(0),
        );
        let max = samples.iter().copied().max().unwrap_or(0);
        println!(
            "gateway RSS:   start {:.1} MiB, max {:.1} MiB, end {:.1} MiB (whole process: gateway and clients)",
            first as f64 / 1024.0,
            max as f64 / 1024.0,
            last as f64 / 1024.0
        );
    }
    Ok(())
}

/// Reads one frame per `interval` while `streaming`, then as fast as frames come, until every key
/// got round `last` or the time limit passes.
async fn read_slowly(
    mut ws: Ws,
    keys: u64,
    last: u64,
    interval: Duration,
    streaming: tokio_util::sync::CancellationToken,
    limit: Duration,
) -> Conflated {
    let deadline = Instant::now() + limit;
    let mut seen = Conflated {
        newest: vec![None; keys as usize],
        ..Conflated::default()
    };
    let mut complete = 0;
    let mut next_read = Instant::now();
    while complete < keys {
        if !streaming.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep_until(next_read) => {}
                _ = streaming.cancelled() => {}
            }
            next_read += interval;
        }
        let next = tokio::time::timeout_at(deadline, ws.next()).await;
        let Ok(Some(Ok(message))) = next else {
            break;
        };
        let Message::Text(text) = message else {
            continue;
        };
        let text = text.as_str();
        if text.contains("\"type\":\"status\"") {
            let count = number_after(text, "\"count\":").unwrap_or(0);
            if text.contains("messages_conflated") {
                seen.conflated += count;
            } else if text.contains("messages_dropped") {
                seen.dropped += count;
            }
            continue;
        }
        if !text.starts_with("{\"type\":\"message\"") {
            continue;
        }
        seen.received += 1;
        let key = number_after(text, "\"slot\":").unwrap_or(0);
        let round = number_after(text, "\"round\":").unwrap_or(0);
        if let Some(newest) = seen.newest.get_mut(key as usize) {
            if round == last && *newest != Some(last) {
                complete += 1;
            }
            *newest = Some(round);
        }
    }
    let _ = ws.close(None).await;
    seen
}

/// Publishes `rounds` rounds over `keys` channels under `base` at `--rate`; returns how many
/// were acknowledged.
async fn publish_keys(
    url: &str,
    base: &str,
    keys: u64,
    rounds: u64,
    args: &Args,
) -> anyhow::Result<u64> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let (mut sink, mut stream) = ws.split();
    let total = rounds * keys;
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            match stream.next().await {
                Some(Ok(Message::Text(text))) if text.starts_with("{\"type\":\"ok\"") => acked += 1,
                Some(Ok(Message::Text(text))) if text.starts_with("{\"type\":\"error\"") => {
                    eprintln!("publish failed: {text}");
                    acked += 1;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        acked
    });
    let padding = "x".repeat(args.payload_size);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let mut seq = 0u64;
    for round in 0..rounds {
        for key in 0..keys {
            let intended = start + interval.mul_f64(seq as f64);
            if Instant::now() < intended {
                sink.flush().await?;
                tokio::time::sleep_until(intended).await;
            }
            let channel = serde_json::to_string(&format!("{base}/k{key}"))?;
            let frame = format!(
                r#"{{"type":"publish","id":{seq},"channel":{channel},"payload":{{"slot":{key},"round":{round},"pad":"{padding}"}}}}"#
            );
            sink.feed(Message::Text(frame.into())).await?;
            seq += 1;
        }
    }
    sink.flush().await?;
    let acked = tokio::time::timeout(args.drain, acks)
        .await
        .map_or(0, |a| a.unwrap_or(0));
    Ok(acked)
}
