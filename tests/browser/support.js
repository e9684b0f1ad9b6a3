// What the browser tests share: free ports, a gateway process per test, headless Chromium, a
// static page server for pages on another origin, and the Kafka and MQTT command-line clients.
// Every process started here is registered with the test that started it and killed when that
// test ends, whether it passed or not.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as createTcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { chromium } from "playwright-core";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** Screenshots and gateway logs, for people to look at after a run. */
export const OUT_DIR = join(REPO, "target", "browser");
export const GATEWAY_BIN = process.env.WSBRIDGE_BIN
  ? resolve(REPO, process.env.WSBRIDGE_BIN)
  : join(REPO, "target", "debug", "wsbridge");
export const KAFKA_BROKERS = process.env.WSBRIDGE_KAFKA_BROKERS ?? "127.0.0.1:9092";
/** No test may take longer than this, whatever hangs. */
export const TEST_TIMEOUT = 90_000;
/** Take the console's files from this checkout, not from the gateway binary (see newPage). */
export const CONSOLE_FROM_DISK = process.env.WSBRIDGE_CONSOLE_FROM_DISK === "1";
export const CHROMIUM = process.env.WSBRIDGE_CHROMIUM ?? "/usr/bin/chromium";

mkdirSync(OUT_DIR, { recursive: true });

// A last resort for a runner that exits without running the tests' `after` hooks.
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** A name no other test run uses, for topics and channels. */
export function unique(prefix) {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 7)}`;
}

/** Polls `check` until it returns a truthy value, at most `timeout` ms; returns that value. */
export async function waitFor(check, { timeout = 10_000, interval = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** A port that was free a moment ago on 127.0.0.1. */
export async function freePort() {
  const server = createTcpServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

function startProcess(t, command, args, options = {}) {
  const child = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"], ...options });
  running.add(child);
  child.exited = new Promise((resolveExit) => {
    child.on("exit", (code, signal) => {
      running.delete(child);
      resolveExit({ code, signal });
    });
    child.on("error", (error) => {
      running.delete(child);
      resolveExit({ code: null, signal: null, error });
    });
  });
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGKILL");
      await child.exited;
    }
  });
  return child;
}

/**
 * A wsbridge gateway of the test's own on a free port. `config` is the TOML body without the
 * `[server]` listen line (an optional `server` string adds keys to `[server]`); `null` runs the
 * embedded default. `restart()` starts the same configuration on the same port again.
 */
export async function startGateway(t, { name, config = null, server = "" } = {}) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "wsbridge-browser-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const listen = `127.0.0.1:${port}`;
  let args;
  if (config === null && !server) {
    args = ["run", "--listen", listen];
  } else {
    const file = join(dir, "wsbridge.toml");
    writeFileSync(file, `[server]\nlisten = "${listen}"\n${server}\n\n${config ?? ""}\n`);
    args = ["run", "--config", file];
  }
  const logFile = join(OUT_DIR, `${name ?? "gateway"}.log`);
  writeFileSync(logFile, "");
  const gateway = {
    port,
    origin: `http://${listen}`,
    wsUrl: `ws://${listen}/ws`,
    logFile,
    process: null,
    async start() {
      const log = openSync(logFile, "a");
      const child = startProcess(t, GATEWAY_BIN, args, {
        cwd: REPO,
        stdio: ["ignore", log, log],
        env: { ...process.env, WSBRIDGE_LOG: process.env.WSBRIDGE_LOG ?? "info" },
      });
      closeSync(log);
      this.process = child;
      let exited = null;
      child.exited.then((e) => (exited = e));
      await waitFor(async () => exited || (await fetch(`${this.origin}/healthz`)).ok, {
        timeout: 20_000,
        what: `the gateway on ${listen} (${GATEWAY_BIN}; log ${logFile})`,
      });
      if (exited) {
        const how = exited.error?.message ?? `exit ${exited.code ?? exited.signal}`;
        throw new Error(`the gateway did not start (${how}); its log: ${logFile}`);
      }
      return this;
    },
    /** Kills the process outright, as a crash would, and waits until it is gone. */
    async kill() {
      const child = this.process;
      if (child && child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await child.exited;
      }
    },
    /** Stops it as an operator would (SIGTERM: clients hear `shutting_down`), and waits. */
    async stop({ timeout = 20_000 } = {}) {
      const child = this.process;
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
      const { code, signal } = await child.exited;
      clearTimeout(timer);
      if (signal === "SIGKILL") throw new Error(`the gateway did not stop within ${timeout} ms of SIGTERM`);
      return code;
    },
    /** Kills it (`graceful`: stops it) and starts it again on the same port. */
    async restart({ graceful = false } = {}) {
      if (graceful) await this.stop();
      else await this.kill();
      return this.start();
    },
  };
  return gateway.start();
}

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

