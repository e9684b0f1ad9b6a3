//! RabbitMQ helpers for tests/amqp.rs: an independent AMQP client (Python pika, installed by
//! scripts/setup/30-rabbitmq.sh), `rabbitmqctl` for what the broker holds, and a gateway that is
//! connected before the test starts.
#![allow(dead_code)]

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::{WAIT, eventually, start};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// pika as a command-line client: `publish`, `consume`, `get`, `delete_exchange`,
/// `delete_queue`, `declare_queue`. Output is one JSON object per line.
const PIKA: &str = r#"
import json, os, sys, pika

URL = os.environ.get("PIKA_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

def text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [text(x) for x in v]
    return v

def describe(method, props, body):
    return json.dumps({
        "exchange": method.exchange,
        "routing_key": method.routing_key,
        "body": body.decode("utf-8", "replace"),
        "headers": {k: text(v) for k, v in (props.headers or {}).items()},
        "delivery_mode": props.delivery_mode,
        "timestamp": props.timestamp,
    })

cmd, args = sys.argv[1], sys.argv[2:]
connection = pika.BlockingConnection(pika.URLParameters(URL))
channel = connection.channel()
if cmd == "publish":
    exchange, key, body, props = args[0], args[1], args[2], json.loads(args[3])
    channel.confirm_delivery()
    channel.basic_publish(exchange, key, body.encode(), pika.BasicProperties(**props))
elif cmd == "publish_bytes":
    # The body and any header value written {"b64": "..."} are raw bytes.
    import base64
    exchange, key, body, props = args[0], args[1], base64.b64decode(args[2]), json.loads(args[3])
    if "headers" in props:
        props["headers"] = {k: base64.b64decode(v["b64"]) if isinstance(v, dict) else v
                            for k, v in props["headers"].items()}
    channel.confirm_delivery()
    channel.basic_publish(exchange, key, body, pika.BasicProperties(**props))
elif cmd == "consume":
    exchange, key, count = args[0], args[1], int(args[2])
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, key)
    print(json.dumps({"ready": True}), flush=True)
    seen = 0
    for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=30):
        if method is None:
            sys.exit("no message within 30s")
        print(describe(method, props, body), flush=True)
        seen += 1
        if seen == count:
            break
elif cmd == "get":
    method, props, body = channel.basic_get(args[0], auto_ack=True)
    print(describe(method, props, body) if method else json.dumps(None), flush=True)
elif cmd == "delete_exchange":
    channel.exchange_delete(args[0])
elif cmd == "declare_queue":
    channel.queue_declare(args[0], durable=True)
elif cmd == "delete_queue":
    channel.queue_delete(args[0])
connection.close()
"#;

fn pika(args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command.arg("-c").arg(PIKA).args(args).kill_on_drop(true);
    command
}

async fn run(mut command: Command, what: &str) -> String {
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} finishes in time"))
        .unwrap_or_else(|e| panic!("{what} starts: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Publishes with pika, with publisher confirms; `properties` are pika `BasicProperties` fields.
pub async fn pika_publish(exchange: &str, key: &str, body: &str, properties: Value) {
    let props = properties.to_string();
    run(
        pika(&["publish", exchange, key, body, &props]),
        "pika publish",
    )
    .await;
}

/// Publishes raw bytes with pika, with publisher confirms; a header value `{"b64": "..."}` is
/// sent as those bytes.
pub async fn pika_publish_bytes(exchange: &str, key: &str, body: &[u8], properties: Value) {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(body);
    let props = properties.to_string();
    run(
        pika(&["publish_bytes", exchange, key, &body, &props]),
        "pika publish",
    )
    .await;
}

/// Fetches one message from a queue with pika (`Value::Null` when it is empty).
pub async fn pika_get(queue: &str) -> Value {
    let out = run(pika(&["get", queue]), "pika get").await;
    serde_json::from_str(out.trim()).expect("JSON from pika")
}

pub async fn delete_exchange(name: &str) {
    run(pika(&["delete_exchange", name]), "pika exchange_delete").await;
}

pub async fn delete_queue(name: &str) {
    run(pika(&["delete_queue", name]), "pika queue_delete").await;
}

/// A pika consumer with its own exclusive queue bound to `exchange` with `key`.
pub struct PikaConsumer {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl PikaConsumer {
    /// Starts consuming; returns once the binding exists.
    pub async fn start(exchange: &str, key: &str, count: usize) -> PikaConsumer {
        Self::start_at(URL, exchange, key, count).await
    }

    /// [`PikaConsumer::start`] on the broker at `url`.
    pub async fn start_at(url: &str, exchange: &str, key: &str, count: usize) -> PikaConsumer {
        let count = count.to_string();
        let mut command = pika(&["consume", exchange, key, &count]);
        command.env("PIKA_URL", url).stdout(Stdio::piped());
        let mut child = command.spawn().expect("python3 starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut consumer = PikaConsumer {
            _child: child,
            lines: BufReader::new(stdout).lines(),
        };
        assert_eq!(consumer.next().await["ready"], true);
        consumer
    }

    /// The next message the consumer printed.
    pub async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("pika consumer output in time")
            .expect("read pika output")
            .expect("pika consumer still running");
        serde_json::from_str(&line).expect("JSON from pika")
    }
}

/// Publishes with Debian's `amqp-publish` (another independent client).
pub async fn amqp_publish(exchange: &str, key: &str, body: &str, headers: &[(&str, &str)]) {
    let mut command = Command::new("amqp-publish");
    command.args(["--url", URL, "-e", exchange, "-r", key, "-b", body]);
    for (name, value) in headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    run(command, "amqp-publish").await;
}

async fn rabbitmqctl(args: &[&str]) -> String {
    let mut command = Command::new("rabbitmqctl");
    command.args(args).kill_on_drop(true);
    run(command, "rabbitmqctl").await
}

/// The pids of the connections whose client properties mention `marker`, from
/// `rabbitmqctl list_connections pid client_properties` output.
fn connection_pids(listing: &str, marker: &str) -> Vec<String> {
    listing
        .lines()
        .filter(|line| line.contains(marker))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect()
}

/// The routing keys of the queue bindings whose source is `exchange`.
pub async fn binding_keys(exchange: &str) -> Vec<String> {
    let out = rabbitmqctl(&[
        "-q",
        "list_bindings",
        "--no-table-headers",
        "source_name",
        "destination_kind",
        "routing_key",
    ])
    .await;
    let mut keys: Vec<String> = out
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (source, kind, key) = (fields.next()?, fields.next()?, fields.next()?);
            (source == exchange && kind == "queue").then(|| key.to_owned())
        })
        .collect();
    keys.sort();
    keys
}

