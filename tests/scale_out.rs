//! Two gateway processes behind Debian's nginx (a private instance on free ports), with MQTT
//! (Mosquitto on 1883), AMQP (RabbitMQ on 5672) and Kafka (on 9092) routes, as a team would run
//! them: clients land on both instances; a client on one receives what a client on the other
//! publishes, on every route, and a Server-Sent Events stream gets its events through nginx at
//! once; the per-IP cap counts the address nginx forwards; SIGTERM to one instance moves its
//! clients to the other, and a Kafka reader resumes from its last position with nothing lost or
//! duplicated. `scripts/setup/` installs and starts all of it. The test prints how long each phase
//! took.

mod common;
mod kafka_support;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{WAIT, unique};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const ADMIN_TOKEN: &str = "scale-out-admin-token-0123";
/// Connections per client address on each instance.
const PER_IP: usize = 4;
/// Kafka messages published while an instance drains.
const DRAIN_MESSAGES: u64 = 60;

/// Every process the test starts; killed when the test ends, passed or not.
struct Processes {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Processes {
    fn spawn(&mut self, name: &str, command: &mut Command) -> u32 {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = command
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        pid
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until `name` exits; its exit status.
    async fn wait_exit(&mut self, name: &str, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let (_, child) = self
                .children
                .iter_mut()
                .find(|(n, _)| n == name)
                .expect("a started process");
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            if child.try_wait().ok().flatten().is_some() {
                continue;
            }
            // nginx's workers outlive a killed master: ask the master to stop them (SIGTERM),
            // and kill it only if it does not exit in time.
            if name == "nginx" {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
            eprintln!("stopped {name}");
        }
        if std::thread::panicking() {
            eprintln!("logs of the failed run are in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is installed (scripts/setup/70-nginx.sh)")
}

/// A gateway instance: MQTT, AMQP and Kafka routes, trusting nginx on 127.0.0.1.
fn gateway_config(mqtt_prefix: &str, exchange: &str, kafka_topic: &str) -> String {
    format!(
        r##"
[server]
listen = "127.0.0.1:0"
trusted_proxies = ["127.0.0.1/32"]
ping_interval = "2s"
idle_timeout = "10s"
drain_window = "1s"
shutdown_grace = "3s"
console = false

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[limits]
max_connections_per_ip = {PER_IP}
new_connections_per_second_per_ip = 1000
publish_per_second = 0
publish_bytes_per_second = 0

[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"

[backends.rabbit]
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[[backends.rabbit.exchanges]]
name = "{exchange}"
type = "topic"
durable = false

[backends.events]
type = "kafka"
brokers = "{kafka}"

[[routes]]
channel = "telemetry/{{site}}/#"
backend = "plant"
topic = "{mqtt_prefix}/{{site}}/#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "orders/{{region}}/#"
backend = "rabbit"
exchange = "{exchange}"
topic = "orders.{{region}}.#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "events/stream"
backend = "events"
topic = "{kafka_topic}"
allow = ["subscribe", "publish"]
"##,
        kafka = kafka_support::brokers(),
    )
}

/// nginx in front of both instances, as docs/DEPLOYMENT.md shows it.
fn nginx_config(dir: &Path, port: u16, upstreams: &[SocketAddr]) -> String {
    let d = dir.display();
    let servers: String = upstreams
        .iter()
        .map(|a| format!("    server {a} max_fails=1 fail_timeout=30s;\n"))
        .collect();
    format!(
        r#"
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 512; }}
http {{
  access_log {d}/nginx-access.log;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  map $http_upgrade $connection_upgrade {{
    default upgrade;
    ''      close;
  }}
  upstream wsbridge {{
{servers}  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://wsbridge;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      # Longer than server.ping_interval (2s), or nginx would cut quiet sockets.
      proxy_read_timeout 60s;
      proxy_send_timeout 60s;
      proxy_buffering off;
    }}
  }}
}}
"#
    )
}

/// A WebSocket client that keeps frames it was not waiting for, and reports a close instead of
/// failing on it.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Value>,
    next_id: u64,
    /// The address this client tells nginx it comes from (see `connect`).
    forwarded_for: String,
}

