//! Latest-value conflation: `slow_consumer = "latest_per_key"` and `max_rate`, over real
//! sockets, on the memory backend and through Mosquitto and a Kafka-protocol broker.

mod common;
mod kafka_support;

use std::collections::HashMap;
use std::time::Instant;

use common::{Client, WAIT, start, unique};
use serde_json::{Value, json};

/// A gateway with one route `#` on the memory backend taking `route_extra`.
fn memory_config(server_extra: &str, route_extra: &str) -> String {
    format!(
        r##"
        [server]
        {server_extra}
        [limits]
        publish_per_second = 0
        publish_bytes_per_second = 0
        [backends.local]
        type = "memory"
        [[routes]]
        channel = "#"
        backend = "local"
        topic = "#"
        allow = ["subscribe", "publish"]
        {route_extra}
        "##
    )
}

/// Publishes `rounds` rounds of one message to each of `channels` (`{"seq": round, "pad": ...}`),
/// checking the broker's `ok` for every 32nd publish and the last.
async fn publish_rounds(publisher: &mut Client, channels: &[String], rounds: u64, pad: usize) {
    let pad = "x".repeat(pad);
    let total = rounds * channels.len() as u64;
    let mut id = 0u64;
    for seq in 0..rounds {
        for channel in channels {
            publisher
                .send(json!({"type": "publish", "id": id, "channel": channel,
                             "payload": {"seq": seq, "pad": pad}}))
                .await;
            if id % 32 == 31 || id + 1 == total {
                let reply = publisher.reply_to(json!(id)).await;
                assert_eq!(reply["type"], "ok", "publish {id}: {reply}");
            }
            id += 1;
        }
    }
}

/// What a subscriber read until every channel's last value arrived.
#[derive(Debug, Default)]
struct Received {
    /// Messages per channel.
    messages: HashMap<String, u64>,
    /// Summed counts of the `messages_conflated` and `messages_dropped` statuses.
    conflated: u64,
    dropped: u64,
}

impl Received {
    fn total(&self) -> u64 {
        self.messages.values().sum()
    }
}

/// Reads until the message with `seq == last` arrived on every one of `channels`, checking that
/// each channel's values arrive in order.
async fn read_until_last(client: &mut Client, channels: &[String], last: u64) -> Received {
    read_until_last_by(client, "channel", channels, last).await
}

/// [`read_until_last`] for messages told apart by their frame's field `by` (`channel`, `key`).
async fn read_until_last_by(
    client: &mut Client,
    by: &str,
    channels: &[String],
    last: u64,
) -> Received {
    let mut received = Received::default();
    let mut newest: HashMap<String, u64> = HashMap::new();
    let done =
        |newest: &HashMap<String, u64>| channels.iter().all(|c| newest.get(c) == Some(&last));
    while !done(&newest) {
        let frame: Value = client.recv().await;
        match frame["type"].as_str() {
            Some("message") => {
                let channel = frame[by].as_str().unwrap().to_owned();
                let seq = frame["payload"]["seq"].as_u64().unwrap();
                if let Some(before) = newest.get(&channel) {
                    assert!(*before < seq, "{channel}: {seq} after {before}");
                }
                newest.insert(channel.clone(), seq);
                *received.messages.entry(channel).or_default() += 1;
            }
            Some("status") => match frame["code"].as_str() {
                Some("messages_conflated") => {
                    received.conflated += frame["count"].as_u64().unwrap();
                }
                Some("messages_dropped") => received.dropped += frame["count"].as_u64().unwrap(),
                _ => panic!("unexpected status {frame}"),
            },
            _ => panic!("unexpected frame {frame}"),
        }
    }
    received
}

