// The wsbridge console: connect, look at the routes, subscribe, watch messages, publish.
//
// Everything goes through the JavaScript client the gateway serves beside this page; the page
// itself only keeps the DOM in step with the client's events. Lists are bounded so a busy
// channel cannot make the page grow without limit.
import { Client } from "./client/index.js";

const MESSAGE_LIMIT = 500;
const EVENT_LIMIT = 200;
const ACK_LIMIT = 50;

const $ = (id) => document.getElementById(id);

const ui = {
  endpoint: $("endpoint"),
  connectForm: $("connect-form"),
  token: $("token"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  state: $("state"),
  routes: $("routes"),
  routesNote: $("routes-note"),
  routesReload: $("routes-reload"),
  subscribeForm: $("subscribe-form"),
  subPattern: $("sub-pattern"),
  subFrom: $("sub-from"),
  subFromTime: $("sub-from-time"),
  subscriptions: $("subscriptions"),
  noSubscriptions: $("no-subscriptions"),
  publishForm: $("publish-form"),
  pubChannel: $("pub-channel"),
  pubPayload: $("pub-payload"),
  pubKey: $("pub-key"),
  pubHeaders: $("pub-headers"),
  pubProblem: $("pub-problem"),
  acks: $("acks"),
  messages: $("messages"),
  messageCount: $("message-count"),
  messageLimit: $("message-limit"),
  pause: $("pause"),
  clear: $("clear"),
  events: $("events"),
  clearEvents: $("clear-events"),
};

/** The WebSocket endpoint of the gateway that served this page. */
const wsUrl = (() => {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.toString();
})();

let client = null;
let receivedTotal = 0;
/** pattern -> { sub, from, li, count } */
const subscriptions = new Map();

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-") || name === "title" || name === "type") node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child);
  }
  return node;
}

function trimList(list, limit) {
  while (list.childElementCount > limit) list.lastElementChild.remove();
}

