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
    py_consume_at(&brokers(), topic, partition, offset, count).await
}

/// [`py_consume`] from the broker at `brokers`.
pub async fn py_consume_at(
    brokers: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    count: usize,
) -> Vec<Value> {
    let out = kafka_python(json!({"op": "consume", "brokers": brokers, "topic": topic, "partition": partition, "offset": offset, "count": count})).await;
    out.as_array().expect("a list").clone()
}

/// A Tansu broker of a test's own with its log on disk (SQLite in a temporary directory), reached
/// through a TCP relay the test can cut and restore. It can be killed and started again with its
/// log and topic ids intact, as a real broker restarts. (A memory-only Tansu would come back
/// empty, its recreated topics with new ids, which librdkafka's metadata cache does not cope
/// with: confluentinc/librdkafka#4778.)
pub struct PrivateBroker {
    /// Where clients connect: the relay.
    pub port: u16,
    /// Where the broker itself listens.
    backend: u16,
    dir: std::path::PathBuf,
    relay: Relay,
    child: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        let (port, backend) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(crate::common::unique("wsbridge-tansu-"));
        std::fs::create_dir_all(&dir).expect("create the broker's directory");
        let mut relay = Relay {
            port,
            target: format!("127.0.0.1:{backend}"),
            accept: None,
            connections: Default::default(),
        };
        relay.open().await;
        let mut broker = PrivateBroker {
            port,
            backend,
            dir,
            relay,
            child: None,
        };
        broker.run().await;
        broker
    }

    /// Starts (or restarts) the broker process and waits until it listens.
    pub async fn run(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let tansu = std::env::var("HOME")
            .map(|h| format!("{h}/.cargo/bin/tansu"))
            .ok()
            .filter(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "tansu".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("open the broker log");
        // The broker advertises the relay's address, so every connection goes through it.
        let child = tokio::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.backend),
            ])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            // A path relative to the working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("tansu starts (see scripts/setup/40-kafka.sh)");
        self.child = Some(child);
        let target = format!("127.0.0.1:{}", self.backend);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&target).await.is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && tokio::time::Instant::now() < deadline,
                "tansu listens on {target} ({exited:?}):\n{}",
                std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts every connection to the broker and refuses new ones.
    pub async fn cut(&mut self) {
        self.relay.close();
    }

    /// Lets connections through again.
    pub async fn restore(&mut self) {
        self.relay.open().await;
    }

    /// Kills the broker process at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the broker is running");
        child.kill().await.expect("kill tansu");
        // Connections the relay still holds to the dead process end with it.
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the broker process: its connections stay open, but
    /// it answers nothing meanwhile.
    pub async fn freeze(&self, frozen: bool) {
        let pid = self
            .child
            .as_ref()
            .and_then(tokio::process::Child::id)
            .expect("the broker is running");
        crate::common::signal(pid, if frozen { "STOP" } else { "CONT" }).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // Also on a failed test: the broker must not outlive it (SIGKILL ends a frozen one too).
        self.relay.close();
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP forwarder from `port` to `target` whose connections can all be cut at once.
struct Relay {
    port: u16,
    target: String,
    accept: Option<tokio::task::JoinHandle<()>>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn open(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "relay binds 127.0.0.1:{}: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let (target, connections) = (self.target.clone(), self.connections.clone());
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(task.abort_handle());
            }
        }));
    }

    fn close(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            connection.abort();
        }
    }
}