#[tokio::test]
async fn a_slow_client_gets_the_latest_value_of_every_channel_and_a_count() {
    let gw = start(&memory_config(
        "queue_capacity = 16\nwrite_timeout = \"60s\"",
        "slow_consumer = \"latest_per_key\"",
    ))
    .await;
    let addr = gw.local_addr();
    let base = unique("dash");
    let channels: Vec<String> = (0..8).map(|k| format!("{base}/k{k}")).collect();
    let mut slow = Client::connect(addr).await;
    slow.subscribe(&format!("{base}/#")).await;

    // 8 channels × 120 rounds of 32 KiB (30 MB) while the client reads nothing: far more than
    // the socket buffers and its queue of 16 hold.
    let rounds = 120;
    let mut publisher = Client::connect(addr).await;
    publish_rounds(&mut publisher, &channels, rounds, 32 * 1024).await;

    let received = read_until_last(&mut slow, &channels, rounds - 1).await;
    assert!(received.conflated > 0, "{received:?}");
    assert_eq!(
        received.dropped, 0,
        "each channel had an older value to replace"
    );
    assert_eq!(
        received.total() + received.conflated,
        rounds * channels.len() as u64,
        "every message was delivered or counted as replaced: {received:?}"
    );
    slow.assert_no_message().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn drop_oldest_routes_still_drop_and_never_conflate() {
    let gw = start(&memory_config(
        "queue_capacity = 16\nwrite_timeout = \"60s\"",
        "slow_consumer = \"drop_oldest\"",
    ))
    .await;
    let addr = gw.local_addr();
    let base = unique("dropping");
    let channels: Vec<String> = (0..8).map(|k| format!("{base}/k{k}")).collect();
    let mut slow = Client::connect(addr).await;
    slow.subscribe(&format!("{base}/#")).await;
    let rounds = 120;
    let mut publisher = Client::connect(addr).await;
    publish_rounds(&mut publisher, &channels, rounds, 32 * 1024).await;

    // The newest 16 messages (two rounds) are the last ones dropping keeps.
    let received = read_until_last(&mut slow, &channels, rounds - 1).await;
    assert_eq!(received.conflated, 0, "{received:?}");
    assert!(received.dropped > 0, "{received:?}");
    assert_eq!(
        received.total() + received.dropped,
        rounds * channels.len() as u64,
        "every message was delivered or counted as dropped: {received:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn max_rate_limits_what_a_fast_client_gets_and_the_last_value_arrives() {
    let rate = 20;
    let gw = start(&memory_config(
        "",
        &format!("slow_consumer = \"latest_per_key\"\nmax_rate = {rate}"),
    ))
    .await;
    let addr = gw.local_addr();
    let base = unique("paced");
    let channels: Vec<String> = (0..5).map(|k| format!("{base}/k{k}")).collect();
    let mut client = Client::connect(addr).await;
    client.subscribe(&format!("{base}/#")).await;

    let rounds = 200;
    let started = Instant::now();
    let mut publisher = Client::connect(addr).await;
    publish_rounds(&mut publisher, &channels, rounds, 16).await;
    // The client reads all along; the stream has stopped and the last values still arrive.
    let received = read_until_last(&mut client, &channels, rounds - 1).await;
    let elapsed = started.elapsed().as_secs_f64();

    // A generous bound: twice the rate over the whole run, plus the first message and the last.
    let bound = (2.0 * f64::from(rate) * elapsed) as u64 + 2;
    for channel in &channels {
        let got = received.messages[channel];
        assert!(
            got <= bound,
            "{channel}: {got} messages in {elapsed:.2} s at max_rate {rate}"
        );
    }
    assert!(received.conflated > 0, "{received:?}");
    assert_eq!(received.dropped, 0, "{received:?}");
    assert_eq!(
        received.total() + received.conflated,
        rounds * channels.len() as u64,
        "every message was delivered or counted as replaced: {received:?}"
    );
    client.assert_no_message().await;
    gw.shutdown().await;
}

/// Reads a Server-Sent Events stream until `done` says so about the events so far; returns them
/// as (event name, data) pairs.
async fn read_sse(
    response: &mut reqwest::Response,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let (mut buffer, mut events) = (String::new(), Vec::new());
    while !done(&events) {
        let chunk = tokio::time::timeout(WAIT, response.chunk())
            .await
            .expect("the stream sends within the wait")
            .expect("the stream reads")
            .expect("the stream goes on");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut kind = "message".to_owned();
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    kind = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(value).unwrap());
                }
            }
            if let Some(data) = data {
                events.push((kind, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn a_server_sent_events_stream_is_paced_and_told_of_the_replaced_messages() {
    let gw = start(&memory_config("", "max_rate = 10")).await;
    let addr = gw.local_addr();
    let channel = format!("{}/temp", unique("ssepaced"));
    let url = format!("http://{addr}/sse?channel={}", channel.replace('/', "%2F"));
    let mut response = tokio::time::timeout(WAIT, reqwest::get(url))
        .await
        .expect("/sse answers in time")
        .expect("/sse request");
    assert_eq!(response.status(), 200);

    let rounds = 50;
    let mut publisher = Client::connect(addr).await;
    publish_rounds(&mut publisher, std::slice::from_ref(&channel), rounds, 16).await;
    let events = read_sse(&mut response, |events| {
        events
            .iter()
            .any(|(kind, data)| kind == "message" && data["payload"]["seq"] == rounds - 1)
    })
    .await;
    let messages = events.iter().filter(|(kind, _)| kind == "message").count() as u64;
    let conflated: u64 = events
        .iter()
        .filter(|(kind, data)| kind == "status" && data["code"] == "messages_conflated")
        .map(|(_, data)| data["count"].as_u64().unwrap())
        .sum();
    assert!(conflated > 0, "{events:?}");
    assert_eq!(messages + conflated, rounds, "{events:?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn through_mosquitto_one_topic_per_key_is_paced_to_its_latest_value() {
    let prefix = unique("wsbconf");
    let gw = start(&format!(
        r##"
        [limits]
        publish_per_second = 0
        publish_bytes_per_second = 0
        [backends.plant]
        type = "mqtt"
        url = "mqtt://127.0.0.1:1883"
        [[routes]]
        channel = "devices/#"
        backend = "plant"
        topic = "{prefix}/devices/#"
        allow = ["subscribe", "publish"]
        qos = 1
        slow_consumer = "latest_per_key"
        max_rate = 10
        "##
    ))
    .await;
    common::eventually("the MQTT backend is connected", async || {
        gw.hub().is_ready()
    })
    .await;
    let addr = gw.local_addr();
    let channels: Vec<String> = (0..4).map(|k| format!("devices/d{k}/state")).collect();
    let mut client = Client::connect(addr).await;
    client.subscribe("devices/#").await;

    let rounds = 40;
    let mut publisher = Client::connect(addr).await;
    publish_rounds(&mut publisher, &channels, rounds, 16).await;
    let received = read_until_last(&mut client, &channels, rounds - 1).await;
    assert!(received.conflated > 0, "{received:?}");
    assert_eq!(
        received.total() + received.conflated,
        rounds * channels.len() as u64,
        "every message was delivered or counted as replaced: {received:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn through_kafka_each_key_of_a_channel_is_paced_to_its_latest_value() {
    let topic = unique("wsb-conf-");
    kafka_support::create_topic(&topic, 1).await;
    let gw = start(&format!(
        r#"
        [limits]
        publish_per_second = 0
        publish_bytes_per_second = 0
        [backends.events]
        type = "kafka"
        brokers = "{}"
        [[routes]]
        channel = "readings/{{name}}"
        backend = "events"
        topic = "{{name}}"
        allow = ["subscribe", "publish"]
        slow_consumer = "latest_per_key"
        max_rate = 5
        "#,
        kafka_support::brokers()
    ))
    .await;
    let addr = gw.local_addr();
    let channel = format!("readings/{topic}");
    let keys: Vec<String> = (0..3).map(|k| format!("sensor-{k}")).collect();
    let rounds = 30;
    let mut publisher = Client::connect(addr).await;
    for seq in 0..rounds {
        for key in &keys {
            let reply = publisher
                .request(json!({"type": "publish", "channel": channel, "key": key,
                                "payload": {"seq": seq}}))
                .await;
            assert_eq!(reply["type"], "ok", "{reply}");
        }
    }
    // A replay of the whole topic: one channel, three keys, each paced to its latest value.
    let mut client = Client::connect(addr).await;
    let reply = client
        .request(json!({"type": "subscribe", "channel": channel, "from": "earliest"}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    let received = read_until_last_by(&mut client, "key", &keys, rounds - 1).await;
    assert!(received.conflated > 0, "{received:?}");
    assert_eq!(
        received.total() + received.conflated,
        rounds * keys.len() as u64,
        "every message was delivered or counted as replaced: {received:?}"
    );
    gw.shutdown().await;
}
