//! Stream routes on the AMQP backend against the real RabbitMQ on 127.0.0.1:5672: subscriptions
//! that start from a position, positions on messages, gaps, and resuming after a lost
//! connection. Every test uses a stream and an exchange of its own.

mod amqp_support;
mod common;

use amqp_support::{URL, close_connections, delete_queue, pika_publish, start_connected};
use common::{Client, flood, http_get, unique};
use serde_json::{Value, json};

/// A backend `backend` with a transient topic exchange `exchange` and two routes on it: one that
/// reads `stream`, one that binds to the exchange.
fn config(backend: &str, exchange: &str, stream: &str) -> String {
    format!(
        r##"
[backends.{backend}]
type = "amqp"
url = "{URL}"
reconnect_initial = "100ms"

[[backends.{backend}.exchanges]]
name = "{exchange}"
type = "topic"
durable = false

[[routes]]
channel = "telemetry/{{device}}"
backend = "{backend}"
exchange = "{exchange}"
stream = "{stream}"
topic = "telemetry.{{device}}"
allow = ["subscribe", "publish"]

[[routes]]
channel = "alerts/{{device}}"
backend = "{backend}"
exchange = "{exchange}"
topic = "alerts.{{device}}"
allow = ["subscribe", "publish"]
"##
    )
}

/// Subscribes with a `from`; returns the reply.
async fn subscribe_from(client: &mut Client, channel: &str, from: Value) -> Value {
    client
        .request(json!({"type": "subscribe", "channel": channel, "from": from}))
        .await
}

/// The next `count` messages' payloads and offsets, checking that each message's position is in
/// partition 0 and that its channel is mapped back from its routing key.
async fn take(client: &mut Client, count: usize) -> Vec<(Value, i64)> {
    let mut taken = Vec::new();
    for _ in 0..count {
        let m = client.next_message().await;
        assert_eq!(m["position"]["partition"], 0, "{m}");
        assert!(
            m["channel"]
                .as_str()
                .is_some_and(|c| c.starts_with("telemetry/")),
            "{m}"
        );
        let offset = m["position"]["offset"].as_i64().expect("an offset");
        assert!(
            m["headers"].get("x-stream-offset").is_none(),
            "the offset is the position, not a header: {m}"
        );
        taken.push((m["payload"].clone(), offset));
    }
    taken
}

fn payloads(taken: &[(Value, i64)]) -> Vec<Value> {
    taken.iter().map(|(p, _)| p.clone()).collect()
}

/// Whether offsets follow each other without a hole.
fn consecutive(taken: &[(Value, i64)]) -> bool {
    taken.windows(2).all(|w| w[1].1 == w[0].1 + 1)
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(now.expect("a clock after 1970").as_millis()).expect("ms fit")
}

