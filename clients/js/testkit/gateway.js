// Test support: a real wsbridge gateway as a child process, JWTs signed with node:crypto, Kafka
// topics made with kafka-python, and bounded waits. Kept outside test/ so that `node --test test/`
// does not run it as a test file of its own.
import { spawn, execFile } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** The gateway binary: WSBRIDGE_BIN, or the repository's debug build. */
export const GATEWAY_BIN = process.env.WSBRIDGE_BIN
  ? resolve(process.env.WSBRIDGE_BIN)
  : resolve(here, "../../../target/debug/wsbridge");

/** A unique name part, so that tests never share channels or topics. */
export function uid() {
  return randomUUID().slice(0, 8);
}

/** A free TCP port on 127.0.0.1 (bound, read and released). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** Waits until `check()` returns a truthy value (which it returns), polling; fails after `timeout` ms. */
export async function waitFor(check, { timeout = 5000, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Settles with the outcome of `promise`, or rejects after `timeout` ms. */
export function within(promise, timeout, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeout} ms waiting for ${what}`)), timeout);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

/** The next `event` of a client or subscription (optionally one that `filter` accepts), bounded. */
export function nextEvent(emitter, event, { timeout = 5000, filter = () => true } = {}) {
  let off;
  const got = new Promise((resolveEvent) => {
    off = emitter.on(event, (...args) => {
      if (filter(...args)) {
        off();
        resolveEvent(args[0]);
      }
    });
  });
  return within(got, timeout, `event ${event}`).finally(() => off());
}

function portOpen(port, host = "127.0.0.1") {
  return new Promise((resolveOpen) => {
    const socket = connect({ port, host });
    socket.once("connect", () => {
      socket.destroy();
      resolveOpen(true);
    });
    socket.once("error", () => resolveOpen(false));
  });
}

/**
 * A gateway process on 127.0.0.1:`port` (a free one by default) with `config`: the TOML after the
 * `[server]` table, plus `server`: extra lines of that table. `restart()` starts the same
 * configuration on the same port again after `kill()`.
 */
export class Gateway {
  constructor({ config, server = "", env = {}, port }) {
    this.config = config;
    this.server = server;
    this.env = env;
    this.port = port;
    this.dir = mkdtempSync(join(tmpdir(), "wsbridge-js-"));
    this.proc = null;
    this.log = "";
  }

  static async start(options) {
    const gateway = new Gateway(options);
    if (gateway.port === undefined) gateway.port = await freePort();
    await gateway.restart();
    return gateway;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  async restart() {
    const file = join(this.dir, "wsbridge.toml");
    writeFileSync(file, `[server]\nlisten = "127.0.0.1:${this.port}"\n${this.server}\n${this.config}\n`);
    const proc = spawn(GATEWAY_BIN, ["run", "--config", file], {
      env: { ...process.env, WSBRIDGE_LOG: process.env.WSBRIDGE_LOG ?? "warn", ...this.env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.proc = proc;
    const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
    this.exited = exited;
    proc.stderr.on("data", (chunk) => {
      this.log = (this.log + chunk.toString()).slice(-20000);
    });
    let early = null;
    exited.then((e) => (early = e));
    await waitFor(
      async () => {
        if (early) throw new Error(`gateway exited (${JSON.stringify(early)}) at start:\n${this.log}`);
        try {
          const res = await fetch(`${this.httpUrl}/healthz`);
          return res.ok;
        } catch {
          return false;
        }
      },
      { timeout: 15000, what: `the gateway on port ${this.port}` },
    );
  }

  /** Sends `signal` and waits until the process has exited and the port is free. */
  async kill(signal = "SIGKILL") {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill(signal);
    await within(this.exited, 15000, "the gateway to exit");
    await waitFor(async () => !(await portOpen(this.port)), { timeout: 5000, what: "the port to close" });
  }

  /**
   * Pauses the process (SIGSTOP): a gateway that stops answering. The signal takes effect
   * asynchronously, so wait until Linux reports the process stopped (state T in /proc).
   */
  async pause() {
    this.proc.kill("SIGSTOP");
    const pid = this.proc.pid;
    await waitFor(() => readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /s, "").startsWith("T"), {
      timeout: 5000,
      what: "the gateway to stop",
    });
  }

  /** Resumes a paused process (SIGCONT). */

  resume() {
    this.proc.kill("SIGCONT");
  }

  async stop() {
    if (this.proc && this.proc.signalCode === null && this.proc.exitCode === null) {
      this.proc.kill("SIGCONT");
    }
    await this.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function base64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT with `claims`, signed with `secret`. */
export function signJwt(claims, secret) {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = base64url(JSON.stringify(claims));
  const signature = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

export const KAFKA_BROKERS = process.env.WSBRIDGE_KAFKA_BROKERS ?? "127.0.0.1:9092";

/** Whether a Kafka broker listens at KAFKA_BROKERS. */
export function kafkaAvailable() {
  const [host, port] = KAFKA_BROKERS.split(",")[0].split(":");
  return portOpen(Number(port), host);
}

function python(script, args, timeout = 60000) {
  return new Promise((resolveRun, reject) => {
    execFile("python3", ["-c", script, ...args], { timeout }, (error, stdout, stderr) => {
      if (error) reject(new Error(`python3 failed: ${error.message}\n${stderr}`));
      else resolveRun(stdout);
    });
  });
}

/** Creates a Kafka topic with kafka-python's admin client (Tansu does not create topics on use). */
export async function createTopic(name, partitions) {
  await python(
    `import sys
from kafka.admin import KafkaAdminClient, NewTopic
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=20000)
admin.create_topics([NewTopic(name=sys.argv[2], num_partitions=int(sys.argv[3]), replication_factor=1)])
admin.close()`,
    [KAFKA_BROKERS, name, String(partitions)],
  );
}

/** Produces `messages` ({value, partition}) with kafka-python, straight to the broker. */
export async function produce(topic, messages) {
  const out = await python(
    `import json, sys
from kafka import KafkaProducer
producer = KafkaProducer(bootstrap_servers=sys.argv[1], acks="all")
for m in json.loads(sys.argv[3]):
    producer.send(sys.argv[2], value=m["value"].encode(), partition=m.get("partition")).get(timeout=20)
producer.flush()
producer.close()
print("ok")`,
    [KAFKA_BROKERS, topic, JSON.stringify(messages)],
  );
  if (out.trim() !== "ok") throw new Error(`kafka-python produce printed ${out}`);
}