/** Debian's Chromium driven by playwright-core (which never downloads a browser here). */
export async function launchBrowser(t) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    // A page fulfilled from disk has no server address, so Chromium would treat the gateway on
    // 127.0.0.1 as a more private network than the page's and refuse the WebSocket.
    args: CONSOLE_FROM_DISK ? [...CHROMIUM_ARGS, "--disable-features=LocalNetworkAccessChecks"] : CHROMIUM_ARGS,
    timeout: 30_000,
  });
  t.after(() => browser.close());
  return browser;
}

const pagesOfTest = new WeakMap();

/**
 * A new page that records its console output and uncaught errors; a failing `browserTest` shows
 * them beside its error.
 */
export async function newPage(t, browser, { viewport = { width: 1280, height: 860 } } = {}) {
  const context = await browser.newContext({ viewport });
  if (CONSOLE_FROM_DISK) await serveConsoleFromDisk(context);
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.logs = [];
  page.on("console", (message) => {
    if (message.type() !== "verbose" && message.type() !== "debug") {
      page.logs.push(`[${message.type()}] ${message.text()}`);
    }
  });
  page.on("pageerror", (error) => page.logs.push(`[pageerror] ${error.message}`));
  if (!pagesOfTest.has(t)) pagesOfTest.set(t, []);
  pagesOfTest.get(t).push(page);
  return page;
}

/** A test with the suite's time limit that, when it fails, reports what its pages said. */
export function browserTest(name, fn) {
  return test(name, { timeout: TEST_TIMEOUT }, async (t) => {
    try {
      await fn(t);
    } catch (error) {
      for (const page of pagesOfTest.get(t) ?? []) {
        if (page.logs.length) t.diagnostic(`${page.url()} said:\n${page.logs.join("\n")}`);
      }
      throw error;
    }
  });
}

/**
 * A page server on another origin than the gateway: `pages` maps paths to HTML, and `/client/*`
 * is passed through from `/console/client/*` of the gateway at `gatewayOrigin()`, so test pages
 * import the JavaScript client the gateway serves without a cross-origin module load.
 */
