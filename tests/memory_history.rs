//! The memory backend's history: positions on every message, `from` on subscriptions, and the
//! `gap` status for positions it no longer holds, over real sockets.

mod common;

use common::{Client, start, unique};
use serde_json::{Value, json};

fn config(history: &str) -> String {
    format!(
        r##"
[limits]
publish_per_second = 0
publish_bytes_per_second = 0

[backends.local]
type = "memory"
{history}

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
"##
    )
}

/// Publishes each payload on `channel` and returns the positions the acks carry.
async fn publish_all(ws: &mut Client, channel: &str, payloads: &[&str]) -> Vec<i64> {
    let mut offsets = Vec::new();
    for payload in payloads {
        let ok = ws.publish(channel, json!(payload)).await;
        assert_eq!(ok["type"], "ok", "{ok}");
        assert_eq!(ok["position"]["partition"], 0, "{ok}");
        offsets.push(ok["position"]["offset"].as_i64().expect("an offset"));
    }
    offsets
}

async fn subscribe_from(ws: &mut Client, channel: &str, from: Value) -> Value {
    ws.request(json!({"type": "subscribe", "channel": channel, "from": from}))
        .await
}

/// The payloads and offsets of the next `n` messages.
async fn next_messages(ws: &mut Client, n: usize) -> Vec<(String, i64)> {
    let mut received = Vec::new();
    for _ in 0..n {
        let m = ws.next_message().await;
        received.push((
            // A published string goes to the broker as its text, so "1" comes back as 1.
            match &m["payload"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
            m["position"]["offset"]
                .as_i64()
                .expect("a position on every message"),
        ));
    }
    received
}

#[tokio::test]
async fn a_subscription_replays_from_earliest_or_from_a_position_then_goes_live() {
    let gw = start(&config("history_size = 100")).await;
    let channel = format!("{}/temp", unique("hist"));
    let mut publisher = Client::connect(gw.local_addr()).await;
    let offsets = publish_all(&mut publisher, &channel, &["1", "2", "3", "4"]).await;
    assert!(offsets.windows(2).all(|w| w[1] > w[0]), "{offsets:?}");

    let mut everything = Client::connect(gw.local_addr()).await;
    let ok = subscribe_from(&mut everything, &channel, json!("earliest")).await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let replayed = next_messages(&mut everything, 4).await;
    assert_eq!(
        replayed,
        ["1", "2", "3", "4"]
            .iter()
            .zip(&offsets)
            .map(|(p, o)| (p.to_string(), *o))
            .collect::<Vec<_>>()
    );

    // Resuming after the second message, as a client that saw it would.
    let mut resumed = Client::connect(gw.local_addr()).await;
    let from = json!({"offsets": {"0": offsets[1] + 1}});
    assert_eq!(
        subscribe_from(&mut resumed, &channel, from).await["type"],
        "ok"
    );
    let got: Vec<String> = next_messages(&mut resumed, 2)
        .await
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(got, ["3", "4"]);

    // Both continue live, with positions after the replayed ones.
    let live = publish_all(&mut publisher, &channel, &["5"]).await;
    for ws in [&mut everything, &mut resumed] {
        assert_eq!(next_messages(ws, 1).await, [("5".to_owned(), live[0])]);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_position_the_history_no_longer_holds_gives_a_gap_status_then_the_rest() {
    let gw = start(&config("history_size = 3")).await;
    let channel = format!("{}/temp", unique("gap"));
    let mut publisher = Client::connect(gw.local_addr()).await;
    let offsets = publish_all(&mut publisher, &channel, &["1", "2", "3", "4", "5"]).await;

    let mut ws = Client::connect(gw.local_addr()).await;
    let from = json!({"offsets": {"0": offsets[0]}});
    assert_eq!(subscribe_from(&mut ws, &channel, from).await["type"], "ok");
    let gap = ws.next_of("status").await;
    assert_eq!(gap["code"], "gap", "{gap}");
    assert_eq!(gap["requested_offset"], offsets[0], "{gap}");
    assert_eq!(gap["available_offset"], offsets[2], "{gap}");
    let got: Vec<String> = next_messages(&mut ws, 3)
        .await
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(got, ["3", "4", "5"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_position_from_before_a_restart_gives_a_gap_and_never_other_messages() {
    let config = config("history_size = 100");
    let channel = format!("{}/temp", unique("epoch"));
    let gw = start(&config).await;
    let mut publisher = Client::connect(gw.local_addr()).await;
    let before = publish_all(&mut publisher, &channel, &["old 1", "old 2"]).await;
    gw.shutdown().await;

    // The history is lost with the process; the restarted one gives out higher offsets.
    let gw = start(&config).await;
    let mut publisher = Client::connect(gw.local_addr()).await;
    let after = publish_all(&mut publisher, &channel, &["new 1"]).await;
    assert!(after[0] > before[1], "{before:?} {after:?}");

    let mut ws = Client::connect(gw.local_addr()).await;
    let from = json!({"offsets": {"0": before[1] + 1}});
    assert_eq!(subscribe_from(&mut ws, &channel, from).await["type"], "ok");
    let gap = ws.next_of("status").await;
    assert_eq!(gap["code"], "gap", "{gap}");
    assert_eq!(gap["available_offset"], after[0], "{gap}");
    assert_eq!(
        next_messages(&mut ws, 1).await,
        [("new 1".to_owned(), after[0])]
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn without_a_history_from_is_unsupported_and_messages_carry_no_position() {
    let gw = start(&config("")).await;
    let channel = unique("nohist");
    let mut ws = Client::connect(gw.local_addr()).await;
    let refused = subscribe_from(&mut ws, &channel, json!("earliest")).await;
    assert_eq!(refused["code"], "unsupported", "{refused}");
    ws.subscribe(&channel).await;
    let ok = ws.publish(&channel, json!("x")).await;
    assert!(ok.get("position").is_none(), "{ok}");
    assert!(ws.next_message().await.get("position").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_history_key_out_of_range_is_refused_naming_it() {
    let problems = wsbridge::Config::from_toml(&config(
        "history_size = 2000000\nhistory_ttl = \"0s\"\nhistory_topics = 0",
    ))
    .unwrap_err()
    .to_string();
    for key in [
        "backends.local.history_size",
        "backends.local.history_ttl",
        "backends.local.history_topics",
    ] {
        assert!(problems.contains(key), "{key} in {problems}");
    }
}
