// The console page served by the gateway at /console/, driven in headless Chromium: subscribing
// and publishing on the embedded default (memory backend), through Mosquitto, on Kafka, and with
// a token. Screenshots go to target/browser/.
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { join } from "node:path";
import {
  browserTest,
  CONSOLE_FROM_DISK,
  KAFKA_BROKERS,
  OUT_DIR,
  createTopic,
  follow,
  launchBrowser,
  newPage,
  run,
  startGateway,
  unique,
} from "./support.js";

/** Opens the console (through `GET /`, which points a browser to it) and waits until connected. */
async function openConsole(t, browser, gateway) {
  const page = await newPage(t, browser);
  await page.goto(`${gateway.origin}/`);
  assert.equal(new URL(page.url()).pathname, "/console/", "GET / leads the browser to the console");
  // Routed requests do not cover the redirect's target; load the page from disk too.
  if (CONSOLE_FROM_DISK) await page.reload();
  await page.locator('[data-testid="state"][data-state="connected"]').waitFor();
  return page;
}

async function subscribe(page, pattern, from) {
  await page.getByTestId("sub-pattern").fill(pattern);
  if (from) await page.getByTestId("sub-from").selectOption(from);
  await page.getByTestId("subscribe").click();
  const item = page.locator(`[data-testid="subscription"][data-pattern="${pattern}"]`);
  await item.and(page.locator('[data-state="active"]')).waitFor();
  return item;
}

async function publish(page, { channel, payload, mode = "json", key = "", headers = "" }) {
  await page.getByTestId("pub-channel").fill(channel);
  await page.getByTestId("pub-payload").fill(payload);
  await page.getByTestId(`pub-mode-${mode}`).check();
  await page.getByTestId("pub-key").fill(key);
  await page.getByTestId("pub-headers").fill(headers);
  const before = await page.getByTestId("ack").count();
  await page.getByTestId("publish").click();
  // The newest outcome is listed first.
  await page.getByTestId("ack").nth(before).waitFor({ state: "attached" });
  const ack = page.getByTestId("ack").first();
  await ack.and(page.locator('[data-result="ok"], [data-result="error"]')).waitFor();
  return ack;
}

function messageOn(page, channel) {
  return page.locator(`[data-testid="message"][data-channel="${channel}"]`);
}