/// What a client read: a frame, or the close that ended the connection.
enum Read {
    Frame(Value),
    Closed(u16),
}

/// Connects through nginx. The client sends its own `X-Forwarded-For`; nginx appends the address
/// it sees (`$proxy_add_x_forwarded_for`). Every client here is 127.0.0.1, which is also the
/// trusted proxy, so the gateway skips it and takes the address the client wrote, standing in for
/// what an outer hop (a CDN, a corporate proxy) would have written. In production the client's
/// own address is not a trusted proxy and is the one taken; this nginx configuration is the one
/// docs/DEPLOYMENT.md recommends, nothing in it exists only for the test.
async fn try_connect(nginx: SocketAddr, forwarded_for: &str) -> Result<Client, (u16, String)> {
    let mut request = format!("ws://{nginx}/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "x-forwarded-for",
        HeaderValue::from_str(forwarded_for).unwrap(),
    );
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(WAIT, connect)
        .await
        .expect("the upgrade through nginx ends in time")
    {
        Ok((ws, _)) => Ok(Client {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            forwarded_for: forwarded_for.to_owned(),
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => Err((0, e.to_string())),
    }
}

async fn connect(nginx: SocketAddr, forwarded_for: &str) -> Client {
    try_connect(nginx, forwarded_for)
        .await
        .unwrap_or_else(|e| panic!("connect through nginx as {forwarded_for}: {e:?}"))
}

impl Client {
    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    async fn read(&mut self) -> Read {
        if let Some(frame) = self.pending.pop_front() {
            return Read::Frame(frame);
        }
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame arrives in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Read::Frame(serde_json::from_str(&text).expect("JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Read::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{}: connection failed: {e}", self.forwarded_for),
                None => return Read::Closed(1006),
            }
        }
    }

    async fn frame(&mut self) -> Value {
        match self.read().await {
            Read::Frame(frame) => frame,
            Read::Closed(code) => panic!("{}: unexpected close {code}", self.forwarded_for),
        }
    }

    /// Sends a request and waits for its answer, keeping other frames for later.
    async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.send(frame).await;
        let mut others = Vec::new();
        let answer = loop {
            let frame = match self.ws.next().await {
                Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap(),
                Some(Ok(Message::Close(f))) => panic!("{}: closed: {f:?}", self.forwarded_for),
                Some(Ok(_)) => continue,
                other => panic!("{}: {other:?}", self.forwarded_for),
            };
            if frame["id"] == json!(id) {
                break frame;
            }
            others.push(frame);
        };
        self.pending.extend(others);
        answer
    }

    async fn subscribe(&mut self, channel: &str, from: Option<Value>) {
        let mut frame = json!({"type": "subscribe", "channel": channel});
        if let Some(from) = from {
            frame["from"] = from;
        }
        let answer = self.request(frame).await;
        assert_eq!(answer["type"], "ok", "subscribe {channel}: {answer}");
    }

    async fn publish(&mut self, channel: &str, payload: Value) {
        let answer = self
            .request(json!({"type": "publish", "channel": channel, "payload": payload}))
            .await;
        assert_eq!(answer["type"], "ok", "publish {channel}: {answer}");
    }

    async fn message(&mut self) -> Value {
        loop {
            let frame = self.frame().await;
            if frame["type"] == "message" {
                return frame;
            }
        }
    }
}

