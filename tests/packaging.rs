//! The container packaging: docker-compose.yml (validated by `docker-compose config`, which needs
//! no engine; scripts/setup/50-compose.sh installs it) and the Dockerfile it builds. The compose
//! configuration itself is checked with the other examples in tests/cli.rs.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// docker-compose.yml as docker-compose resolves it, as JSON.
fn resolved_compose() -> Value {
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(root())
        .output()
        .expect("docker-compose runs (scripts/setup/50-compose.sh installs it)");
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML (a docker-compose dependency)");
    use std::io::Write;
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("write the resolved file");
    let json = python.wait_with_output().expect("python3 finishes");
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).expect("JSON")
}

#[test]
fn the_compose_file_runs_the_gateway_with_three_healthy_brokers() {
    let compose = resolved_compose();
    let services = compose["services"].as_object().expect("services");
    for broker in ["mosquitto", "rabbitmq", "kafka"] {
        let service = &services[broker];
        assert!(
            service["healthcheck"]["test"].is_array(),
            "{broker} has a healthcheck: {service}"
        );
        assert_eq!(
            services["wsbridge"]["depends_on"][broker]["condition"], "service_healthy",
            "the gateway waits for {broker}"
        );
    }
    assert_eq!(
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "broker,controller",
        "a single KRaft node"
    );
    let gateway = &services["wsbridge"];
    assert!(
        gateway["build"]["context"].is_string(),
        "the gateway is built from the repository: {gateway}"
    );

    // The gateway runs the config the image carries, which routes to all three brokers.
    let command: Vec<&str> = gateway["command"]
        .as_array()
        .expect("an exec-form command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = command
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = command[at + 1];
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY config/compose.toml ") && l.ends_with(config_path)),
        "the image holds config/compose.toml at {config_path}"
    );
    let config = std::fs::read_to_string(root().join("config/compose.toml")).expect("config");
    for host in ["mosquitto:1883", "rabbitmq:5672", "kafka:9092"] {
        assert!(config.contains(host), "config/compose.toml reaches {host}");
    }
}

#[test]
fn the_image_runs_as_a_non_root_user_and_checks_healthz() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "a multi-stage build");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        user.trim() != "root" && user.trim() != "0",
        "runs as {user}"
    );
    let healthcheck = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .expect("a HEALTHCHECK");
    assert!(healthcheck.contains("/healthz"), "{healthcheck}");
}

#[test]
fn the_image_build_has_every_folder_the_binary_embeds() {
    // build.rs names what the compiled binary reads from the source tree (the client protocol's
    // schema, the console page, the JavaScript client's build); the image's build stage must
    // copy each of them or `docker build` fails to compile.
    let build_rs = std::fs::read_to_string(root().join("build.rs")).expect("build.rs");
    let embedded: Vec<&str> = build_rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("println!(\"cargo:rerun-if-changed="))
        .filter_map(|l| l.strip_suffix("\");"))
        .collect();
    assert!(
        embedded.contains(&"console") && embedded.contains(&"clients/js/dist"),
        "build.rs watches the embedded folders: {embedded:?}"
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len().saturating_sub(1)].to_vec()
        })
        .collect();
    for path in embedded {
        assert!(
            copied
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/"))),
            "the Dockerfile's build stage copies {path}: {copied:?}"
        );
    }
}