browserTest("the console subscribes and publishes through the embedded default", async (t) => {
  const gateway = await startGateway(t, { name: "console-memory" });
  const browser = await launchBrowser(t);
  const page = await openConsole(t, browser, gateway);

  // The default routes every channel to the memory backend, for subscribe and publish.
  const route = page.getByTestId("route").first();
  await route.waitFor();
  assert.match(await route.innerText(), /subscribe, publish/);

  const base = unique("console");
  await subscribe(page, `${base}/+/temp`);

  // A pattern the gateway refuses says why.
  await page.getByTestId("sub-pattern").fill(`${base}/#/temp`);
  await page.getByTestId("subscribe").click();
  const refusedSub = page.locator(`[data-testid="subscription"][data-pattern="${base}/#/temp"]`);
  await refusedSub.and(page.locator('[data-state="failed"]')).waitFor();
  assert.equal(await refusedSub.getByTestId("subscription-state").innerText(), "invalid_channel");
  await refusedSub.getByTestId("unsubscribe").click();
  await refusedSub.waitFor({ state: "detached" });

  const json = await publish(page, {
    channel: `${base}/berlin/temp`,
    payload: '{"celsius": 21.5, "sensor": {"id": "t-1"}}',
    headers: "trace: abc-1\nunit: C",
  });
  assert.equal(await json.getAttribute("data-result"), "ok", await json.innerText());
  const message = messageOn(page, `${base}/berlin/temp`);
  await message.waitFor();
  assert.equal(await message.getAttribute("data-subscription"), `${base}/+/temp`);
  assert.equal(await message.getAttribute("data-payload-kind"), "json");
  const shown = await message.getByTestId("payload").innerText();
  assert.deepEqual(JSON.parse(shown), { celsius: 21.5, sensor: { id: "t-1" } });
  assert.ok(shown.includes("\n"), `the payload is pretty-printed: ${shown}`);
  const head = await message.innerText();
  assert.match(head, /trace=abc-1/);

  // Text arrives as text; a message on a channel the pattern does not match does not arrive.
  await publish(page, { channel: `${base}/berlin/humidity`, payload: "40 %", mode: "text" });
  const text = await publish(page, { channel: `${base}/hamburg/temp`, payload: "fan on", mode: "text" });
  assert.equal(await text.getAttribute("data-result"), "ok");
  const textMessage = messageOn(page, `${base}/hamburg/temp`).first();
  await textMessage.waitFor();
  assert.equal(await textMessage.getByTestId("payload").innerText(), "fan on");
  assert.equal(await textMessage.getAttribute("data-payload-kind"), "text");
  assert.equal(await messageOn(page, `${base}/berlin/humidity`).count(), 0);

  // Bytes that are not text arrive base64-encoded, and are flagged as such.
  await publish(page, { channel: `${base}/hamburg/temp`, payload: "AP8Q", mode: "base64" });
  const binary = messageOn(page, `${base}/hamburg/temp`).and(page.locator('[data-payload-kind="base64"]'));
  await binary.waitFor();
  assert.equal(await binary.getByTestId("payload").innerText(), "AP8Q");
  assert.equal(await binary.getByTestId("base64").textContent(), "base64");

  // A refused publish shows its error code.
  const refused = await publish(page, { channel: `${base}/+/temp`, payload: "1" });
  assert.equal(await refused.getAttribute("data-result"), "error");
  assert.equal(await refused.getAttribute("data-code"), "invalid_channel");

  // A payload that is not JSON, in JSON mode, is caught before it is sent.
  await page.getByTestId("pub-mode-json").check();
  await page.getByTestId("pub-payload").fill("{not json");
  await page.getByTestId("publish").click();
  await page.getByTestId("pub-problem").waitFor();


  // After unsubscribing, messages on the pattern no longer arrive.
  await page.locator(`[data-testid="subscription"][data-pattern="${base}/+/temp"]`).getByTestId("unsubscribe").click();
  await subscribe(page, `${base}/#`);
  await publish(page, { channel: `${base}/paris/temp`, payload: "2" });
  const paris = messageOn(page, `${base}/paris/temp`);
  await paris.waitFor();
  assert.equal(await paris.count(), 1, "one subscription left, so the message arrives once");
  assert.equal(await paris.getAttribute("data-subscription"), `${base}/#`);

  // The gateway is stopped and started again: the page shows the announcement, reconnects and
  // renews the subscription.
  await gateway.restart({ graceful: true });
  const announced = page.locator('[data-testid="event-status"][data-code="shutting_down"]');
  await announced.waitFor();
  assert.equal(await announced.evaluate((e) => e.dataset.kind), "status");
  await page.locator('[data-testid="event-info"][data-code="disconnected"]').first().waitFor();
  await page.locator('[data-testid="state"][data-state="connected"]').waitFor();
  await page.locator(`[data-testid="subscription"][data-pattern="${base}/#"][data-state="active"]`).waitFor();
  const again = await publish(page, { channel: `${base}/oslo/temp`, payload: "3" });
  assert.equal(await again.getAttribute("data-result"), "ok", await again.innerText());
  await messageOn(page, `${base}/oslo/temp`).waitFor();

  // Reconnecting by hand (as after changing the token) keeps the subscriptions.
  await page.getByTestId("connect").click();
  await page.locator('[data-testid="event-info"][data-code="connected"]').nth(2).waitFor();
  await page.locator(`[data-testid="subscription"][data-pattern="${base}/#"][data-state="active"]`).waitFor();
  assert.equal(await page.getByTestId("subscription").count(), 1);
  assert.equal(await page.locator('[data-testid="state"]').getAttribute("data-state"), "connected");
  assert.equal(await page.locator('[data-testid="event-info"][data-code="closed"]').count(), 0, "the old connection's end is not reported as the page's");
  await publish(page, { channel: `${base}/rome/temp`, payload: "4" });
  await messageOn(page, `${base}/rome/temp`).waitFor();
  await page.screenshot({ path: join(OUT_DIR, "console-memory.png") });

  // The list keeps the newest 500 messages however many arrive.
  const before = Number(await page.getByTestId("message-count").innerText());
  const burst = 520;
  for (let i = 0; i < burst; i += 40) {
    const batch = [];
    for (let n = i; n < Math.min(i + 40, burst); n += 1) {
      batch.push(
        fetch(`${gateway.origin}/publish`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ channel: `${base}/burst/${n}`, payload: { n } }),
        }).then((response) => assert.equal(response.status, 200)),
      );
    }
    await Promise.all(batch);
  }
  await page.waitForFunction(
    (total) => Number(document.querySelector('[data-testid="message-count"]').textContent) >= total,
    before + burst,
  );
  assert.equal(await page.getByTestId("message").count(), 500);
});

