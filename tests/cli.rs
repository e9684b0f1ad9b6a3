//! The `wsbridge` binary: run, SIGTERM, check-config and print-config.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::Client;
use serde_json::json;

fn wsbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wsbridge"))
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(common::unique(name));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn print_config_prints_a_valid_commented_default() {
    let out = wsbridge().arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# "), "commented");
    let path = write_temp("default.toml", &text);
    let check = wsbridge().arg("check-config").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn check_config_lists_every_problem_with_its_key() {
    let path = write_temp(
        "bad.toml",
        r##"
[server]
listen = "localhost"
[backends.local]
type = "memory"
[[routes]]
channel = "a/#"
backend = "local"
topic = "a/#"
allow = ["subscribe"]
[[routes]]
channel = "b/#"
backend = "local"
topic = "b/#"
allow = ["subscribe"]
[[routes]]
channel = "c/{site}"
backend = "plnat"
topic = "c/{site}"
allow = ["publish"]
[[routes]]
channel = "d/#/x"
backend = "local"
topic = "d"
allow = ["publish"]
surprise = true
"##,
    );
    let out = wsbridge().arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    for expected in [
        "server.listen: invalid socket address syntax (got \"localhost\")",
        "routes[2].backend: unknown backend \"plnat\"",
        "routes[3].channel: '#' must be the last level",
        "routes[3].surprise: unknown key",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits() {
    let mut child = wsbridge()
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("WSBRIDGE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("the gateway logs its address").unwrap();
        if let Some(rest) = line.split("local_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(addr).await;
        client.subscribe("news").await;
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        assert_eq!(client.next_of("status").await["code"], "shutting_down");
        let (code, reason) = client.expect_close().await;
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
        let _ = json!({});
    });
    let deadline = std::time::Instant::now() + common::WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the gateway exits");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn every_example_configuration_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let examples = std::fs::read_dir(dir.join("config"))
        .unwrap()
        .chain(std::fs::read_dir(dir.join("config/bench")).unwrap());
    for entry in examples {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let out = wsbridge()
            .arg("check-config")
            .arg(&path)
            .current_dir(dir)
            .env(
                "WSBRIDGE_JWT_SECRET",
                "example-secret-for-the-check-0123456789",
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 12, "checked {checked} examples");
}

#[test]
fn json_logs_name_the_connection_on_each_connection_event() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    const SECRET: &str = "cli-json-logs-secret-long-enough-0123";
    let config = write_temp(
        "json-logs.toml",
        &format!(
            r##"
[auth]
mode = "jwt"
secret = "{SECRET}"

[backends.local]
type = "memory"

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]
"##
        ),
    );
    let mut child = wsbridge()
        .args(["run", "--listen", "127.0.0.1:0", "--log-json", "--config"])
        .arg(&config)
        .env("WSBRIDGE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let parse = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("a JSON log line ({e}): {line}"))
    };
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("the gateway logs its address").unwrap();
        if let Some(addr) = parse(&line)["fields"]["local_addr"].as_str() {
            break addr.parse().unwrap();
        }
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client_addr = runtime.block_on(async {
        let bearer = format!("Bearer {token}");
        let mut client = Client::try_connect(addr, |r| {
            r.headers_mut()
                .insert("Authorization", bearer.parse().unwrap());
        })
        .await
        .expect("connects with the token");
        client.subscribe("news").await;
        let tokio_tungstenite::MaybeTlsStream::Plain(socket) = client.ws.get_ref() else {
            panic!("a plain connection");
        };
        let client_addr = socket.local_addr().unwrap();
        client.ws.close(None).await.unwrap();
        while futures_util::StreamExt::next(&mut client.ws)
            .await
            .is_some()
        {}
        let refused = Client::try_connect(addr, |r| {
            r.headers_mut()
                .insert("Authorization", "Bearer nope".parse().unwrap());
        })
        .await;
        assert_eq!(refused.err().map(|e| e.0), Some(401));
        // An SSE stream, opened and dropped.
        let url = format!("http://{addr}/sse?channel=news&access_token={token}");
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        drop(response);
        client_addr
    });

    // Read until the session's close and the refusal are logged.
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + common::WAIT;
    let seen = |events: &[serde_json::Value], message: &str| {
        events.iter().any(|e| e["fields"]["message"] == message)
    };
    let sse_closed = |events: &[serde_json::Value]| {
        events
            .iter()
            .any(|e| e["fields"]["message"] == "closed" && e["span"]["edge"] == "sse")
    };
    while !(seen(&events, "closed")
        && seen(&events, "refused: authentication failed")
        && sse_closed(&events))
    {
        assert!(std::time::Instant::now() < deadline, "{events:#?}");
        let line = lines.next().expect("more log lines").unwrap();
        events.push(parse(&line));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let _ = child.wait();

    for edge in ["ws", "sse"] {
        for message in ["connected", "closed"] {
            let event = events
                .iter()
                .find(|e| e["fields"]["message"] == message && e["span"]["edge"] == edge)
                .unwrap_or_else(|| panic!("a {message:?} event of {edge} in {events:#?}"));
            let span = &event["span"];
            assert_eq!(span["name"], "connection", "{event}");
            assert!(span["id"].is_u64(), "{event}");
            assert_eq!(span["subject"], "alice", "{event}");
            let peer: std::net::SocketAddr = span["peer"].as_str().unwrap().parse().unwrap();
            assert_eq!(peer.ip(), client_addr.ip(), "{event}");
            if edge == "ws" {
                assert_eq!(peer, client_addr, "{event}");
            }
        }
    }
    let refused = events
        .iter()
        .find(|e| e["fields"]["message"] == "refused: authentication failed")
        .unwrap();
    assert!(
        refused["fields"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "a refusal names the client address: {refused}"
    );
}
