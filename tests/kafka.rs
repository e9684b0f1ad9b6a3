//! The `kafka` backend against a real Kafka-protocol broker (Tansu on 127.0.0.1:9092, started by
//! scripts/setup/40-kafka.sh), cross-checked with kafka-python, an independent client.

mod common;
mod kafka_support;

use common::{Client, eventually, http_get, start, unique};
use kafka_support::{brokers, create_topic, py_consume, py_produce};
use serde_json::{Value, json};

/// A gateway with one Kafka backend: `events/{name}` is topic `{name}`, and
/// `devices/{device}/telemetry` is topic `telemetry` keyed by device.
fn config(brokers: &str, telemetry: &str) -> String {
    format!(
        r#"
[backends.events]
type = "kafka"
brokers = "{brokers}"

[[routes]]
channel = "events/{{name}}"
backend = "events"
topic = "{{name}}"
allow = ["subscribe", "publish"]

[[routes]]
channel = "devices/{{device}}/telemetry"
backend = "events"
topic = "{telemetry}"
key = "{{device}}"
allow = ["subscribe", "publish"]
"#
    )
}

async fn gateway(telemetry: &str) -> wsbridge::Gateway {
    start(&config(&brokers(), telemetry)).await
}

async fn subscribe_from(client: &mut Client, channel: &str, from: Value) -> Value {
    client
        .request(json!({"type": "subscribe", "channel": channel, "from": from}))
        .await
}