browserTest("the console through Mosquitto: devices reach the page, the page reaches devices", async (t) => {
  const site = unique("site");
  const gateway = await startGateway(t, {
    name: "console-mqtt",
    config: `
[backends.plant]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
protocol = "5"
client_id_prefix = "wsbridge-browser"

[[routes]]
channel = "telemetry/{site}/#"
backend = "plant"
topic = "plant/{site}/telemetry/#"
allow = ["subscribe"]
qos = 1

[[routes]]
channel = "commands/{site}/{device}"
backend = "plant"
topic = "plant/{site}/commands/{device}"
allow = ["publish"]
qos = 1
`,
  });
  const browser = await launchBrowser(t);
  const page = await openConsole(t, browser, gateway);

  const routes = page.getByTestId("route");
  await routes.nth(1).waitFor();
  assert.deepEqual(
    await routes.evaluateAll((items) => items.map((i) => i.dataset.channel)),
    ["telemetry/{site}/#", "commands/{site}/{device}"],
  );

  // A device publishes telemetry with mosquitto_pub; the page shows it.
  await subscribe(page, `telemetry/${site}/#`);
  await run(t, "mosquitto_pub", [
    "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-V", "mqttv5",
    "-t", `plant/${site}/telemetry/line1/temp`,
    "-m", '{"celsius": 21.5}',
    "-D", "publish", "user-property", "source", "mosquitto_pub",
  ]);
  const reading = messageOn(page, `telemetry/${site}/line1/temp`);
  await reading.waitFor();
  assert.deepEqual(JSON.parse(await reading.getByTestId("payload").innerText()), { celsius: 21.5 });
  assert.match(await reading.innerText(), /source=mosquitto_pub/);

  // The page sends a command; a device subscribed with mosquitto_sub gets it.
  // Line-buffered, so its debug output (-d: the SUBACK) reaches the test as it happens.
  const device = follow(t, "stdbuf", [
    "-oL", "mosquitto_sub",
    "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-V", "mqttv5", "-d",
    "-t", `plant/${site}/commands/#`, "-v", "-C", "1", "-W", "20",
  ]);
  await device.waitForLine(/SUBACK/);
  const ack = await publish(page, {
    channel: `commands/${site}/pump-3`,
    payload: '{"on": true}',
    headers: "issued-by: console",
  });
  assert.equal(await ack.getAttribute("data-result"), "ok", await ack.innerText());
  const line = await device.waitForLine(new RegExp(`^plant/${site}/commands/pump-3 `));
  assert.deepEqual(JSON.parse(line.slice(line.indexOf(" ") + 1)), { on: true });

  // A channel no route serves, and one the route does not allow publishing on.
  const noRoute = await publish(page, { channel: `elsewhere/${site}`, payload: "1" });
  assert.equal(await noRoute.getAttribute("data-code"), "no_route");
  const forbidden = await publish(page, { channel: `telemetry/${site}/x`, payload: "1" });
  assert.equal(await forbidden.getAttribute("data-code"), "forbidden");

  await page.screenshot({ path: join(OUT_DIR, "console-mqtt.png") });
});