function clock(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function describeError(error) {
  if (error && typeof error === "object") {
    const code = error.code ?? error.name ?? "error";
    const message = error.message ?? String(error);
    return { code: String(code), message: String(message) };
  }
  return { code: "error", message: String(error) };
}

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function base64ToBytes(text) {
  let binary;
  try {
    binary = atob(text);
  } catch {
    throw new Error("payload is not valid base64");
  }
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function positionText(position) {
  if (!position || typeof position !== "object") return null;
  if ("partition" in position || "offset" in position) {
    return `partition ${position.partition ?? "?"}, offset ${position.offset ?? "?"}`;
  }
  return JSON.stringify(position);
}

function headersText(headers) {
  if (!headers || typeof headers !== "object") return null;
  const entries = Array.isArray(headers)
    ? headers.map((h) => [h.name ?? h.key ?? h[0], h.value ?? h[1]])
    : Object.entries(headers);
  if (entries.length === 0) return null;
  return entries
    .map(([name, value]) => `${name}=${Array.isArray(value) ? value.join(",") : value}`)
    .join("  ");
}

// ---------------------------------------------------------------------------------------------
// Statuses, errors and connection history

function logEvent(kind, code, text) {
  const item = el(
    "li",
    { "data-kind": kind, "data-code": code, "data-testid": `event-${kind}` },
    el("span", { class: "time", text: clock(Date.now()) }),
    el("span", { class: "code", text: code }),
    el("span", { class: "text", text: text ?? "" }),
  );
  ui.events.prepend(item);
  trimList(ui.events, EVENT_LIMIT);
}

function statusText(status) {
  const parts = [status.message ?? ""];
  if (status.backend) parts.push(`backend ${status.backend}`);
  if (Array.isArray(status.subscriptions) && status.subscriptions.length) {
    parts.push(`subscriptions ${status.subscriptions.join(", ")}`);
  }
  if (status.count !== undefined) parts.push(`count ${status.count}`);
  if (status.partition !== undefined) {
    parts.push(
      `partition ${status.partition}: requested ${status.requestedOffset}, available ${status.availableOffset}`,
    );
  }
  if (status.reconnectAfterMs !== undefined) parts.push(`reconnect after ${status.reconnectAfterMs} ms`);
  return parts.filter(Boolean).join(" · ");
}

// ---------------------------------------------------------------------------------------------
// Connection

function setState(state) {
  ui.state.textContent = state;
  ui.state.dataset.state = state;
  const open = state !== "closed";
  ui.disconnect.disabled = !open;
  ui.connect.textContent = open ? "Reconnect" : "Connect";
}

function connect() {
  const previous = client;
  // On logs, a subscription carried over continues after the last message it showed.
  const keep = [...subscriptions.entries()].map(([pattern, s]) => [pattern, continueFrom(s)]);
  if (previous) {
    // The new connection (perhaps with another token) takes over the subscriptions; the old
    // client's last events are of no interest any more.
    client = null;
    for (const s of subscriptions.values()) detach(s);
    subscriptions.clear();
    ui.subscriptions.replaceChildren();
    previous.close();
  }
  const token = ui.token.value.trim();
  client = new Client(wsUrl, token ? { token } : {});
  const mine = client;
  client.on("state", (state) => {
    if (client !== mine) return;
    setState(state);
    logEvent("info", state, state === "connected" ? wsUrl : "");
    if (state === "connected") {
      loadRoutes();
    } else if (state === "disconnected") {
      // The client renews every subscription on the next connection; each shows "active" again
      // once the gateway confirms it.
      for (const s of subscriptions.values()) {
        if (s.li.dataset.state === "active") setSubState(s, "pending", "waiting for the gateway");
      }
    }
  });
  client.on("error", (error) => {
    if (client !== mine) return;
    const { code, message } = describeError(error);
    logEvent("error", code, message);
  });
  // Every status frame, whether it names subscriptions or not, is logged here once.
  client.on("status", (status) => {
    if (client !== mine) return;
    logEvent("status", status?.code ?? "status", statusText(status ?? {}));
  });
  setState("connecting");
  for (const [pattern, from] of keep) subscribe(pattern, from);
}

function continueFrom(s) {
  const positions = Object.entries(s.sub?.positions ?? {});
  if (positions.length === 0) return s.from;
  return { offsets: Object.fromEntries(positions.map(([partition, offset]) => [partition, offset + 1])) };
}

function disconnect() {
  if (!client) return;
  const closing = client;
  client = null;
  for (const s of subscriptions.values()) detach(s);
  subscriptions.clear();
  ui.subscriptions.replaceChildren();
  ui.noSubscriptions.hidden = false;
  closing.close();
  setState("closed");
  logEvent("info", "closed", "disconnected by you");
}

// ---------------------------------------------------------------------------------------------
// Routes

async function loadRoutes() {
  if (!client) return;
  const asking = client;
  ui.routesNote.textContent = "Loading…";
  let routes;
  try {
    routes = await asking.routes();
  } catch (error) {
    if (asking !== client) return;
    const { code, message } = describeError(error);
    ui.routesNote.textContent = `${code}: ${message}`;
    ui.routes.replaceChildren();
    logEvent("error", code, `routes: ${message}`);
    return;
  }
  if (asking !== client) return;
  ui.routesNote.textContent = routes.length
    ? "Channels you may use ({name} is any one level, # the rest):"
    : "No route allows you anything.";
  ui.routes.replaceChildren(...routes.map(routeItem));
}

function routeItem(route) {
  const operations = Array.isArray(route.operations) ? route.operations : [];
  const use = el("span", { class: "use" });
  if (operations.includes("subscribe")) {
    use.append(
      el("button", {
        type: "button",
        class: "small",
        text: "subscribe",
        title: `Fill in ${route.pattern}`,
        "data-testid": "route-subscribe",
        onclick: () => {
          ui.subPattern.value = route.pattern;
          ui.subPattern.focus();
        },
      }),
    );
  }
  if (operations.includes("publish")) {
    use.append(
      el("button", {
        type: "button",
        class: "small",
        text: "publish",
        title: "Fill in the channel template; replace each {name} and # with levels",
        "data-testid": "route-publish",
        onclick: () => {
          ui.pubChannel.value = route.channel;
          ui.pubChannel.focus();
        },
      }),
    );
  }
  return el(
    "li",
    { "data-testid": "route", "data-channel": route.channel },
    el("span", { class: "channel", text: route.channel }),
    use,
    el("span", {
      class: "meta",
      text: `${route.backend ?? "?"} · ${operations.join(", ") || "nothing"}`,
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

function fromOption() {
  switch (ui.subFrom.value) {
    case "earliest":
      return "earliest";
    case "timestamp": {
      // A date-time without a zone, as datetime-local gives it, is read as local time.
      const ms = new Date(ui.subFromTime.value).getTime();
      return Number.isNaN(ms) ? null : { timestamp: ms };
    }
    default:
      return "latest";
  }
}

function fromText(from) {
  if (from === undefined || from === "latest") return "latest";
  if (typeof from === "string") return from;
  if (from.timestamp !== undefined) return `since ${new Date(from.timestamp).toLocaleString()}`;
  return JSON.stringify(from);
}

function setSubState(s, state, text) {
  s.li.dataset.state = state;
  s.stateLabel.textContent = text ?? state;
  s.button.textContent = state === "failed" ? "remove" : "unsubscribe";
}

function detach(s) {
  s.detached = true;
}

function subscribe(pattern, from) {
  if (!client) {
    logEvent("error", "not_connected", "connect first");
    return;
  }
  if (subscriptions.has(pattern)) {
    logEvent("error", "already_subscribed", `already subscribed to ${pattern}`);
    return;
  }
  const options = from && from !== "latest" ? { from } : {};
  const s = { pattern, from, count: 0, detached: false };
  s.stateLabel = el("span", { class: "sub-state", "data-testid": "subscription-state" });
  s.countLabel = el("span", { class: "sub-count", "data-testid": "subscription-count", text: "0" });
  s.button = el("button", {
    type: "button",
    class: "small",
    text: "unsubscribe",
    "data-testid": "unsubscribe",
    onclick: () => unsubscribe(pattern),
  });
  s.li = el(
    "li",
    { "data-testid": "subscription", "data-pattern": pattern },
    el("span", { class: "pattern", text: pattern, title: `from ${fromText(from)}` }),
    s.stateLabel,
    s.countLabel,
    s.button,
  );
  setSubState(s, "pending", "subscribing…");
  subscriptions.set(pattern, s);
  ui.subscriptions.append(s.li);
  ui.noSubscriptions.hidden = true;

  let sub;
  try {
    sub = client.subscribe(pattern, options);
  } catch (error) {
    failSubscription(s, error);
    return;
  }
  s.sub = sub;
  sub.on("message", (message) => {
    if (s.detached) return;
    s.count += 1;
    s.countLabel.textContent = String(s.count);
    showMessage(message, pattern);
  });
  // Confirmed by the gateway: the first time, and again after every reconnect.
  sub.on("subscribed", () => {
    if (!s.detached) setSubState(s, "active");
  });
  // A refusal: retried by the client while the subscription stays pending, final otherwise.
  sub.on("error", (error) => {
    if (!s.detached) failSubscription(s, error, sub.state === "pending");
  });
}

function failSubscription(s, error, retrying = false) {
  const { code, message } = describeError(error);
  setSubState(s, retrying ? "pending" : "failed", retrying ? `${code}, retrying` : code);
  s.stateLabel.title = message;
  logEvent("error", code, `subscribe ${s.pattern}: ${message}`);
}

function unsubscribe(pattern) {
  const s = subscriptions.get(pattern);
  if (!s) return;
  subscriptions.delete(pattern);
  detach(s);
  s.li.remove();
  ui.noSubscriptions.hidden = subscriptions.size > 0;
  try {
    const done = s.sub?.unsubscribe();
    if (done && typeof done.catch === "function") {
      done.catch((error) => {
        const { code, message } = describeError(error);
        logEvent("error", code, `unsubscribe ${pattern}: ${message}`);
      });
    }
  } catch (error) {
    const { code, message } = describeError(error);
    logEvent("error", code, `unsubscribe ${pattern}: ${message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Messages

function payloadView(message) {
  let payload = message.payload;
  if (payload instanceof ArrayBuffer) payload = new Uint8Array(payload);
  if (payload instanceof Uint8Array) {
    return { kind: "base64", text: bytesToBase64(payload) };
  }
  if (message.encoding === "base64") {
    return { kind: "base64", text: String(payload) };
  }
  if (typeof payload === "string") return { kind: "text", text: payload };
  return { kind: "json", text: JSON.stringify(payload, null, 2) ?? "undefined" };
}

function field(label, value) {
  if (value === undefined || value === null || value === "") return null;
  return el("span", { class: "field" }, `${label} `, el("b", { text: String(value) }));
}

function showMessage(message, pattern) {
  receivedTotal += 1;
  ui.messageCount.textContent = String(receivedTotal);
  if (ui.pause.checked) return;
  const payload = payloadView(message);
  const time = typeof message.timestamp === "number" ? message.timestamp : Date.now();
  const item = el(
    "li",
    {
      "data-testid": "message",
      "data-channel": message.channel,
      "data-subscription": message.subscription ?? pattern,
      "data-payload-kind": payload.kind,
    },
    el(
      "div",
      { class: "head" },
      el("span", { class: "channel", "data-testid": "message-channel", text: message.channel }),
      payload.kind === "base64"
        ? el("span", { class: "badge", "data-testid": "base64", text: "base64", title: "binary payload, shown as base64" })
        : payload.kind === "text"
          ? el("span", { class: "badge", text: "text", title: "a string payload" })
          : null,
      field("subscription", message.subscription ?? pattern),
      field("key", message.key),
      field("headers", headersText(message.headers)),
      field("position", positionText(message.position)),
      field("content type", message.contentType),
      field("message id", message.messageId),
      field("correlation id", message.correlationId),
      el("span", { class: "time", text: clock(time), title: new Date(time).toISOString() }),
    ),
    el("pre", { "data-testid": "payload", text: payload.text }),
  );
  ui.messages.prepend(item);
  trimList(ui.messages, MESSAGE_LIMIT);
}

// ---------------------------------------------------------------------------------------------
// Publishing

function parseHeaders(text) {
  const headers = {};
  for (const [index, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Error(`headers line ${index + 1}: write it as name: value`);
    headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
  }
  return Object.keys(headers).length ? headers : undefined;
}

function readPublishForm() {
  const channel = ui.pubChannel.value.trim();
  if (!channel) throw new Error("a channel is needed");
  const mode = ui.publishForm.querySelector('input[name="pub-mode"]:checked')?.value ?? "json";
  const raw = ui.pubPayload.value;
  let payload;
  if (mode === "json") {
    try {
      payload = JSON.parse(raw);
    } catch (error) {
      throw new Error(`payload is not valid JSON (${error.message}); choose "text" to send it as text`);
    }
  } else if (mode === "base64") {
    payload = base64ToBytes(raw.replace(/\s+/g, ""));
  } else {
    payload = raw;
  }
  const options = {};
  const key = ui.pubKey.value;
  if (key !== "") options.key = key;
  const headers = parseHeaders(ui.pubHeaders.value);
  if (headers) options.headers = headers;
  return { channel, payload, options };
}

async function publish() {
  ui.pubProblem.hidden = true;
  if (!client) {
    ui.pubProblem.textContent = "Connect first.";
    ui.pubProblem.hidden = false;
    return;
  }
  let request;
  try {
    request = readPublishForm();
  } catch (error) {
    ui.pubProblem.textContent = error.message;
    ui.pubProblem.hidden = false;
    return;
  }
  const outcome = el("span", { class: "outcome", "data-testid": "ack-outcome", text: "waiting…" });
  const detail = el("span", { class: "detail", "data-testid": "ack-detail" });
  const item = el(
    "li",
    { "data-testid": "ack", "data-result": "pending", "data-channel": request.channel },
    el("span", { class: "channel", text: request.channel }),
    outcome,
    detail,
  );
  ui.acks.prepend(item);
  trimList(ui.acks, ACK_LIMIT);
  const started = performance.now();
  const took = () => `${Math.round(performance.now() - started)} ms`;
  try {
    const ack = await client.publish(request.channel, request.payload, request.options);
    const position = positionText(ack?.position);
    item.dataset.result = "ok";
    outcome.textContent = "ok";
    detail.textContent = [position, took()].filter(Boolean).join(" · ");
    if (position) item.dataset.position = position;
  } catch (error) {
    const { code, message } = describeError(error);
    item.dataset.result = "error";
    item.dataset.code = code;
    outcome.textContent = code;
    detail.textContent = `${message} · ${took()}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

ui.endpoint.textContent = wsUrl;
ui.messageLimit.textContent = String(MESSAGE_LIMIT);

ui.connectForm.addEventListener("submit", (event) => {
  event.preventDefault();
  connect();
});
ui.disconnect.addEventListener("click", disconnect);
ui.routesReload.addEventListener("click", loadRoutes);
ui.subFrom.addEventListener("change", () => {
  ui.subFromTime.hidden = ui.subFrom.value !== "timestamp";
});
ui.subscribeForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const pattern = ui.subPattern.value.trim();
  if (!pattern) return;
  const from = fromOption();
  if (from === null) {
    logEvent("error", "invalid_time", "choose the time to start from");
    return;
  }
  subscribe(pattern, from);
});
ui.publishForm.addEventListener("submit", (event) => {
  event.preventDefault();
  publish();
});
ui.clear.addEventListener("click", () => {
  ui.messages.replaceChildren();
  receivedTotal = 0;
  ui.messageCount.textContent = "0";
});
ui.clearEvents.addEventListener("click", () => ui.events.replaceChildren());

setState("closed");
connect();