#[tokio::test]
async fn a_stream_replays_from_earliest_an_offset_or_a_time() {
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    let gw = start_connected(&config("rabbit", &exchange, &stream)).await;
    let addr = gw.local_addr();
    let before = now_ms();
    let mut publisher = Client::connect(addr).await;
    for i in 0..5 {
        let device = if i % 2 == 0 { "a" } else { "b" };
        let reply = publisher
            .publish(&format!("telemetry/{device}"), json!(i))
            .await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }

    let mut earliest = Client::connect(addr).await;
    let reply = subscribe_from(&mut earliest, "telemetry/+", json!("earliest")).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let all = take(&mut earliest, 5).await;
    assert_eq!(payloads(&all), (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(consecutive(&all), "{all:?}");

    // From the third message's offset on: the third, fourth and fifth.
    let third = all[2].1;
    let mut resumed = Client::connect(addr).await;
    let from = json!({"offsets": {"0": third}});
    let reply = subscribe_from(&mut resumed, "telemetry/+", from).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(take(&mut resumed, 3).await, all[2..].to_vec());

    // A time before the first publish: everything, in order.
    let mut timed = Client::connect(addr).await;
    let reply = subscribe_from(&mut timed, "telemetry/+", json!({"timestamp": before})).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(take(&mut timed, 5).await, all);

    // A narrower pattern replays only its own channel, with the same positions.
    let mut device_a = Client::connect(addr).await;
    subscribe_from(&mut device_a, "telemetry/a", json!("earliest")).await;
    let only_a = take(&mut device_a, 3).await;
    assert_eq!(only_a, vec![all[0].clone(), all[2].clone(), all[4].clone()]);

    // Every replay goes on live: a new message reaches each of them once.
    assert_eq!(
        publisher.publish("telemetry/a", json!(5)).await["type"],
        "ok"
    );
    for client in [&mut earliest, &mut resumed, &mut timed, &mut device_a] {
        let (payload, offset) = take(client, 1).await.remove(0);
        assert_eq!((payload, offset), (json!(5), all[4].1 + 1));
        client.assert_no_message().await;
    }
    gw.shutdown().await;
    delete_queue(&stream).await;
}

#[tokio::test]
async fn a_live_stream_subscriber_gets_only_new_messages_with_their_positions() {
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    let gw = start_connected(&config("rabbit", &exchange, &stream)).await;
    let addr = gw.local_addr();
    // Published by another client to the exchange the stream is bound to.
    for i in 0..3 {
        pika_publish(&exchange, "telemetry.old", &i.to_string(), json!({})).await;
    }
    let mut live = Client::connect(addr).await;
    live.subscribe("telemetry/+").await;
    let mut publisher = Client::connect(addr).await;
    for i in 3..5 {
        assert_eq!(
            publisher.publish("telemetry/new", json!(i)).await["type"],
            "ok"
        );
    }
    let got = take(&mut live, 2).await;
    assert_eq!(payloads(&got), vec![json!(3), json!(4)]);
    assert!(consecutive(&got), "{got:?}");
    live.assert_no_message().await;

    // Whoever asks from the start sees the messages from before, at the positions before.
    let mut replay = Client::connect(addr).await;
    subscribe_from(&mut replay, "telemetry/+", json!("earliest")).await;
    let all = take(&mut replay, 5).await;
    assert_eq!(all[3..], got[..]);
    assert_eq!(payloads(&all[..3]), vec![json!(0), json!(1), json!(2)]);
    gw.shutdown().await;
    delete_queue(&stream).await;
}

#[tokio::test]
async fn positions_are_refused_where_the_route_keeps_none() {
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    let gw = start_connected(&config("rabbit", &exchange, &stream)).await;
    let mut client = Client::connect(gw.local_addr()).await;
    let reply = subscribe_from(&mut client, "alerts/+", json!("earliest")).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "unsupported", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("only stream routes keep positions")
            && message.contains(&format!("exchange {exchange:?}")),
        "{reply}"
    );
    // "latest" on that route is what it always was.
    client.subscribe("alerts/+").await;

    // A stream is one partition.
    let reply = subscribe_from(&mut client, "telemetry/+", json!({"offsets": {"1": 0}})).await;
    assert_eq!(reply["code"], "invalid_partition", "{reply}");
    gw.shutdown().await;
    delete_queue(&stream).await;
}

#[test]
fn a_route_naming_both_a_stream_and_a_queue_is_refused() {
    let text = config("rabbit", "wsb.x", "wsb.log").replace(
        "stream = \"wsb.log\"",
        "stream = \"wsb.log\"\nqueue = \"wsb.jobs\"",
    );
    let error = wsbridge::Config::from_toml(&text).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("routes[0].stream: a route reads either a work queue (queue) or a stream (stream), not both"),
        "{error}"
    );
}