browserTest("the console on Kafka: keys, positions, replays from the earliest offset and from a time", async (t) => {
  const topic = unique("console-kafka");
  await createTopic(t, topic, 1);
  const gateway = await startGateway(t, {
    name: "console-kafka",
    config: `
[backends.events]
type = "kafka"
brokers = "${KAFKA_BROKERS}"
delivery_timeout = "5s"

[[routes]]
channel = "events/{name}"
backend = "events"
topic = "{name}"
allow = ["subscribe", "publish"]
`,
  });
  const browser = await launchBrowser(t);
  const page = await openConsole(t, browser, gateway);

  // Written before anyone subscribes; acknowledged with the offset the broker gave it.
  const first = await publish(page, { channel: `events/${topic}`, payload: '{"order": 1}', key: "o-1" });
  assert.equal(await first.getAttribute("data-result"), "ok", await first.innerText());
  assert.equal(await first.getAttribute("data-position"), "partition 0, offset 0");

  await subscribe(page, `events/${topic}`, "earliest");
  const replayed = messageOn(page, `events/${topic}`);
  await replayed.waitFor();
  assert.deepEqual(JSON.parse(await replayed.getByTestId("payload").innerText()), { order: 1 });
  const head = await replayed.innerText();
  assert.match(head, /key\s+o-1/);
  assert.match(head, /position\s+partition 0, offset 0/);

  const second = await publish(page, {
    channel: `events/${topic}`,
    payload: '{"order": 2}',
    key: "o-2",
    headers: "source: console",
  });
  assert.equal(await second.getAttribute("data-position"), "partition 0, offset 1");
  await messageOn(page, `events/${topic}`).nth(1).waitFor();
  const newest = messageOn(page, `events/${topic}`).first();
  assert.match(await newest.innerText(), /position\s+partition 0, offset 1/);
  assert.match(await newest.innerText(), /source=console/);

  await page.screenshot({ path: join(OUT_DIR, "console-kafka.png") });

  // Reconnecting by hand continues after the last message shown: nothing twice.
  await page.getByTestId("connect").click();
  await page.locator('[data-testid="event-info"][data-code="connected"]').nth(1).waitFor();
  await page.locator(`[data-testid="subscription"][data-pattern="events/${topic}"][data-state="active"]`).waitFor();
  await publish(page, { channel: `events/${topic}`, payload: '{"order": 3}' });
  await messageOn(page, `events/${topic}`).nth(2).waitFor();
  assert.deepEqual(
    await messageOn(page, `events/${topic}`).getByTestId("payload").evaluateAll((items) =>
      items.map((i) => JSON.parse(i.textContent).order),
    ),
    [3, 2, 1],
  );

  // A subscription from a point in time replays what was written since.
  await page.locator(`[data-testid="subscription"][data-pattern="events/${topic}"]`).getByTestId("unsubscribe").click();
  await page.getByTestId("clear").click();
  await page.getByTestId("sub-from").selectOption("timestamp");
  await page.evaluate(() => {
    const start = new Date(Date.now() - 10 * 60_000);
    const local = new Date(start.getTime() - start.getTimezoneOffset() * 60_000);
    document.querySelector('[data-testid="sub-from-time"]').value = local.toISOString().slice(0, 19);
  });
  await subscribe(page, `events/${topic}`);
  await messageOn(page, `events/${topic}`).nth(2).waitFor();
  assert.equal(await page.getByTestId("message").count(), 3);
});

/** An HS256 JWT, as an identity provider would issue it. */
function hs256(secret, claims) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

browserTest("the console with a token: refused without one, scoped to its subject with one", async (t) => {
  const secret = randomBytes(32).toString("hex");
  const gateway = await startGateway(t, {
    name: "console-token",
    config: `
[auth]
mode = "jwt"
secret = "${secret}"

[backends.local]
type = "memory"

[[routes]]
channel = "users/{claims.sub}/#"
backend = "local"
topic = "users/{claims.sub}/#"
allow = ["subscribe", "publish"]

[[routes]]
channel = "devices/{device}/#"
backend = "local"
topic = "plant/{device}/#"
allow = ["subscribe", "publish"]
publish_if = "'operator' in claims.roles"
`,
  });
  const browser = await launchBrowser(t);
  const page = await newPage(t, browser);
  await page.goto(`${gateway.origin}/console/`);
  if (CONSOLE_FROM_DISK) await page.reload();

  // Without a token the page says so, once, and stops trying.
  await page.locator('[data-testid="event-error"][data-code="invalid_token"]').first().waitFor();
  await page.locator('[data-testid="state"][data-state="closed"]').waitFor();
  assert.equal(await page.locator('[data-testid="event-error"]').count(), 1);

  const user = unique("user");
  const token = hs256(secret, { sub: user, exp: Math.floor(Date.now() / 1000) + 3600 });
  await page.getByTestId("token").fill(token);
  await page.getByTestId("connect").click();
  await page.locator('[data-testid="state"][data-state="connected"]').waitFor();
  await page.getByTestId("route").first().waitFor();
  const channels = await page.getByTestId("route").evaluateAll((items) => items.map((i) => i.dataset.channel));
  assert.ok(channels.length >= 1, `routes listed: ${channels}`);

  await subscribe(page, `users/${user}/#`);
  const ok = await publish(page, { channel: `users/${user}/notes`, payload: '{"hello": "me"}' });
  assert.equal(await ok.getAttribute("data-result"), "ok", await ok.innerText());
  await messageOn(page, `users/${user}/notes`).waitFor();

  const other = await publish(page, { channel: `users/someone-else/notes`, payload: "1" });
  assert.equal(await other.getAttribute("data-code"), "forbidden");
  const device = await publish(page, { channel: "devices/d1/cmd", payload: "1" });
  assert.equal(await device.getAttribute("data-code"), "forbidden");
});