/// Closes the broker connections whose client properties mention `marker`; returns how many.
pub async fn close_connections(marker: &str) -> usize {
    let out = rabbitmqctl(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .await;
    let pids = connection_pids(&out, marker);
    for pid in &pids {
        rabbitmqctl(&["-q", "close_connection", pid, "closed by the fault test"]).await;
    }
    pids.len()
}

/// Starts a gateway and waits until every backend is connected.
pub async fn start_connected(config: &str) -> wsbridge::Gateway {
    let gw = start(config).await;
    eventually("the AMQP backend connects", async || gw.hub().is_ready()).await;
    gw
}

/// The RabbitMQ distribution's own scripts: run as root they keep root's Erlang cookie (the
/// `/usr/sbin` wrappers switch to the service's user, who could not write a test's directory).
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A RabbitMQ node of its own (own name, ports and data directory), started by a test so it can
/// be killed, frozen and restarted; killed when dropped.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: std::path::PathBuf,
    dist_port: u16,
    server: Option<Child>,
}

impl PrivateRabbit {
    pub async fn start() -> PrivateRabbit {
        let node = format!("{}@localhost", crate::common::unique("wsbtest"));
        let dir = std::env::temp_dir().join(crate::common::unique("wsbridge-rabbit-"));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        // No plugins: the machine's node already holds the management ports.
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let mut rabbit = PrivateRabbit {
            port: free_port(),
            node,
            dir,
            dist_port: free_port(),
            server: None,
        };
        rabbit.run().await;
        rabbit
    }

    /// Where the gateway connects: heartbeats every 2 s, so a hung node is noticed quickly.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2", self.port)
    }

    /// Where independent clients connect.
    pub fn client_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn port_open(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Starts (or restarts) the node and waits until it accepts AMQP connections.
    pub async fn run(&mut self) {
        assert!(self.server.is_none(), "the node is already running");
        let dir = &self.dir;
        let log = std::fs::File::create(dir.join("server.out")).expect("create the server log");
        let server = Command::new(format!("{RABBIT_BIN}/rabbitmq-server"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("none"))
            .current_dir(dir)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("rabbitmq-server starts");
        self.server = Some(server);
        // A node boots in seconds on an idle machine; allow for a busy one.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
        while !self.port_open() {
            let exited = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && tokio::time::Instant::now() < deadline,
                "the private RabbitMQ node did not start ({exited:?}):\n{}",
                std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The Erlang VM's pid (the server script's child).
    fn vm_pid(&self) -> u32 {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("the node wrote its pid");
        pid.trim().parse().expect("a pid")
    }

    async fn signal(&self, name: &str) {
        crate::common::signal(self.vm_pid(), name).await;
    }

    /// Kills the node at once (SIGKILL), as a crash would, and waits until it is gone.
    pub async fn kill(&mut self) {
        self.signal("KILL").await;
        let mut server = self.server.take().expect("the node is running");
        tokio::time::timeout(WAIT, server.wait())
            .await
            .expect("the server script ends with its VM")
            .expect("wait for the server script");
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the node: its connections stay open, but it answers
    /// nothing meanwhile.
    pub async fn freeze(&self, frozen: bool) {
        self.signal(if frozen { "STOP" } else { "CONT" }).await;
    }

    /// Closes the connections whose client properties mention `marker`; returns how many.
    pub async fn close_connections(&self, marker: &str) -> usize {
        let ctl = |args: &[&str]| {
            let mut command = Command::new(format!("{RABBIT_BIN}/rabbitmqctl"));
            command
                .arg("-n")
                .arg(&self.node)
                .args(args)
                .kill_on_drop(true);
            command
        };
        let out = run(
            ctl(&[
                "-q",
                "list_connections",
                "--no-table-headers",
                "pid",
                "client_properties",
            ]),
            "rabbitmqctl list_connections",
        )
        .await;
        let pids = connection_pids(&out, marker);
        for pid in &pids {
            run(
                ctl(&["-q", "close_connection", pid, "closed by the fault test"]),
                "rabbitmqctl close_connection",
            )
            .await;
        }
        pids.len()
    }

    /// Publishes with pika on this node, with publisher confirms.
    pub async fn pika_publish(&self, exchange: &str, key: &str, body: &str) {
        let mut command = pika(&["publish", exchange, key, body, "{}"]);
        command.env("PIKA_URL", self.client_url());
        run(command, "pika publish").await;
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if self.server.is_some()
            && let Ok(pid) = std::fs::read_to_string(self.dir.join("pid"))
        {
            // SIGKILL also ends a frozen VM.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid.trim()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