export async function startPageServer(t, pages, gatewayOrigin) {
  const server = createServer(async (request, response) => {
    const path = new URL(request.url, "http://x").pathname;
    if (path.startsWith("/client/")) {
      try {
        const upstream = await fetch(`${gatewayOrigin()}/console${path}`);
        response.writeHead(upstream.status, {
          "content-type": upstream.headers.get("content-type") ?? "application/octet-stream",
          "cache-control": "no-store",
        });
        response.end(Buffer.from(await upstream.arrayBuffer()));
      } catch (error) {
        response.writeHead(502, { "content-type": "text/plain" });
        response.end(`gateway: ${error.message}`);
      }
      return;
    }
    if (Object.hasOwn(pages, path)) {
      response.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
      response.end(pages[path]);
      return;
    }
    response.writeHead(404, { "content-type": "text/plain" });
    response.end("not found");
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  return { origin: `http://127.0.0.1:${server.address().port}`, server };
}

const CONTENT_TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".ts": "text/plain; charset=utf-8",
  ".map": "application/json",
};

/**
 * WSBRIDGE_CONSOLE_FROM_DISK=1: the browser takes `/console/*` from console/ and
 * `/console/client/*` from clients/js/dist/ in this checkout instead of the assets embedded in
 * the gateway binary, to try changes to the page without rebuilding the gateway.
 */
async function serveConsoleFromDisk(context) {
  await context.route(/\/console\/.*/, async (route) => {
    const path = new URL(route.request().url()).pathname;
    const rest = path.slice("/console/".length);
    const file = rest.startsWith("client/")
      ? join(REPO, "clients", "js", "dist", rest.slice("client/".length))
      : join(REPO, "console", rest === "" ? "index.html" : rest);
    try {
      const body = readFileSync(file);
      const type = CONTENT_TYPES[file.slice(file.lastIndexOf("."))] ?? "application/octet-stream";
      await route.fulfill({ status: 200, contentType: type, body });
    } catch {
      await route.fulfill({ status: 404, body: "not found" });
    }
  });
}

/** Runs a command to its end (bounded); resolves with its output, rejects on failure. */
export async function run(t, command, args, { timeout = 30_000, input } = {}) {
  const child = startProcess(t, command, args);
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  if (input !== undefined) child.stdin.end(input);
  else child.stdin.end();
  const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
  const { code, signal, error } = await child.exited;
  clearTimeout(timer);
  if (error) throw new Error(`${command}: ${error.message}`);
  if (code !== 0) {
    throw new Error(`${command} ${args.join(" ")} failed (${code ?? signal}): ${stderr}${stdout}`);
  }
  return { stdout, stderr };
}

/**
 * A long-running command whose output lines the test waits on: `waitForLine(pattern)` resolves
 * with the first line (seen so far or later) matching it.
 */
export function follow(t, command, args, options = {}) {
  const child = startProcess(t, command, args, options);
  const lines = [];
  const waiters = [];
  let stderr = "";
  let partial = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk) => {
    partial += chunk;
    let newline;
    while ((newline = partial.indexOf("\n")) >= 0) {
      const line = partial.slice(0, newline);
      partial = partial.slice(newline + 1);
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.pattern.test(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }
  });
  child.stderr.on("data", (d) => (stderr += d));
  return {
    child,
    lines,
    get stderr() {
      return stderr;
    },
    send(line) {
      child.stdin.write(`${line}\n`);
    },
    waitForLine(pattern, { timeout = 15_000 } = {}) {
      const seen = lines.find((l) => pattern.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolveLine, reject) => {
        const waiter = { pattern, resolve: resolveLine };
        waiters.push(waiter);
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(waiter), 1);
          reject(
            new Error(`${command}: no line matching ${pattern} within ${timeout} ms; stdout: ${lines.join("\n")} stderr: ${stderr}`),
          );
        }, timeout);
        const settle = waiter.resolve;
        waiter.resolve = (line) => {
          clearTimeout(timer);
          settle(line);
        };
        child.exited.then(({ code, signal }) => {
          if (waiters.includes(waiter)) {
            waiters.splice(waiters.indexOf(waiter), 1);
            clearTimeout(timer);
            reject(new Error(`${command} exited (${code ?? signal}) before printing ${pattern}: ${stderr}`));
          }
        });
      });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Kafka, through kafka-python (scripts/setup/40-kafka.sh installs it and starts the broker)

/** Creates a topic; Tansu does not create topics on first use. */
export async function createTopic(t, topic, partitions = 1) {
  const script = `
import sys
from kafka.admin import KafkaAdminClient, NewTopic
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=10000)
admin.create_topics([NewTopic(name=sys.argv[2], num_partitions=int(sys.argv[3]), replication_factor=1)])
admin.close()
`;
  try {
    await run(t, "python3", ["-c", script, KAFKA_BROKERS, topic, String(partitions)]);
  } catch (error) {
    throw new Error(
      `cannot create Kafka topic ${topic} on ${KAFKA_BROKERS} (is the broker up? bash scripts/setup/40-kafka.sh): ${error.message}`,
    );
  }
}

/**
 * A kafka-python producer that takes commands on its standard input: `send FIRST LAST PAUSE_MS`
 * produces the numbered messages FIRST..LAST to partition 0 (each acknowledged before the next)
 * and prints `sent N` for each, then `done LAST`.
 */
export function kafkaProducer(t, topic) {
  const script = `
import json, sys, time
from kafka import KafkaProducer
producer = KafkaProducer(bootstrap_servers=sys.argv[1], acks="all")
print("ready", flush=True)
for line in sys.stdin:
    op, first, last, pause = line.split()
    for n in range(int(first), int(last) + 1):
        producer.send(sys.argv[2], value=json.dumps({"n": n}).encode(), partition=0).get(timeout=20)
        print("sent", n, flush=True)
        time.sleep(int(pause) / 1000)
    print("done", last, flush=True)
producer.close()
`;
  return follow(t, "python3", ["-c", script, KAFKA_BROKERS, topic]);
}