#[tokio::test]
async fn kafka_python_messages_reach_websocket_subscribers() {
    let topic = unique("wsb-in-");
    create_topic(&topic, 3).await;
    let gw = gateway("unused").await;
    let mut sub = Client::connect(gw.local_addr()).await;
    sub.subscribe(&format!("events/{topic}")).await;

    let sent = py_produce(
        &topic,
        json!([{"value": "{\"temp\": 21.5}", "key": "sensor-1", "headers": {"origin": "python", "trace": "abc"}, "partition": 2}]),
    )
    .await;

    let m = sub.next_message().await;
    assert_eq!(m["channel"], format!("events/{topic}"));
    assert_eq!(m["subscription"], format!("events/{topic}"));
    assert_eq!(m["payload"], json!({"temp": 21.5}));
    assert_eq!(m["key"], "sensor-1");
    assert_eq!(m["headers"], json!({"origin": "python", "trace": "abc"}));
    assert_eq!(
        m["position"],
        json!({"partition": 2, "offset": sent[0]["offset"]})
    );
    assert_eq!(m["timestamp"], sent[0]["timestamp"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_publishes_are_read_back_by_kafka_python() {
    let topic = unique("wsb-out-");
    create_topic(&topic, 3).await;
    let gw = gateway("unused").await;
    let mut publisher = Client::connect(gw.local_addr()).await;

    let ok = publisher
        .request(json!({
            "type": "publish", "channel": format!("events/{topic}"), "payload": {"n": 1},
            "key": "k-1", "headers": {"a": "1", "b": "two"}
        }))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let partition = ok["position"]["partition"].as_i64().expect("a partition") as i32;
    let offset = ok["position"]["offset"].as_i64().expect("an offset");

    let read = py_consume(&topic, partition, offset, 1).await;
    assert_eq!(read[0]["value"], "{\"n\":1}");
    assert_eq!(read[0]["key"], "k-1");
    assert_eq!(read[0]["headers"], json!({"a": "1", "b": "two"}));
    assert_eq!(read[0]["offset"], offset);

    // An explicit partition is honoured and reported.
    let ok = publisher
        .request(json!({"type": "publish", "channel": format!("events/{topic}"), "payload": "x", "partition": 1}))
        .await;
    assert_eq!(ok["position"]["partition"], 1, "{ok}");
    gw.shutdown().await;
}

/// Publishes `count` messages `{"seq": i}` through the gateway; returns their positions.
async fn publish_seq(client: &mut Client, channel: &str, count: usize, partition: i32) -> Vec<i64> {
    let mut offsets = Vec::new();
    for seq in 0..count {
        let ok = client
            .request(json!({"type": "publish", "channel": channel, "payload": {"seq": seq}, "partition": partition}))
            .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        offsets.push(ok["position"]["offset"].as_i64().expect("an offset"));
    }
    offsets
}

#[tokio::test]
async fn earliest_replays_the_log_then_follows_it() {
    let topic = unique("wsb-early-");
    create_topic(&topic, 1).await;
    let gw = gateway("unused").await;
    let channel = format!("events/{topic}");
    let mut publisher = Client::connect(gw.local_addr()).await;
    publish_seq(&mut publisher, &channel, 3, 0).await;

    let mut replay = Client::connect(gw.local_addr()).await;
    let ok = subscribe_from(&mut replay, &channel, json!("earliest")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    for seq in 0..3 {
        let m = replay.next_message().await;
        assert_eq!(m["payload"]["seq"], seq);
        assert_eq!(m["position"]["offset"], seq);
    }
    // After the history, new messages follow on the same subscription, once each.
    let ok = publisher
        .request(json!({"type": "publish", "channel": channel, "payload": {"seq": 3}}))
        .await;
    assert_eq!(ok["type"], "ok");
    assert_eq!(replay.next_message().await["payload"]["seq"], 3);
    replay.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn resuming_from_offsets_delivers_exactly_the_messages_after_them() {
    let topic = unique("wsb-resume-");
    create_topic(&topic, 2).await;
    let gw = gateway("unused").await;
    let channel = format!("events/{topic}");
    let mut publisher = Client::connect(gw.local_addr()).await;
    let p0 = publish_seq(&mut publisher, &channel, 5, 0).await;
    let p1 = publish_seq(&mut publisher, &channel, 2, 1).await;
    assert_eq!(p0, vec![0, 1, 2, 3, 4]);
    assert_eq!(p1, vec![0, 1]);

    // The client saw offsets 0..=2 of partition 0 and 0 of partition 1.
    let mut resumed = Client::connect(gw.local_addr()).await;
    let ok = subscribe_from(&mut resumed, &channel, json!({"offsets": {"0": 3, "1": 1}})).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = resumed.next_message().await;
        got.push((
            m["position"]["partition"].as_i64().unwrap(),
            m["position"]["offset"].as_i64().unwrap(),
        ));
    }
    got.sort();
    assert_eq!(got, vec![(0, 3), (0, 4), (1, 1)]);
    resumed.assert_no_message().await;

    // Partitions the client does not name are read from their start.
    let mut partial = Client::connect(gw.local_addr()).await;
    let ok = subscribe_from(&mut partial, &channel, json!({"offsets": {"0": 4}})).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = partial.next_message().await;
        got.push((
            m["position"]["partition"].as_i64().unwrap(),
            m["position"]["offset"].as_i64().unwrap(),
        ));
    }
    got.sort();
    assert_eq!(got, vec![(0, 4), (1, 0), (1, 1)]);

    // A partition the topic does not have is refused.
    let mut wrong = Client::connect(gw.local_addr()).await;
    let e = subscribe_from(&mut wrong, &channel, json!({"offsets": {"7": 0}})).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_partition")),
        "{e}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_timestamp_start_skips_older_messages() {
    let topic = unique("wsb-time-");
    create_topic(&topic, 1).await;
    let gw = gateway("unused").await;
    let channel = format!("events/{topic}");
    let mut publisher = Client::connect(gw.local_addr()).await;
    publish_seq(&mut publisher, &channel, 2, 0).await;
    let cut = now_ms();
    // The next message must be stamped after `cut + 1`, the start asked for below.
    eventually("the clock moves past the cut", async || now_ms() > cut + 1).await;
    let ok = publisher
        .request(json!({"type": "publish", "channel": channel, "payload": {"seq": 2}}))
        .await;
    assert_eq!(ok["type"], "ok");

    let mut replay = Client::connect(gw.local_addr()).await;
    let ok = subscribe_from(&mut replay, &channel, json!({"timestamp": cut + 1})).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let m = replay.next_message().await;
    assert_eq!(m["payload"]["seq"], 2);
    assert!(m["timestamp"].as_i64().unwrap() > cut);
    replay.assert_no_message().await;
    gw.shutdown().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn key_routed_channels_deliver_only_their_key() {
    let telemetry = unique("wsb-tele-");
    create_topic(&telemetry, 3).await;
    let gw = gateway(&telemetry).await;
    let addr = gw.local_addr();
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    let mut all = Client::connect(addr).await;
    a.subscribe("devices/a/telemetry").await;
    b.subscribe("devices/b/telemetry").await;
    all.subscribe("devices/+/telemetry").await;

    // Published through the gateway (the route sets the key) and by another Kafka client.
    let mut publisher = Client::connect(addr).await;
    let ok = publisher
        .publish("devices/a/telemetry", json!({"v": "a1"}))
        .await;
    assert_eq!(ok["type"], "ok", "{ok}");
    py_produce(
        &telemetry,
        json!([{"value": "{\"v\": \"b1\"}", "key": "b"}, {"value": "{\"v\": \"c1\"}", "key": "c"}]),
    )
    .await;

    let m = a.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["key"].as_str()),
        (Some("devices/a/telemetry"), Some("a"))
    );
    assert_eq!(m["payload"]["v"], "a1");
    let m = b.next_message().await;
    assert_eq!(
        (m["channel"].as_str(), m["payload"]["v"].as_str()),
        (Some("devices/b/telemetry"), Some("b1"))
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            all.next_message().await["channel"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            "devices/a/telemetry",
            "devices/b/telemetry",
            "devices/c/telemetry"
        ]
    );
    a.assert_no_message().await;
    b.assert_no_message().await;

    // A publish whose explicit key contradicts the channel's key is refused.
    let e = publisher
        .request(
            json!({"type": "publish", "channel": "devices/a/telemetry", "payload": 1, "key": "b"}),
        )
        .await;
    assert_eq!(e["code"], "invalid_frame", "{e}");
    gw.shutdown().await;
}

#[tokio::test]
async fn sockets_on_one_topic_share_one_consumer() {
    let topic = unique("wsb-share-");
    let telemetry = unique("wsb-sharetele-");
    create_topic(&topic, 3).await;
    create_topic(&telemetry, 3).await;
    let gw = gateway(&telemetry).await;
    let addr = gw.local_addr();
    let channel = format!("events/{topic}");
    let mut subs = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr).await;
        c.subscribe(&channel).await;
        subs.push(c);
    }
    assert_eq!(gw.hub().upstream_counts(), vec![("events".to_string(), 1)]);
    assert_eq!(gw.hub().sessions_per_upstream(), vec![20]);

    let sent = py_produce(&topic, json!([{"value": "\"hello\""}])).await;
    for sub in &mut subs {
        let m = sub.next_message().await;
        assert_eq!(m["payload"], "hello");
        assert_eq!(m["position"]["offset"], sent[0]["offset"]);
    }

    // Different keys of one topic are different upstreams in the core but one topic read here.
    let mut dev_a = Client::connect(addr).await;
    let mut dev_b = Client::connect(addr).await;
    dev_a.subscribe("devices/a/telemetry").await;
    dev_b.subscribe("devices/b/telemetry").await;
    assert_eq!(gw.hub().upstream_counts(), vec![("events".to_string(), 2)]);

    // A replay reads with its own consumer while it lasts.
    let mut replay = Client::connect(addr).await;
    let ok = subscribe_from(&mut replay, &channel, json!("earliest")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(gw.hub().upstream_counts(), vec![("events".to_string(), 3)]);
    assert_eq!(replay.next_message().await["payload"], "hello");

    drop(subs);
    drop(dev_a);
    drop(dev_b);
    drop(replay);
    eventually(
        "every consumer is released with its last socket",
        async || gw.hub().upstream_counts() == vec![("events".to_string(), 0)],
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn publish_errors_are_reported_and_the_next_publish_works() {
    let topic = unique("wsb-pub-");
    create_topic(&topic, 2).await;
    let gw = gateway("unused").await;
    let mut c = Client::connect(gw.local_addr()).await;

    let missing = unique("wsb-missing-");
    let e = c.publish(&format!("events/{missing}"), json!(1)).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unknown_topic")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains(&missing), "{e}");

    let e = c
        .request(json!({"type": "publish", "channel": format!("events/{topic}"), "payload": 1, "partition": 5}))
        .await;
    assert_eq!(e["code"], "invalid_partition", "{e}");

    // Larger than librdkafka's message.max.bytes (1,000,000) but within the frame limit.
    let e = c
        .publish(&format!("events/{topic}"), json!("x".repeat(1_000_100)))
        .await;
    assert_eq!(e["code"], "message_too_large", "{e}");

    let ok = c.publish(&format!("events/{topic}"), json!(2)).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert!(ok["position"]["offset"].is_i64(), "{ok}");

    // Subscribing to a missing topic is refused the same way, not silently empty.
    let e = c
        .request(json!({"type": "subscribe", "channel": format!("events/{missing}")}))
        .await;
    assert_eq!(e["code"], "unknown_topic", "{e}");
    // A pattern that would span several topics is refused with a clear code.
    let e = c
        .request(json!({"type": "subscribe", "channel": "events/+"}))
        .await;
    assert_eq!(e["code"], "unsupported_pattern", "{e}");
    assert_eq!(gw.hub().upstream_counts(), vec![("events".to_string(), 0)]);
    gw.shutdown().await;
}

#[tokio::test]
async fn readiness_reports_the_broker() {
    let gw = gateway("unused").await;
    eventually("the backend reports up", async || {
        let (status, body) = http_get(gw.local_addr(), "/readyz").await;
        status == 200 && body.contains("\"events\":\"up\"")
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn broker_down_and_up_is_reported_and_consumption_resumes() {
    let mut broker = kafka_support::PrivateBroker::start().await;
    let topic = unique("wsb-down-");
    kafka_support::create_topic_at(&broker.brokers(), &topic, 1).await;
    let mut text = config(&broker.brokers(), "unused");
    text = text.replace(
        "type = \"kafka\"",
        "type = \"kafka\"\ndelivery_timeout = \"2s\"",
    );
    let gw = start(&text).await;
    let addr = gw.local_addr();
    let channel = format!("events/{topic}");
    eventually("the backend is up", async || {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    let mut sub = Client::connect(addr).await;
    sub.subscribe(&channel).await;
    let mut publisher = Client::connect(addr).await;
    assert_eq!(
        publisher.publish(&channel, json!("before")).await["type"],
        "ok"
    );
    assert_eq!(sub.next_message().await["payload"], "before");

    broker.cut().await;
    let status = sub.next_of("status").await;
    assert_eq!(status["code"], "backend_down", "{status}");
    assert_eq!(status["backend"], "events");
    assert_eq!(status["subscriptions"], json!([channel]));
    eventually("/readyz reports the broker down", async || {
        let (code, body) = http_get(addr, "/readyz").await;
        code == 503 && body.contains("\"ready\":false")
    })
    .await;
    // A publish while the broker is unreachable fails within the delivery timeout.
    let asked = std::time::Instant::now();
    let e = publisher.publish(&channel, json!("lost")).await;
    eprintln!(
        "TIMING lost publish answered after {:?}: {e}",
        asked.elapsed()
    );
    assert_eq!(e["type"], "error", "{e}");
    assert!(
        e["code"] == "backend_timeout" || e["code"] == "backend_unavailable",
        "{e}"
    );

    // The broker is reachable again: the subscription carries on from where it was, without
    // the client doing anything.
    broker.restore().await;
    let status = sub.next_of("status").await;
    assert_eq!(status["code"], "backend_up", "{status}");
    eventually("/readyz reports the broker up", async || {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    for n in 0..20 {
        let ok = publisher.publish(&channel, json!({"after": n})).await;
        assert_eq!(
            ok["type"], "ok",
            "publish {n} after the broker is back: {ok}"
        );
    }
    // Every acknowledged message arrives once, in order, and nothing else.
    for n in 0..20 {
        assert_eq!(sub.next_message().await["payload"], json!({"after": n}));
    }
    sub.assert_no_message().await;
    // And the broker holds exactly the acknowledged messages.
    let log = kafka_support::py_consume_at(&broker.brokers(), &topic, 0, 0, 21).await;
    let values: Vec<&str> = log.iter().filter_map(|m| m["value"].as_str()).collect();
    // (a JSON string is published as its text)
    let mut expected = vec!["before".to_owned()];
    expected.extend((0..20).map(|n| format!("{{\"after\":{n}}}")));
    assert_eq!(values, expected);
    gw.shutdown().await;
}

/// Tansu never deletes old messages, so the retention gap is shown end to end against
/// librdkafka's mock cluster, whose partitions drop their oldest batches past 5 MB.
#[tokio::test]
async fn a_resume_below_the_log_start_gets_a_gap_status_before_the_messages() {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let topic = "retained";
    mock.create_topic(topic, 1, 1).expect("topic");
    let gw = start(&config(&mock.bootstrap_servers(), "unused")).await;
    let channel = format!("events/{topic}");
    let mut publisher = Client::connect(gw.local_addr()).await;
    let big = "x".repeat(600_000);
    for seq in 0..12 {
        let ok = publisher
            .publish(&channel, json!({"seq": seq, "pad": big}))
            .await;
        assert_eq!(ok["type"], "ok", "{ok}");
    }

    let mut resumed = Client::connect(gw.local_addr()).await;
    resumed
        .send(json!({"type": "subscribe", "id": "r", "channel": channel, "from": {"offsets": {"0": 1}}}))
        .await;
    // The subscribe's `ok`, then the gap, then the messages still held.
    let ok = resumed.recv().await;
    assert_eq!(ok["type"], "ok", "the reply comes first: {ok}");
    assert_eq!(ok["id"], "r");
    let first = resumed.recv().await;
    assert_eq!(
        first["type"], "status",
        "the gap comes before the messages: {first}"
    );
    assert_eq!(first["code"], "gap");
    assert_eq!(first["subscriptions"], json!([channel]));
    assert_eq!(first["partition"], 0);
    assert_eq!(first["requested_offset"], 1);
    let available = first["available_offset"]
        .as_i64()
        .expect("available offset");
    assert!(available > 1, "{first}");
    for seq in available..12 {
        let m = resumed.next_message().await;
        assert_eq!(m["payload"]["seq"], seq);
        assert_eq!(m["position"]["offset"], seq);
    }
    resumed.assert_no_message().await;
    gw.shutdown().await;
}

/// The broker-side input matrix on Kafka, produced with kafka-python: one topic read through a
/// `json`, a `text` and a `binary` route.
#[tokio::test]
async fn every_bad_payload_has_its_documented_outcome_on_kafka() {
    use base64::Engine;
    use common::input::{Format, cases, expect_case, good};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let topic = unique("wsb-matrix-");
    create_topic(&topic, 1).await;
    let mut config = format!(
        "[backends.events]\ntype = \"kafka\"\nbrokers = \"{}\"\n",
        brokers()
    );
    for format in Format::ALL {
        let name = format.name();
        config.push_str(&format!(
            "[[routes]]\nchannel = \"{name}/{{name}}\"\nbackend = \"events\"\ntopic = \"{{name}}\"\nformat = \"{name}\"\nallow = [\"subscribe\"]\n"
        ));
    }
    let gw = start(&config).await;
    let mut subscribers = Vec::new();
    for format in Format::ALL {
        let mut client = Client::connect(gw.local_addr()).await;
        client
            .subscribe(&format!("{}/{topic}", format.name()))
            .await;
        subscribers.push((format, client));
    }
    let cases = cases();
    let mut records = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        records.push(json!({"value_b64": b64(&case.bytes)}));
        records.push(json!({"value_b64": b64(&good(n))}));
    }
    // A null value (with a key), then many headers, a large one and one that is not UTF-8,
    // then a record with a null key.
    records.push(json!({"value": null, "key": "k"}));
    let mut headers = serde_json::Map::new();
    for i in 0..500 {
        headers.insert(format!("k{i}"), json!("v"));
    }
    headers.insert("big".into(), json!("v".repeat(64 * 1024)));
    headers.insert("raw".into(), json!({"b64": "//79"}));
    records.push(json!({"value": "headers", "headers": headers}));
    records.push(json!({"value": "last"}));
    py_produce(&topic, json!(records)).await;

    for (n, case) in cases.iter().enumerate() {
        for (format, client) in &mut subscribers {
            expect_case(client, *format, case, n).await;
        }
    }
    let (_, client) = &mut subscribers[1];
    // A null value arrives as an empty payload.
    let m = client.next_message().await;
    assert_eq!(m["payload"], "", "{m}");
    assert_eq!(m["key"], "k", "{m}");
    let m = client.next_message().await;
    assert_eq!(m["payload"], "headers", "{m}");
    assert_eq!(m["headers"]["k499"], "v");
    assert_eq!(m["headers"]["big"].as_str().map(str::len), Some(64 * 1024));
    // A header value that is not UTF-8 arrives with U+FFFD in place of each bad sequence.
    assert_eq!(m["headers"]["raw"], "\u{fffd}\u{fffd}\u{fffd}", "{m}");
    // A null key: no "key" field.
    let m = client.next_message().await;
    assert_eq!(m["payload"], "last");
    assert!(m.get("key").is_none(), "{m}");
    let (_, metrics) = http_get(gw.local_addr(), "/metrics").await;
    common::input::assert_no_panics(&metrics);
    gw.shutdown().await;
}

/// The first records of a replay come after the subscribe's `ok`, never before.
#[tokio::test]
async fn the_ok_of_a_replay_comes_before_its_first_records() {
    let topic = unique("wsb-order-");
    create_topic(&topic, 1).await;
    let records: Vec<Value> = (0..50).map(|n| json!({"value": n.to_string()})).collect();
    py_produce(&topic, json!(records)).await;
    let gw = gateway("unused").await;
    eventually("the backend is up", async || gw.hub().is_ready()).await;
    for _ in 0..5 {
        let mut client = Client::connect(gw.local_addr()).await;
        client
            .send(json!({"type": "subscribe", "id": 1, "channel": format!("events/{topic}"), "from": "earliest"}))
            .await;
        let first = client.recv().await;
        assert_eq!(first["type"], "ok", "first frame after subscribe: {first}");
        let m = client.recv().await;
        assert_eq!(m["payload"], json!(0), "{m}");
    }
    gw.shutdown().await;
}

/// Replays are bounded per connection and per gateway, and a released replay frees its place.
#[tokio::test]
async fn replay_subscriptions_are_bounded() {
    let topic = unique("wsb-replays-");
    create_topic(&topic, 1).await;
    let text = format!(
        "[limits]\nmax_replays_per_connection = 2\nmax_replays = 3\n{}",
        config(&brokers(), "unused")
    );
    let gw = start(&text).await;
    eventually("the backend is up", async || gw.hub().is_ready()).await;
    let channel = format!("events/{topic}");
    let replay =
        async |client: &mut Client| subscribe_from(client, &channel, json!("earliest")).await;
    let mut first = Client::connect(gw.local_addr()).await;
    let mut second = Client::connect(gw.local_addr()).await;
    // Each replay is its own subscription: use distinct patterns on one connection through
    // the key-less route, then a second connection.
    assert_eq!(replay(&mut first).await["type"], "ok");
    let other = format!("events/{}", unique("wsb-replays-b-"));
    create_topic(other.trim_start_matches("events/"), 1).await;
    let r = subscribe_from(&mut first, &other, json!("earliest")).await;
    assert_eq!(r["type"], "ok", "{r}");
    let third = format!("events/{}", unique("wsb-replays-c-"));
    create_topic(third.trim_start_matches("events/"), 1).await;
    let r = subscribe_from(&mut first, &third, json!("earliest")).await;
    assert_eq!(r["code"], "too_many_replays", "per connection: {r}");
    // Live subscriptions do not count.
    first.subscribe(&third).await;

    assert_eq!(replay(&mut second).await["type"], "ok");
    let r = subscribe_from(&mut second, &other, json!("earliest")).await;
    assert_eq!(r["code"], "too_many_replays", "per gateway: {r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_replays")
    );

    let r = first
        .request(json!({"type": "unsubscribe", "channel": other}))
        .await;
    assert_eq!(r["type"], "ok");
    let r = subscribe_from(&mut second, &other, json!("earliest")).await;
    assert_eq!(r["type"], "ok", "a released replay frees its place: {r}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_panic_while_dispatching_skips_that_record_and_the_consumer_goes_on() {
    use common::faulty::{self, BOOM, HealthLog, Panicky};
    let topic = unique("wsb-panic-");
    create_topic(&topic, 1).await;
    let (backend, panics) = faulty::build(&config(&brokers(), "unused"), "events");
    let health = HealthLog::start(backend.as_ref());
    health.wait_up("the backend connects").await;
    let sink = std::sync::Arc::new(Panicky::default());
    faulty::subscribe(backend.as_ref(), 1, &topic, sink.clone()).await;
    py_produce(&topic, json!([{"value": "one"}])).await;
    sink.wait_for(b"one").await;

    // The panic is caught around the one record: the consumer thread skips it and goes on with
    // the next, and the backend stays up.
    py_produce(
        &topic,
        json!([{"value": std::str::from_utf8(BOOM).unwrap()}, {"value": "two"}]),
    )
    .await;
    sink.wait_for(b"two").await;
    faulty::assert_contained(&sink, &panics, &health);
    backend.close().await;
}

#[tokio::test]
async fn a_replay_waits_for_a_slow_client_instead_of_dropping_messages() {
    let topic = unique("wsb-paced-");
    create_topic(&topic, 1).await;
    let channel = format!("events/{topic}");
    let text = format!(
        "[server]\nqueue_capacity = 64\n[limits]\npublish_per_second = 0\npublish_bytes_per_second = 0\n{}",
        config(&brokers(), "unused")
    );
    let gw = start(&text).await;
    let addr = gw.local_addr();
    // 1500 records of 16 KiB (24 MB): far more than socket buffers and a 64-message queue hold.
    let mut publisher = Client::connect(addr).await;
    common::flood(&mut publisher, &channel, 1500, 16 * 1024).await;

    let mut replay = Client::connect(addr).await;
    let ok = subscribe_from(&mut replay, &channel, json!("earliest")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    // The client reads nothing for a while (well within the write timeout), so its socket and
    // its queue fill up; the replay waits for it instead of dropping what does not fit.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // (Concurrent publishes from one socket may reach the log in any order.)
    let mut seqs = Vec::new();
    for n in 0..1500 {
        let frame = replay.recv().await;
        assert_eq!(frame["type"], "message", "frame {n}: {frame}");
        seqs.extend(frame["payload"]["seq"].as_u64());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..1500).collect::<Vec<u64>>(), "every record, once");
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("wsbridge_dropped_total") && !l.ends_with(" 0")),
        "nothing was dropped:\n{metrics}"
    );
    gw.shutdown().await;
}

/// Under a 500 msg/s stream to 100 subscribers the broker is killed (SIGKILL) and started
/// again, then hangs (SIGSTOP) past the health probe and goes on (SIGCONT). Each time every
/// socket stays open, hears `backend_down` and `backend_up`, and the stream resumes where it
/// was, nothing lost or duplicated; a publish meanwhile gets an error within `delivery_timeout`;
/// the broker holds every acknowledged publish exactly once.
#[tokio::test]
async fn a_killed_or_hung_broker_under_load_loses_and_duplicates_nothing() {
    let mut broker = kafka_support::PrivateBroker::start().await;
    let topic = unique("wsb-faults-");
    kafka_support::create_topic_at(&broker.brokers(), &topic, 1).await;
    let text = format!(
        "[limits]\npublish_per_second = 0\npublish_bytes_per_second = 0\n{}",
        config(&broker.brokers(), "unused").replace(
            "type = \"kafka\"",
            "type = \"kafka\"\ndelivery_timeout = \"2s\""
        )
    );
    let gw = start(&text).await;
    let addr = gw.local_addr();
    eventually("the backend is up", async || {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    let channel = format!("events/{topic}");
    let mut subscribers = common::hundred_subscribers(addr, &channel).await;
    let mut publisher = Client::connect(addr).await;
    let refused = |e: &Value| e["code"] == "backend_timeout" || e["code"] == "backend_unavailable";
    common::stream_500_per_second(&mut publisher, &channel, 0, 500).await;
    common::expect_stream(&mut subscribers, 0..500, &[]).await;

    // Killed and started again with its log: subscriptions go on from their next offset.
    broker.kill().await;
    common::expect_status(&mut subscribers, "backend_down").await;
    let e = publisher.publish(&channel, json!({"seq": -1})).await;
    assert!(refused(&e), "{e}");
    broker.run().await;
    common::expect_status(&mut subscribers, "backend_up").await;
    common::stream_500_per_second(&mut publisher, &channel, 500, 1000).await;
    // A publish refused for a timeout may still have reached the broker: its outcome is unknown.
    common::expect_stream(&mut subscribers, 500..1000, &[-1]).await;

    // Hung, then going on.
    broker.freeze(true).await;
    let e = publisher.publish(&channel, json!({"seq": -2})).await;
    assert!(refused(&e), "{e}");
    common::expect_status(&mut subscribers, "backend_down").await;
    broker.freeze(false).await;
    common::expect_status(&mut subscribers, "backend_up").await;
    common::stream_500_per_second(&mut publisher, &channel, 1000, 1500).await;
    common::expect_stream(&mut subscribers, 1000..1500, &[-1, -2]).await;
    for ws in subscribers.iter_mut().take(5) {
        ws.assert_no_message().await;
    }
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(
        metrics.contains("wsbridge_connections 101\n"),
        "no socket was lost"
    );
    gw.shutdown().await;

    let seq_of = |m: &Value| {
        m["value"]
            .as_str()
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .and_then(|v| v["seq"].as_i64())
    };
    let mut log = kafka_support::py_consume_at(&broker.brokers(), &topic, 0, 0, 1500).await;
    let unknown = log
        .iter()
        .filter(|m| seq_of(m).is_some_and(|s| s < 0))
        .count();
    if unknown > 0 {
        let more = kafka_support::py_consume_at(&broker.brokers(), &topic, 0, 1500, unknown).await;
        log.extend(more);
    }
    let seqs: Vec<i64> = log
        .iter()
        .filter_map(seq_of)
        .filter(|&seq| seq >= 0)
        .collect();
    assert_eq!(
        seqs,
        (0..1500).collect::<Vec<i64>>(),
        "the broker holds each once"
    );
}