/// An instance's admin API: the `remote_address` of each open connection.
async fn remote_addresses(admin: SocketAddr) -> Vec<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{admin}/admin/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    body["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["remote_address"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A gateway's `name=value` log field (the listener and admin addresses at start).
fn log_field(log: &str, field: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let rest = line.split(&format!("{field}=")).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

struct Instance {
    name: String,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn start_instance(processes: &mut Processes, name: &str, config: &Path) -> Instance {
    let pid = processes.spawn(
        name,
        Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("WSBRIDGE_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    let deadline = Instant::now() + WAIT;
    let (addr, admin) = loop {
        let log = processes.log(name);
        if let (Some(addr), Some(admin)) = (log_field(&log, "local_addr"), log_field(&log, "admin"))
        {
            break (addr, admin);
        }
        assert!(Instant::now() < deadline, "{name} did not start:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Ready means every broker connection is up.
    let ready = async {
        loop {
            let answer = reqwest::get(format!("http://{addr}/readyz")).await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{name} not ready (are the brokers running? scripts/setup/):\n{}",
                processes.log(name)
            )
        });
    Instance {
        name: name.to_owned(),
        pid,
        addr,
        admin,
    }
}

/// Which instance lists the client with this forwarded address.
async fn instance_of<'a>(client: &Client, instances: &'a [Instance]) -> &'a Instance {
    let wanted = format!("{}:0", client.forwarded_for);
    for instance in instances {
        if remote_addresses(instance.admin).await.contains(&wanted) {
            return instance;
        }
    }
    panic!("no instance lists {wanted}");
}

/// What the Kafka reader saw: how often each streamed message arrived, and the next offset per
/// partition (the position to resume from).
#[derive(Default)]
struct KafkaProgress {
    seen: BTreeMap<u64, u32>,
    next_offsets: BTreeMap<String, i64>,
    markers: BTreeSet<i64>,
}

impl KafkaProgress {
    fn record(&mut self, frame: &Value) {
        if frame["type"] != "message" {
            return;
        }
        let partition = frame["position"]["partition"].as_i64().expect("a position");
        let offset = frame["position"]["offset"].as_i64().expect("an offset");
        self.next_offsets.insert(partition.to_string(), offset + 1);
        if let Some(seq) = frame["payload"]["drain"].as_u64() {
            *self.seen.entry(seq).or_default() += 1;
        }
        if frame["payload"]["marker"] == "end" {
            self.markers.insert(partition);
        }
    }
}

/// Subscribers `0..3` (one per route) receive what `publishers[3]` publishes.
async fn across(
    routes: &[(&str, &str, &str)],
    subscribers: &mut [Client],
    publishers: &mut [Client],
) {
    for (i, (_, pattern, _)) in routes.iter().enumerate() {
        subscribers[i].subscribe(pattern, None).await;
    }
    let from = publishers[3].forwarded_for.clone();
    for (i, (backend, _, channel)) in routes.iter().enumerate() {
        let payload = json!({"backend": backend, "from": from});
        publishers[3].publish(channel, payload.clone()).await;
        let got = subscribers[i].message().await;
        assert_eq!(got["channel"], *channel);
        assert_eq!(got["payload"], payload, "{backend} across instances");
    }
}

struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn phase(&mut self, name: &'static str, started: Instant) {
        let took = started.elapsed();
        println!(
            "scale-out phase {name:<40} {:>8.0} ms",
            took.as_secs_f64() * 1000.0
        );
        self.0.push((name, took));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_nginx() {
    let all = Instant::now();
    let mut timings = Timings(Vec::new());
    let dir = std::env::temp_dir().join(unique("wsbridge-scale-out-"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut processes = Processes {
        children: Vec::new(),
        dir: dir.clone(),
    };

    // Phase 1: two gateways and nginx.
    let started = Instant::now();
    let mqtt_prefix = unique("scale");
    let exchange = unique("wsb.scale.");
    let kafka_topic = unique("wsb-scale-");
    kafka_support::create_topic(&kafka_topic, 2).await;
    let config = dir.join("wsbridge.toml");
    std::fs::write(
        &config,
        gateway_config(&mqtt_prefix, &exchange, &kafka_topic),
    )
    .unwrap();
    let a = start_instance(&mut processes, "gateway-a", &config).await;
    let b = start_instance(&mut processes, "gateway-b", &config).await;
    let nginx_port = free_port();
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        nginx_config(&dir, nginx_port, &[a.addr, b.addr]),
    )
    .unwrap();
    processes.spawn(
        "nginx",
        Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&nginx_conf)
            .arg("-e")
            .arg(dir.join("nginx-error.log")),
    );
    let nginx: SocketAddr = ([127, 0, 0, 1], nginx_port).into();
    let through_nginx = async {
        loop {
            let answer = reqwest::get(format!("http://{nginx}/healthz")).await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, through_nginx)
        .await
        .unwrap_or_else(|_| panic!("nginx does not answer:\n{}", processes.log("nginx")));
    timings.phase("start 2 gateways + nginx", started);
    let instances = [a, b];

    // Phase 2: clients land on both instances, each under its own forwarded address.
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 1..=8 {
        clients.push(connect(nginx, &format!("198.51.100.{i}")).await);
    }
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for client in clients {
        if instance_of(&client, &instances).await.name == "gateway-a" {
            on_a.push(client);
        } else {
            on_b.push(client);
        }
    }
    println!(
        "clients per instance: gateway-a {}, gateway-b {}",
        on_a.len(),
        on_b.len()
    );
    assert!(
        on_a.len() >= 4 && on_b.len() >= 4,
        "nginx spreads 8 clients over both instances: {} and {}",
        on_a.len(),
        on_b.len()
    );
    timings.phase("8 clients land on both instances", started);

    // Phase 3: across instances, on each route, both ways.
    let started = Instant::now();
    let routes = [
        ("mqtt", "telemetry/berlin/#", "telemetry/berlin/line1"),
        ("amqp", "orders/eu/#", "orders/eu/42"),
        ("kafka", "events/stream", "events/stream"),
    ];
    // On each instance: one subscriber per route (index 0..3) and a publisher (index 3).
    across(&routes, &mut on_a, &mut on_b).await;
    across(&routes, &mut on_b, &mut on_a).await;
    // Server-Sent Events through nginx (`proxy_buffering off`): the event arrives at once.
    let mut sse = reqwest::Client::new()
        .get(format!("http://{nginx}/sse?channel=telemetry/berlin/%23"))
        .header("x-forwarded-for", "198.51.100.20")
        .send()
        .await
        .expect("an SSE stream through nginx");
    assert_eq!(sse.status(), 200);
    on_b[3]
        .publish("telemetry/berlin/sse", json!({"via": "sse"}))
        .await;
    let mut events = String::new();
    tokio::time::timeout(WAIT, async {
        while !events.contains(r#""payload":{"via":"sse"}"#) {
            let chunk = sse.chunk().await.expect("the stream").expect("still open");
            events.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SSE event through nginx; got {events:?}"));
    assert!(events.contains("event: message"), "{events}");
    drop(sse);
    timings.phase("cross-instance delivery on 3 routes x 2, SSE", started);

    // Phase 4: the per-IP cap counts the forwarded address, on each instance.
    let started = Instant::now();
    let mut same_address = Vec::new();
    let mut refusals = 0;
    for _ in 0..(2 * PER_IP + 4) {
        match try_connect(nginx, "203.0.113.50").await {
            Ok(client) => same_address.push(client),
            Err((429, body)) => {
                assert!(
                    body.contains("too many connections from your address"),
                    "{body}"
                );
                refusals += 1;
            }
            Err(other) => panic!("expected 429, got {other:?}"),
        }
    }
    assert_eq!(same_address.len(), 2 * PER_IP, "{PER_IP} per instance");
    assert_eq!(refusals, 4);
    for instance in &instances {
        let listed = remote_addresses(instance.admin).await;
        let count = listed.iter().filter(|a| *a == "203.0.113.50:0").count();
        assert_eq!(count, PER_IP, "{}: {listed:?}", instance.name);
    }
    // Another address is not affected.
    let other = connect(nginx, "203.0.113.51").await;
    drop((same_address, other));
    timings.phase("per-IP cap on the forwarded address", started);

    // Phase 5: SIGTERM to gateway-a while gateway-b's publisher streams to Kafka.
    let started = Instant::now();
    let a = &instances[0];
    let mut publisher = on_b.pop().expect("a publisher on gateway-b");
    let streaming = tokio::spawn(async move {
        for seq in 0..DRAIN_MESSAGES {
            publisher
                .publish("events/stream", json!({"drain": seq}))
                .await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        publisher
    });
    // The Kafka reader on gateway-a keeps its last position per partition.
    let mut reader = on_a.remove(2);
    let mut progress = KafkaProgress::default();
    // Let the stream start before the drain, so it spans both instances' lifetimes.
    while progress.seen.len() < 5 {
        let frame = reader.frame().await;
        progress.record(&frame);
    }
    common::signal(a.pid, "TERM").await;
    let mut others_on_a = on_a;
    others_on_a.push(reader);
    let mut moved = Vec::new();
    let mut status_seen = 0;
    for (i, mut client) in others_on_a.into_iter().enumerate() {
        let is_reader = i == 3;
        let mut told = false;
        loop {
            match client.read().await {
                Read::Frame(frame) => {
                    if frame["type"] == "status" && frame["code"] == "shutting_down" {
                        assert!(frame["reconnect_after_ms"].as_u64().is_some(), "{frame}");
                        told = true;
                    }
                    if is_reader {
                        progress.record(&frame);
                    }
                }
                Read::Closed(code) => {
                    assert_eq!(code, 1001, "{} closed", client.forwarded_for);
                    break;
                }
            }
        }
        assert!(told, "{} got shutting_down", client.forwarded_for);
        status_seen += 1;
        // Reconnect through nginx: gateway-a no longer accepts, so it lands on gateway-b.
        let mut again = connect(nginx, &client.forwarded_for).await;
        if is_reader {
            let offsets = json!({ "offsets": progress.next_offsets.clone() });
            again.subscribe("events/stream", Some(offsets)).await;
        } else if i < 2 {
            again.subscribe(routes[i].1, None).await;
        }
        if is_reader {
            println!(
                "the Kafka reader had {} of {DRAIN_MESSAGES} messages when gateway-a closed it; resuming at {}",
                progress.seen.len(),
                json!(progress.next_offsets)
            );
        }
        moved.push((i, again));
    }
    assert_eq!(status_seen, 4);
    let status = processes
        .wait_exit("gateway-a", Duration::from_secs(10))
        .await;
    assert!(status.success(), "gateway-a exits cleanly: {status:?}");
    let instance_b = &instances[1];
    let listed = remote_addresses(instance_b.admin).await;
    for (_, client) in &moved {
        let address = format!("{}:0", client.forwarded_for);
        assert!(
            listed.contains(&address),
            "{address} on gateway-b: {listed:?}"
        );
    }
    timings.phase("drain gateway-a, clients move to gateway-b", started);

    // Phase 6: the Kafka reader resumed from its position: every message exactly once.
    let started = Instant::now();
    let (_, mut reader) = moved.pop().expect("the reader");
    while (progress.seen.len() as u64) < DRAIN_MESSAGES {
        let frame = reader.frame().await;
        progress.record(&frame);
    }
    let mut publisher = streaming.await.expect("the publisher task");
    // A duplicate would be a replay, which comes in partition order: once an end marker has
    // arrived on both partitions, nothing of the stream can still come.
    for _ in 0..50 {
        if progress.markers.len() == 2 {
            break;
        }
        publisher
            .publish("events/stream", json!({"marker": "end"}))
            .await;
        let frame = reader.message().await;
        progress.record(&frame);
    }
    assert_eq!(progress.markers.len(), 2, "end markers on both partitions");
    let expected: BTreeSet<u64> = (0..DRAIN_MESSAGES).collect();
    assert_eq!(
        progress.seen.keys().copied().collect::<BTreeSet<_>>(),
        expected
    );
    let duplicates: Vec<_> = progress.seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "duplicates: {duplicates:?}");
    // The moved MQTT and AMQP subscribers work on gateway-b.
    for (i, client) in moved.iter_mut().filter(|(i, _)| *i < 2) {
        let (backend, _, channel) = routes[*i];
        let payload = json!({"after_drain": backend});
        publisher.publish(channel, payload.clone()).await;
        let got = client.message().await;
        assert_eq!(got["payload"], payload, "{backend} after the move");
    }
    timings.phase("Kafka resume exactly once + moved subscribers", started);

    let total = all.elapsed();
    println!(
        "scale-out total {:.1} s; phases: {}",
        total.as_secs_f64(),
        timings
            .0
            .iter()
            .map(|(n, d)| format!("{n} {:.0} ms", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(processes);
}
