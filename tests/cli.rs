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
