//! Kafka helpers for the integration tests: the broker address, topic creation through the admin
//! API, and kafka-python (a pure-Python client, independent of librdkafka) as a second producer
//! and consumer. `scripts/setup/40-kafka.sh` starts the broker and installs kafka-python.
#![allow(dead_code)]

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};

/// The shared test broker (override with WSBRIDGE_KAFKA_BROKERS).
pub fn brokers() -> String {
    std::env::var("WSBRIDGE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Creates a topic (Tansu does not create topics on first use).
pub async fn create_topic_at(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create topic {name}: {e} (is the broker running? see scripts/setup/40-kafka.sh)"
            )
        });
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_at(&brokers(), name, partitions).await
}

const KAFKA_PYTHON: &str = r#"
import base64, json, sys
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
cmd = json.loads(sys.argv[1])
if cmd["op"] == "produce":
    producer = KafkaProducer(bootstrap_servers=cmd["brokers"], acks="all")
    out = []
    for m in cmd["messages"]:
        key = m.get("key")
        # "value_b64" and header values {"b64": ...} are raw bytes; "value": null is a null value.
        value = m.get("value")
        value = base64.b64decode(m["value_b64"]) if "value_b64" in m else (
            value.encode() if value is not None else None)
        headers = [(k, base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode())
                   for k, v in m.get("headers", {}).items()]
        sent = producer.send(cmd["topic"], value=value,
                             key=key.encode() if key is not None else None,
                             headers=headers, partition=m.get("partition"))
        md = sent.get(timeout=20)
        out.append({"partition": md.partition, "offset": md.offset, "timestamp": md.timestamp})
    producer.flush()
    producer.close()
    print(json.dumps(out))
elif cmd["op"] == "consume":
    consumer = KafkaConsumer(bootstrap_servers=cmd["brokers"], enable_auto_commit=False,
                             consumer_timeout_ms=20000)
    tp = TopicPartition(cmd["topic"], cmd["partition"])
    consumer.assign([tp])
    consumer.seek(tp, cmd["offset"])
    out = []
    for m in consumer:
        out.append({"key": m.key.decode() if m.key is not None else None,
                    "value": m.value.decode(),
                    "headers": {k: v.decode() for k, v in m.headers},
                    "partition": m.partition, "offset": m.offset})
        if len(out) >= cmd["count"]:
            break
    consumer.close()
    print(json.dumps(out))
"#;

async fn kafka_python(command: Value) -> Value {
    let run = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(KAFKA_PYTHON)
        .arg(command.to_string())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("kafka-python finishes")
        .expect("python3 runs (see scripts/setup/40-kafka.sh)");
    assert!(
        output.status.success(),
        "kafka-python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kafka-python prints JSON")
}

/// Produces with kafka-python; each message is `{"value", "key"?, "headers"?, "partition"?}`.
/// Returns each message's `{"partition", "offset", "timestamp"}`.
pub async fn py_produce(topic: &str, messages: Value) -> Vec<Value> {
    let out = kafka_python(
        json!({"op": "produce", "brokers": brokers(), "topic": topic, "messages": messages}),
    )
    .await;
    out.as_array().expect("a list").clone()
}

/// Reads `count` messages of one partition from `offset` with kafka-python.
pub async fn py_consume(topic: &str, partition: i32, offset: i64, count: usize) -> Vec<Value> {
    let out = kafka_python(json!({"op": "consume", "brokers": brokers(), "topic": topic, "partition": partition, "offset": offset, "count": count})).await;
    out.as_array().expect("a list").clone()
}

/// A Tansu broker of a test's own, on a free port, so the test can stop and restart it.
pub struct PrivateBroker {
    pub port: u16,
    child: Option<tokio::process::Child>,
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut broker = PrivateBroker { port, child: None };
        broker.restart().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on the same port, with empty in-memory storage.
    pub async fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let tansu = std::env::var("HOME")
            .map(|h| format!("{h}/.cargo/bin/tansu"))
            .ok()
            .filter(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "tansu".into());
        let child = tokio::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tansu starts (see scripts/setup/40-kafka.sh)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu listens on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the broker and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill tansu");
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // Also on a failed test: the broker must not outlive it.
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}
