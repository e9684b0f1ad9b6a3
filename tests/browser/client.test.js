// The JavaScript client in a page on another origin than the gateway, where the browser's own
// rules apply: the Origin check on the WebSocket and CORS on `GET /routes`, which the client asks
// after a refused handshake to tell a refused token from a gateway that is down.
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import {
  browserTest,
  launchBrowser,
  newPage,
  startGateway,
  startPageServer,
  unique,
  waitFor,
} from "./support.js";

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>client on another origin</title>
<link rel="icon" href="data:,">
<script type="module">
  import { Client } from "/client/index.js";
  window.connect = (url, token) => {
    const seen = { states: [], errors: [], messages: [] };
    const client = new Client(url, { token, minReconnectDelay: 50, maxReconnectDelay: 200 });
    client.on("state", (state) => seen.states.push(state));
    client.on("error", (error) => seen.errors.push(error.code));
    window.seen = seen;
    window.client = client;
  };
  window.roundTrip = async (channel) => {
    const sub = window.client.subscribe(channel);
    sub.on("message", (m) => window.seen.messages.push(m.payload));
    await sub.ready;
    return window.client.publish(channel, { hello: "from another origin" });
  };
  window.loaded = true;
</script>`;

function hs256(secret, claims) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

browserTest("a page on another origin: a refused token is reported once, a good one works", async (t) => {
  const secret = randomBytes(32).toString("hex");
  let gatewayOrigin = "";
  const pages = await startPageServer(t, { "/": PAGE }, () => gatewayOrigin);
  const gateway = await startGateway(t, {
    name: "client-origin",
    server: `allowed_origins = ["${pages.origin}"]`,
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
`,
  });
  gatewayOrigin = gateway.origin;
  const browser = await launchBrowser(t);
  const page = await newPage(t, browser);
  await page.goto(`${pages.origin}/`);
  await page.waitForFunction(() => window.loaded === true);

  // A token signed with another key: the handshake fails, the client asks GET /routes why
  // (across origins, so only CORS lets it read the 401) and stops instead of retrying forever.
  const forged = hs256("not-the-gateway-secret", { sub: "mallory", exp: Math.floor(Date.now() / 1000) + 600 });
  await page.evaluate(([url, token]) => window.connect(url, token), [gateway.wsUrl, forged]);
  await waitFor(() => page.evaluate(() => window.seen.states.includes("closed")), {
    what: "the client to give up on the refused token",
  });
  const refused = await page.evaluate(() => window.seen);
  assert.deepEqual(refused.errors, ["invalid_token"]);
  assert.ok(
    refused.states.filter((s) => s === "connecting").length <= 2,
    `no reconnect loop: ${refused.states.join(", ")}`,
  );

  const user = unique("user");
  const token = hs256(secret, { sub: user, exp: Math.floor(Date.now() / 1000) + 600 });
  await page.evaluate(([url, tok]) => window.connect(url, tok), [gateway.wsUrl, token]);
  await waitFor(() => page.evaluate(() => window.seen.states.includes("connected")), {
    what: "the client to connect with a good token",
  });
  await page.evaluate((channel) => window.roundTrip(channel), `users/${user}/notes`);
  await waitFor(() => page.evaluate(() => window.seen.messages.length === 1), { what: "the message back" });
  assert.deepEqual(await page.evaluate(() => window.seen.messages), [{ hello: "from another origin" }]);
  assert.deepEqual(await page.evaluate(() => window.seen.errors), []);
});
