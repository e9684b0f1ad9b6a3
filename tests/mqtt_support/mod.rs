//! Mosquitto for the MQTT backend's tests: private brokers started by a test, and Debian's
//! `mosquitto_pub` / `mosquitto_sub` as independent MQTT clients.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::{WAIT, eventually, signal};

/// The machine's broker, started by `scripts/setup/20-mosquitto.sh`.
pub const SHARED_PORT: u16 = 1883;

fn mosquitto_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|path| path.is_file())
        .expect("the mosquitto binary is installed (scripts/setup/20-mosquitto.sh)")
}

/// A Mosquitto started by a test on a free port, killed when dropped.
pub struct PrivateBroker {
    pub port: u16,
    dir: tempdir::TempDir,
    child: Option<Child>,
    /// Extra `mosquitto_pub` arguments needed to reach it (TLS files).
    client_args: Vec<String>,
}

/// A directory removed on drop (std has none, and one small type beats a dependency).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> TempDir {
            let path = std::env::temp_dir().join(crate::common::unique(prefix));
            std::fs::create_dir_all(&path).expect("create a temporary directory");
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PrivateBroker {
    /// Starts a broker publishing `$SYS` topics every second; `extra` is appended to its config.
    pub async fn start(extra: &str) -> PrivateBroker {
        let mut broker = Self::configure(extra);
        broker.run().await;
        broker
    }

    /// Prepares a broker without starting it (`run` starts it).
    pub fn configure(extra: &str) -> PrivateBroker {
        let dir = tempdir::TempDir::new("wsbridge-mosquitto-");
        let port = free_port();
        // `user root`: started as root, Mosquitto would otherwise switch to user `mosquitto`,
        // which cannot read this directory, and exit.
        let config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nsys_interval 1\nuser root\nlog_dest file {}\n{extra}\n",
            dir.path().join("mosquitto.log").display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config).expect("write mosquitto.conf");
        PrivateBroker {
            port,
            dir,
            child: None,
            client_args: Vec::new(),
        }
    }

    /// Sets the `mosquitto_pub` arguments its readiness probe needs (e.g. TLS files).
    pub fn client_args(&mut self, args: &[&str]) {
        self.client_args = args.iter().map(|a| a.to_string()).collect();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the process and waits until it answers MQTT.
    pub async fn run(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let port = self.port;
        let mut attempts = 0;
        loop {
            let child = Command::new(mosquitto_binary())
                .arg("-c")
                .arg(self.dir.path().join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("mosquitto starts");
            self.child = Some(child);
            let deadline = tokio::time::Instant::now() + WAIT;
            while tokio::time::Instant::now() < deadline {
                if answers(port, &self.client_args).await {
                    return;
                }
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .is_some();
                if exited {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.child = None;
            attempts += 1;
            // The port may still be held by the previous process for a moment.
            assert!(
                attempts < 20,
                "private mosquitto on port {port} did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process (SIGTERM, as a service manager would) and waits for it to exit.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the broker is running");
        if let Some(pid) = child.id() {
            signal(pid, "TERM").await;
        }
        tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("mosquitto exits on SIGTERM")
            .expect("wait for mosquitto");
    }

    /// Kills the process at once, as a crash would.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the broker is running");
        child.kill().await.expect("kill mosquitto");
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the process: its connections stay open, but it
    /// answers nothing meanwhile.
    pub async fn freeze(&self, frozen: bool) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("the broker is running");
        signal(pid, if frozen { "STOP" } else { "CONT" }).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // A frozen process ignores SIGTERM but not SIGKILL.
            let _ = child.start_kill();
        }
    }
}

/// Whether a broker answers an MQTT publish on `port`.
pub async fn answers(port: u16, client_args: &[String]) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(client_args)
        .args(["-q", "1", "-t", "wsbridge/test/probe", "-n"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Runs `mosquitto_pub` against `port` with `args` and asserts it succeeded.
pub async fn mosquitto_pub(port: u16, args: &[&str]) {
    let output = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("mosquitto_pub runs (scripts/setup/20-mosquitto.sh installs it)");
    assert!(
        output.status.success(),
        "mosquitto_pub {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Publishes `bytes` exactly (from a file, so any byte goes) with QoS 1 and the extra `args`.
pub async fn mosquitto_pub_bytes(port: u16, topic: &str, bytes: &[u8], args: &[&str]) {
    let dir = tempdir::TempDir::new("wsbridge-payload-");
    let file = dir.path().join("payload");
    std::fs::write(&file, bytes).expect("write the payload file");
    let file = file.display().to_string();
    let mut all = vec!["-q", "1", "-t", topic];
    if bytes.is_empty() {
        all.push("-n");
    } else {
        all.extend(["-f", file.as_str()]);
    }
    all.extend_from_slice(args);
    mosquitto_pub(port, &all).await;
}

/// Publishes each line of `lines` as one message, in order (`mosquitto_pub -l`).
pub async fn mosquitto_pub_lines(port: u16, args: &[&str], lines: &str) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-l"])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub runs");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(lines.as_bytes())
        .await
        .expect("write lines");
    drop(stdin);
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("mosquitto_pub -l finishes")
        .expect("mosquitto_pub output");
    assert!(
        output.status.success(),
        "mosquitto_pub -l failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A message as `mosquitto_sub` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub qos: u8,
    pub retained: bool,
    pub topic: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    /// `key:value` pairs, space-separated, as `%P` prints them.
    pub user_properties: String,
}

/// A running `mosquitto_sub` (MQTT 5, QoS 2), parsed line by line.
pub struct MosquittoSub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

const MARK: &str = "MSG|";

impl MosquittoSub {
    /// Subscribes to `filter` and returns once the broker has acknowledged the subscription.
    pub async fn start(port: u16, filter: &str) -> MosquittoSub {
        // stdio buffers a pipe fully; line buffering shows each line as it happens.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-V", "mqttv5", "-q", "2", "-d", "-t", filter])
            .args(["-F", &format!("{MARK}%q|%r|%t|%x|%C|%P")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub runs (scripts/setup/20-mosquitto.sh installs it)");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut sub = MosquittoSub {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        // With -d it reports the SUBACK; messages published after it are ours.
        loop {
            let line = sub.next_line().await;
            if line.starts_with("Subscribed (mid") {
                return sub;
            }
        }
    }

    async fn next_line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("mosquitto_sub prints in time")
            .expect("read mosquitto_sub output")
            .expect("mosquitto_sub is still running")
    }

    /// The next message received.
    pub async fn next(&mut self) -> Received {
        loop {
            let line = self.next_line().await;
            let Some(fields) = line.strip_prefix(MARK) else {
                continue;
            };
            let f: Vec<&str> = fields.splitn(6, '|').collect();
            assert_eq!(f.len(), 6, "unexpected mosquitto_sub line {line:?}");
            return Received {
                qos: f[0].parse().expect("QoS"),
                retained: f[1] == "1",
                topic: f[2].to_owned(),
                payload: hex(f[3]),
                content_type: f[4].to_owned(),
                user_properties: f[5].to_owned(),
            };
        }
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex payload"))
        .collect()
}

/// Follows a `$SYS` topic (published every `sys_interval`) until it shows `expected`; returns
/// every value seen.
pub async fn sys_values_until(port: u16, topic: &str, expected: &str) -> Vec<String> {
    let mut child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let line = tokio::time::timeout_at(deadline, lines.next_line()).await;
        match line {
            Ok(Ok(Some(value))) => {
                let done = value == expected;
                seen.push(value);
                if done {
                    return seen;
                }
            }
            _ => break,
        }
    }
    panic!("{topic} never showed {expected}; saw {seen:?}");
}

/// A private CA with a server certificate for 127.0.0.1 and a client certificate, made with the
/// `openssl` command line tool, plus an unrelated CA.
pub struct TestPki {
    dir: tempdir::TempDir,
}

impl TestPki {
    pub async fn generate() -> TestPki {
        let pki = TestPki {
            dir: tempdir::TempDir::new("wsbridge-pki-"),
        };
        for ca in ["ca", "other-ca"] {
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let subject = format!("/CN=wsbridge test {ca}");
            pki.openssl(&[
                "req", "-x509", "-days", "2", "-subj", &subject, "-keyout", &key, "-out", &pem,
            ])
            .await;
        }
        for (name, extension) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let ext = format!("{name}.ext");
            std::fs::write(pki.path(&ext), extension).expect("write extension file");
            let subject = format!("/CN=wsbridge test {name}");
            pki.openssl(&["req", "-subj", &subject, "-keyout", &key, "-out", &csr])
                .await;
            pki.openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ])
            .await;
        }
        pki
    }

    async fn openssl(&self, args: &[&str]) {
        let mut command = Command::new("openssl");
        command.current_dir(self.dir.path()).args(args);
        if args[0] == "req" {
            // New P-256 keys, unencrypted: quick to make, and what a broker setup would use.
            command.args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ]);
        }
        let output = command
            .output()
            .await
            .expect("openssl runs (scripts/setup/20-mosquitto.sh installs it)");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The path of one of its files: ca.pem, other-ca.pem, server.pem/.key, client.pem/.key.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// Waits until the gateway reports every backend connected.
pub async fn ready(gw: &wsbridge::Gateway) {
    eventually("the MQTT backend is connected", async || {
        gw.hub().is_ready()
    })
    .await;
}

/// A TCP relay to a local port that a test can cut: the gateway connects through it, and
/// [`TcpRelay::cut`] drops every relayed connection at once and refuses new ones until
/// [`TcpRelay::restore`], while the broker itself stays up for other clients.
pub struct TcpRelay {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    pub async fn start(target: u16) -> TcpRelay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let open = open.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(relay.abort_handle());
                }
            }
        });
        TcpRelay {
            port,
            open,
            connections,
            accept,
        }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