#[tokio::test]
async fn stream_subscribers_resume_after_a_lost_connection_without_gaps_or_repeats() {
    let backend = unique("rabbit");
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    let gw = start_connected(&config(&backend, &exchange, &stream)).await;
    let addr = gw.local_addr();
    let mut publisher = Client::connect(addr).await;
    for i in 0..3 {
        assert_eq!(
            publisher.publish("telemetry/a", json!(i)).await["type"],
            "ok"
        );
    }
    let mut replay = Client::connect(addr).await;
    subscribe_from(&mut replay, "telemetry/+", json!("earliest")).await;
    let mut live = Client::connect(addr).await;
    live.subscribe("telemetry/+").await;
    let mut seen = take(&mut replay, 3).await;
    assert_eq!(
        publisher.publish("telemetry/a", json!(3)).await["type"],
        "ok"
    );
    seen.extend(take(&mut replay, 1).await);
    let mut live_seen = take(&mut live, 1).await;
    assert_eq!(live_seen[0], seen[3]);

    assert_eq!(close_connections(&backend).await, 1);
    for client in [&mut replay, &mut live] {
        assert_eq!(client.next_of("status").await["code"], "backend_down");
    }
    // Published by another client while the gateway reconnects (or just after).
    pika_publish(&exchange, "telemetry.b", "4", json!({})).await;
    pika_publish(&exchange, "telemetry.b", "5", json!({})).await;
    for client in [&mut replay, &mut live] {
        assert_eq!(client.next_of("status").await["code"], "backend_up");
    }
    assert_eq!(
        publisher.publish("telemetry/a", json!(6)).await["type"],
        "ok"
    );

    seen.extend(take(&mut replay, 3).await);
    assert_eq!(
        payloads(&seen),
        (0..7).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert!(consecutive(&seen), "{seen:?}");
    live_seen.extend(take(&mut live, 3).await);
    assert_eq!(live_seen[..], seen[3..]);
    replay.assert_no_message().await;
    live.assert_no_message().await;
    gw.shutdown().await;
    delete_queue(&stream).await;
}

/// Declares `stream` with a tiny retention and fills it through `exchange` (bound by then) with
/// `count` messages, so the broker has already deleted the first ones.
async fn fill_small_stream(exchange: &str, key: &str, count: usize) {
    const PIKA: &str = r#"
import sys, pika
exchange, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
channel = connection.channel()
channel.confirm_delivery()
for i in range(count):
    channel.basic_publish(exchange, key, str(i).encode() + b" " * 50)
connection.close()
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", PIKA, exchange, key, &count.to_string()])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Declares a stream that keeps about 1 kB in segments of 200 bytes.
async fn declare_small_stream(stream: &str) {
    const PIKA: &str = r#"
import sys, pika
connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
connection.channel().queue_declare(sys.argv[1], durable=True, arguments={
    "x-queue-type": "stream", "x-max-length-bytes": 1000, "x-stream-max-segment-size-bytes": 200})
connection.close()
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", PIKA, stream])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn an_offset_the_stream_no_longer_holds_is_reported_as_a_gap() {
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    // The stream exists with its own retention; the gateway uses it as it is.
    declare_small_stream(&stream).await;
    let gw = start_connected(&config("rabbit", &exchange, &stream)).await;
    fill_small_stream(&exchange, "telemetry.a", 40).await;

    let mut client = Client::connect(gw.local_addr()).await;
    let reply = subscribe_from(&mut client, "telemetry/+", json!({"offsets": {"0": 0}})).await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let gap = client.next_of("status").await;
    assert_eq!(gap["code"], "gap", "{gap}");
    assert_eq!(gap["partition"], 0);
    assert_eq!(gap["requested_offset"], 0);
    let available = gap["available_offset"].as_i64().expect("an offset");
    assert!(available > 0, "{gap}");
    let first = take(&mut client, 1).await.remove(0);
    assert_eq!(first.1, available);
    gw.shutdown().await;
    delete_queue(&stream).await;
}

#[tokio::test]
async fn a_replay_waits_for_a_slow_client_instead_of_dropping_messages() {
    let (exchange, stream) = (unique("wsb.streams."), unique("wsb.log."));
    let text = format!(
        "[server]\nqueue_capacity = 64\n[limits]\npublish_per_second = 0\npublish_bytes_per_second = 0\n{}",
        config("rabbit", &exchange, &stream)
    );
    let gw = start_connected(&text).await;
    let addr = gw.local_addr();
    // 1000 messages of 16 KiB (16 MB): far more than socket buffers and a 64-message queue hold.
    let mut publisher = Client::connect(addr).await;
    flood(&mut publisher, "telemetry/a", 1000, 16 * 1024).await;

    let mut replay = Client::connect(addr).await;
    let ok = subscribe_from(&mut replay, "telemetry/+", json!("earliest")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    // The client reads nothing for a while (well within the write timeout), so its socket and
    // its queue fill up; the replay waits for it instead of dropping what does not fit.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut seqs = Vec::new();
    for n in 0..1000 {
        let frame = replay.recv().await;
        assert_eq!(frame["type"], "message", "frame {n}: {frame}");
        seqs.extend(frame["payload"]["seq"].as_u64());
    }
    // (Publishes that are in flight together may reach the stream in any order.)
    seqs.sort_unstable();
    assert_eq!(seqs, (0..1000).collect::<Vec<u64>>(), "every message, once");
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("wsbridge_dropped_total") && !l.ends_with(" 0")),
        "nothing was dropped:\n{metrics}"
    );
    gw.shutdown().await;
    delete_queue(&stream).await;
}
