// Kafka streams into browser pages, across a gateway crash and restart on the same
// port: through the JavaScript client (which resumes from the position after the last message
// it delivered) and through EventSource on /sse (which resumes with Last-Event-ID). Each test
// writes numbered messages to a fresh topic and expects exactly 1..N, in order, on the page.
import assert from "node:assert/strict";
import {
  browserTest,
  createTopic,
  kafkaProducer,
  KAFKA_BROKERS,
  launchBrowser,
  newPage,
  startGateway,
  startPageServer,
  unique,
  waitFor,
} from "./support.js";

const CLIENT_PAGE = `<!doctype html>
<meta charset="utf-8">
<title>stream through the client</title>
<link rel="icon" href="data:,">
<script type="module">
  import { Client } from "/client/index.js";
  window.received = [];
  window.states = [];
  window.problems = [];
  window.start = (url, channel) => {
    const client = new Client(url, { minReconnectDelay: 100, maxReconnectDelay: 1000 });
    client.on("state", (state) => states.push(state));
    client.on("error", (error) => problems.push(\`error \${error.code}: \${error.message}\`));
    const sub = client.subscribe(channel, { from: "earliest" });
    sub.on("message", (m) => received.push({ n: m.payload.n, position: m.position }));
    sub.on("status", (s) => problems.push(\`status \${s.code}: \${s.message}\`));
    window.client = client;
  };
  window.loaded = true;
</script>`;

/**
 * Runs in the page: reads `url` with EventSource and records every message event with its id.
 * The browser itself reconnects after the stream breaks and sends the last id it saw as
 * `Last-Event-ID`.
 */
function readEventStream(url) {
  window.received = [];
  window.opens = 0;
  window.failures = 0;
  const source = new EventSource(url);
  source.addEventListener("open", () => (window.opens += 1));
  source.addEventListener("error", () => (window.failures += 1));
  source.addEventListener("message", (event) => {
    window.received.push({ n: JSON.parse(event.data).payload.n, id: event.lastEventId });
  });
  window.source = source;
}

function kafkaConfig(channel, topic) {
  return `
[backends.events]
type = "kafka"
brokers = "${KAFKA_BROKERS}"
delivery_timeout = "5s"

[[routes]]
channel = "${channel}"
backend = "events"
topic = "${topic}"
allow = ["subscribe", "publish"]
`;
}

/** Numbers the page has received so far. */
const numbers = (page) => page.evaluate(() => window.received.map((m) => m.n));

function expectOneToN(received, n) {
  const expected = Array.from({ length: n }, (_, i) => i + 1);
  assert.deepEqual(received, expected, `expected 1..${n} once each, in order`);
}

/**
 * The shared plot: messages 1..FIRST stream while the page reads; the gateway is killed once
 * the page has a few; FIRST+1..TOTAL are written while it is down; it starts again on the same
 * port; the page must end with exactly 1..TOTAL.
 */
async function streamAcrossRestart(t, { gateway, page, topic }) {
  const FIRST = 30;
  const TOTAL = 45;
  const producer = kafkaProducer(t, topic);
  await producer.waitForLine(/^ready$/);
  producer.send(`send 1 ${FIRST} 20`);
  await waitFor(async () => (await numbers(page)).length >= 8, {
    timeout: 20_000,
    what: "the first messages on the page",
  });
  await gateway.kill();
  await producer.waitForLine(new RegExp(`^done ${FIRST}$`), { timeout: 30_000 });
  const beforeRestart = (await numbers(page)).length;
  producer.send(`send ${FIRST + 1} ${TOTAL} 0`);
  await producer.waitForLine(new RegExp(`^done ${TOTAL}$`), { timeout: 30_000 });
  await gateway.start();
  // Message TOTAL comes last on its partition, so once it is there, anything delivered twice
  // (or skipped) already shows.
  await waitFor(async () => (await numbers(page)).includes(TOTAL), {
    timeout: 30_000,
    what: `message ${TOTAL} on the page`,
  });
  expectOneToN(await numbers(page), TOTAL);
  return { beforeRestart, TOTAL };
}

browserTest("a page using the client keeps a Kafka stream across a gateway restart", async (t) => {
  const topic = unique("browser-client");
  await createTopic(t, topic, 1);
  let gatewayOrigin = "";
  const pages = await startPageServer(t, { "/": CLIENT_PAGE }, () => gatewayOrigin);
  const gateway = await startGateway(t, {
    name: "kafka-client",
    server: `allowed_origins = ["${pages.origin}"]`,
    config: kafkaConfig("stream/{name}", "{name}"),
  });
  gatewayOrigin = gateway.origin;
  const browser = await launchBrowser(t);
  const page = await newPage(t, browser);
  await page.goto(`${pages.origin}/`);
  await page.waitForFunction(() => window.loaded === true);
  await page.evaluate(([url, channel]) => window.start(url, channel), [gateway.wsUrl, `stream/${topic}`]);

  const { beforeRestart, TOTAL } = await streamAcrossRestart(t, { gateway, page, topic });
  assert.ok(beforeRestart < TOTAL, "some messages were written while the gateway was down");
  const states = await page.evaluate(() => window.states);
  const reconnected = states.lastIndexOf("connected");
  assert.ok(
    states.indexOf("disconnected") >= 0 && reconnected > states.indexOf("disconnected"),
    `the client lost the gateway and connected again: ${states.join(", ")}`,
  );
  const positions = await page.evaluate(() => window.received.map((m) => m.position));
  assert.deepEqual(
    positions.map((p) => p.offset),
    Array.from({ length: TOTAL }, (_, i) => i),
    "offsets 0..N-1 of the topic's one partition",
  );
  const problems = await page.evaluate(() => window.problems);
  assert.ok(!problems.some((p) => p.startsWith("status gap")), problems.join("\n"));
});

browserTest("a page using EventSource resumes a Kafka stream with Last-Event-ID", async (t) => {
  const topic = unique("browser-sse");
  await createTopic(t, topic, 1);
  const gateway = await startGateway(t, {
    name: "kafka-sse",
    config: kafkaConfig("sse/{name}", "{name}"),
  });
  const browser = await launchBrowser(t);
  const page = await newPage(t, browser);
  // A document on the gateway's own origin: the gateway sends no CORS headers on /sse, without
  // which a browser does not let a page on another origin read an event stream.
  await page.goto(`${gateway.origin}/healthz`);
  const url = `/sse?channel=${encodeURIComponent(`sse/${topic}`)}&from=earliest`;
  await page.evaluate(readEventStream, url);
  await waitFor(() => page.evaluate(() => window.opens >= 1), { what: "the event stream to open" });

  await streamAcrossRestart(t, { gateway, page, topic });
  assert.ok((await page.evaluate(() => window.opens)) >= 2, "the EventSource connected again");
  const ids = await page.evaluate(() => window.received.map((m) => m.id));
  assert.deepEqual(ids.slice(0, 3), ["0:0", "0:1", "0:2"], "each event's id is partition:offset");
});
