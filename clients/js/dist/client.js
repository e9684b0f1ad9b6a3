/**
 * The client: one WebSocket to the gateway at a time, reconnected with backoff, with every
 * subscription resubscribed (resuming after the last delivered message on logs), publishes
 * acknowledged or failed with a code, and the token refreshed in-band before it expires.
 *
 * Everything that can wait is bounded: the handshake by `connectTimeout`, each request by
 * `requestTimeout`, a publish made offline by `publishQueueTimeout`.
 */
import { Emitter } from "./emitter.js";
import { WsbridgeError } from "./errors.js";
import { jsonCodec } from "./json.js";
import { tokenExpiry } from "./jwt.js";
import { protobufCodec } from "./protobuf.js";
import { Subscription } from "./subscription.js";
/** Error codes after which a subscribe is retried on the same connection. */
const RETRYABLE_SUBSCRIBE = new Set(["backend_unavailable", "backend_timeout", "rate_limited", "too_many_replays"]);
/** Close code the gateway uses when the connection's token expired. */
const TOKEN_EXPIRED = 4001;
/** `setTimeout` cannot wait longer than this. */
const MAX_TIMER = 2 ** 31 - 1;
/** How long `close()` waits for the socket's closing handshake. */
const CLOSE_WAIT = 1000;
const noop = () => { };
function describe(error) {
    return error instanceof Error ? error.message : String(error);
}
function toPayload(payload) {
    if (payload instanceof Uint8Array)
        return { kind: "bytes", bytes: payload };
    if (payload instanceof ArrayBuffer)
        return { kind: "bytes", bytes: new Uint8Array(payload) };
    if (ArrayBuffer.isView(payload)) {
        return { kind: "bytes", bytes: new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength) };
    }
    if (typeof payload === "string")
        return { kind: "text", text: payload };
    if (payload === undefined || typeof payload === "function" || typeof payload === "symbol" || typeof payload === "bigint") {
        throw new WsbridgeError("invalid_payload", `a ${typeof payload} cannot be published`);
    }
    return { kind: "json", value: payload };
}
/** Resolves the gateway URL: `ws(s)://` as is, `http(s)://` mapped to `ws(s)://`, relative URLs against the page. */
function resolveUrl(url) {
    const base = globalThis.location?.href;
    const parsed = base === undefined ? new URL(url) : new URL(url, base);
    if (parsed.protocol === "http:")
        parsed.protocol = "ws:";
    else if (parsed.protocol === "https:")
        parsed.protocol = "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
        throw new TypeError(`the gateway URL must be ws://, wss://, http:// or https://, got ${url}`);
    }
    return parsed;
}
function defaultRoutesUrl(ws) {
    const u = new URL(ws.href);
    u.protocol = ws.protocol === "wss:" ? "https:" : "http:";
    u.pathname = u.pathname.replace(/[^/]*$/, "routes");
    u.hash = "";
    return u.href;
}
function positive(value, fallback, name) {
    if (value === undefined)
        return fallback;
    if (typeof value !== "number" || !(value >= 0))
        throw new TypeError(`${name} must be a number >= 0`);
    return value;
}
export class Client extends Emitter {
    /** The gateway's WebSocket URL. */
    url;
    #codec;
    #WebSocket;
    #fetch;
    #routesUrl;
    #token;
    #minDelay;
    #maxDelay;
    #connectTimeout;
    #requestTimeout;
    #offlinePublish;
    #queueTimeout;
    #refreshMargin;
    #pingInterval;
    #state = "connecting";
    /** Whether `state` has been emitted yet: the first `connecting` is announced although it is the initial state. */
    #stateAnnounced = false;
    #closed = false;
    /** Bumped for every connection attempt and on close; callbacks of older ones do nothing. */
    #generation = 0;
    #attempt = 0;
    #socket = null;
    #connected = false;
    /** The token the current connection was opened or last refreshed with. */
    #currentToken;
    /** The token of a connection the gateway closed with 4001: known to be expired. */
    #expiredToken;
    #nextId = 1;
    #pending = new Map();
    #subs = new Map();
    #queue = [];
    /** Unsubscribes still on their way, by pattern: a new subscribe to the pattern waits for them. */
    #leaving = new Map();
    #reconnectTimer;
    #connectTimer;
    #refreshTimer;
    #pingTimer;
    #closedPromise;
    /**
     * Starts connecting at once (after the current task, so listeners added right after the
     * constructor see the first `connecting`).
     */
    constructor(url, options = {}) {
        super();
        const resolved = resolveUrl(url);
        this.url = resolved.href;
        this.#codec = options.protocol === "protobuf" ? protobufCodec : jsonCodec;
        if (options.protocol !== undefined && options.protocol !== "json" && options.protocol !== "protobuf") {
            throw new TypeError(`protocol must be "json" or "protobuf", got ${String(options.protocol)}`);
        }
        const ws = options.WebSocket ?? globalThis.WebSocket;
        if (ws === undefined) {
            throw new TypeError("no WebSocket implementation: pass one as the WebSocket option (e.g. from the ws package)");
        }
        this.#WebSocket = ws;
        this.#fetch = options.fetch ?? (typeof fetch === "function" ? fetch.bind(globalThis) : undefined);
        this.#routesUrl = options.routesUrl ?? defaultRoutesUrl(resolved);
        this.#token = options.token;
        this.#minDelay = positive(options.minReconnectDelay, 500, "minReconnectDelay");
        this.#maxDelay = Math.max(this.#minDelay, positive(options.maxReconnectDelay, 20_000, "maxReconnectDelay"));
        this.#connectTimeout = positive(options.connectTimeout, 10_000, "connectTimeout");
        this.#requestTimeout = positive(options.requestTimeout, 15_000, "requestTimeout");
        this.#offlinePublish = options.offlinePublish ?? "queue";
        if (this.#offlinePublish !== "queue" && this.#offlinePublish !== "fail") {
            throw new TypeError(`offlinePublish must be "queue" or "fail", got ${String(options.offlinePublish)}`);
        }
        this.#queueTimeout = positive(options.publishQueueTimeout, 10_000, "publishQueueTimeout");
        this.#refreshMargin = positive(options.tokenRefreshMargin, 30_000, "tokenRefreshMargin");
        this.#pingInterval = positive(options.pingInterval, 25_000, "pingInterval");
        queueMicrotask(() => void this.#connect());
    }
    /** The current connection state. */
    get state() {
        return this.#state;
    }
    /**
     * Subscribes to a channel or pattern. The subscription is sent now or on the next connection and
     * renewed after every reconnect; on logs it resumes right after the last message it delivered.
     */
    subscribe(pattern, options = {}) {
        const owner = { unsubscribeHandle: (sub) => this.#unsubscribe(sub) };
        const sub = new Subscription(owner, pattern, options.from ?? "latest");
        if (this.#closed) {
            queueMicrotask(() => sub.end(new WsbridgeError("closed", "the client is closed"), true));
            return sub;
        }
        if (this.#subs.has(pattern)) {
            const error = new WsbridgeError("already_subscribed", `this client already subscribes to ${JSON.stringify(pattern)}`);
            queueMicrotask(() => sub.end(error, true));
            return sub;
        }
        const slot = { sub, wire: "none", retries: 0 };
        this.#subs.set(pattern, slot);
        if (this.#connected)
            this.#sendSubscribe(slot);
        return sub;
    }
    /**
     * Publishes to a concrete channel; resolves once the broker has acknowledged it (with its
     * `position` on logs), rejects with a {@link WsbridgeError}. `payload`: a `Uint8Array` (or
     * other binary view) is sent as raw bytes, a string as its UTF-8 text, anything else as JSON.
     */
    publish(channel, payload, options = {}) {
        return new Promise((resolve, reject) => {
            if (this.#closed) {
                reject(new WsbridgeError("closed", "the client is closed"));
                return;
            }
            let body;
            try {
                body = toPayload(payload);
            }
            catch (error) {
                reject(error);
                return;
            }
            const entry = { channel, payload: body, options, resolve, reject };
            if (this.#connected) {
                this.#sendPublish(entry);
            }
            else if (this.#offlinePublish === "fail") {
                reject(new WsbridgeError("disconnected", "not connected to the gateway"));
            }
            else {
                entry.queueTimer = setTimeout(() => {
                    const i = this.#queue.indexOf(entry);
                    if (i >= 0)
                        this.#queue.splice(i, 1);
                    reject(new WsbridgeError("timeout", `no connection to the gateway within ${this.#queueTimeout} ms`));
                }, Math.min(this.#queueTimeout, MAX_TIMER));
                this.#queue.push(entry);
            }
        });
    }
    /**
     * The routes this client's token may use (`GET /routes`). Rejects with `invalid_token` (401),
     * `forbidden` (403), `disconnected` when the gateway cannot be reached, or `timeout`.
     */
    async routes() {
        const token = this.#currentToken ?? (await this.#obtainToken());
        const response = await this.#getRoutes(token, this.#requestTimeout);
        const body = (await response.json().catch(() => null));
        if (!response.ok) {
            throw new WsbridgeError(body?.code ?? `http_${response.status}`, body?.message ?? `GET /routes answered ${response.status}`);
        }
        return Array.isArray(body?.routes) ? body.routes : [];
    }
    /**
     * Stops for good: closes the connection, rejects every pending publish with `closed`, ends
     * every subscription. Resolves once the socket has closed (at most about a second later).
     */
    close() {
        if (!this.#closedPromise)
            this.#closedPromise = this.#shutdown(new WsbridgeError("closed", "the client was closed"));
        return this.#closedPromise;
    }
    // ---- connection ----------------------------------------------------------------------------
    #setState(state) {
        if (this.#state === state && this.#stateAnnounced)
            return;
        this.#stateAnnounced = true;
        this.#state = state;
        this.emit("state", state);
    }
    async #obtainToken() {
        const source = this.#token;
        if (source === undefined)
            return undefined;
        let token;
        try {
            token = typeof source === "function" ? await source() : source;
        }
        catch (error) {
            throw new WsbridgeError("token_unavailable", `the token function failed: ${describe(error)}`);
        }
        if (typeof token !== "string" || token === "") {
            throw new WsbridgeError("token_unavailable", "the token function returned no token");
        }
        return token;
    }
    async #connect() {
        if (this.#closed)
            return;
        const generation = ++this.#generation;
        this.#setState("connecting");
        let token;
        try {
            token = await this.#obtainToken();
        }
        catch (error) {
            if (generation !== this.#generation)
                return;
            this.emit("error", error);
            this.#scheduleReconnect();
            return;
        }
        if (generation !== this.#generation)
            return;
        if (token !== undefined && token === this.#expiredToken) {
            // The gateway closed the last connection because this very token expired: offering it again
            // cannot succeed (and within the second of its `exp` a handshake may still pass, only to be
            // closed at once, over and over).
            const refusal = new WsbridgeError("invalid_token", "token expired");
            this.emit("error", refusal);
            void this.#shutdown(refusal);
            return;
        }
        const protocols = [this.#codec.subprotocol];
        // Browsers cannot set headers on a WebSocket: the token travels as a subprotocol entry.
        if (token !== undefined)
            protocols.push(`access_token.${token}`);
        let socket;
        try {
            socket = new this.#WebSocket(this.url, protocols);
        }
        catch (error) {
            this.emit("error", new WsbridgeError("disconnected", `cannot open a WebSocket: ${describe(error)}`));
            this.#scheduleReconnect();
            return;
        }
        socket.binaryType = "arraybuffer";
        this.#socket = socket;
        let opened = false;
        this.#connectTimer = setTimeout(() => {
            if (generation !== this.#generation || opened)
                return;
            this.#abandon(socket);
            void this.#handshakeFailed(generation, token);
        }, Math.min(this.#connectTimeout, MAX_TIMER));
        socket.onopen = () => {
            if (generation !== this.#generation)
                return;
            opened = true;
            clearTimeout(this.#connectTimer);
            this.#opened(generation, token);
        };
        socket.onmessage = (event) => {
            if (generation === this.#generation)
                this.#received(event.data);
        };
        // Every error is followed by a close event, which is where it is handled.
        socket.onerror = noop;
        socket.onclose = (event) => {
            if (generation !== this.#generation)
                return;
            clearTimeout(this.#connectTimer);
            this.#socket = null;
            if (opened)
                this.#connectionLost(event.code);
            else
                void this.#handshakeFailed(generation, token);
        };
    }
    /** Detaches a socket's handlers and closes it; no-op handlers stay, since `ws` throws on unhandled errors. */
    #abandon(socket, onClosed = noop) {
        socket.onopen = noop;
        socket.onmessage = noop;
        socket.onerror = noop;
        socket.onclose = onClosed;
        try {
            socket.close(1000);
        }
        catch {
            onClosed();
        }
        if (this.#socket === socket)
            this.#socket = null;
    }
    /**
     * The handshake failed. A browser is not told the HTTP status, so ask `GET /routes` with the
     * same token: 401 means the token is refused and reconnecting cannot help, 403 that this origin
     * is not allowed. Anything else (no answer, 200, 503) is a gateway worth retrying.
     */
    async #handshakeFailed(generation, token) {
        let refusal = null;
        try {
            const response = await this.#getRoutes(token, this.#connectTimeout);
            if (response.status === 401 || response.status === 403) {
                const body = (await response.json().catch(() => null));
                const code = response.status === 401 ? "invalid_token" : "forbidden";
                const fallback = response.status === 401 ? "the gateway refused the token" : "the gateway refused this origin";
                refusal = new WsbridgeError(code, typeof body?.message === "string" ? body.message : fallback);
            }
        }
        catch {
            // Unreachable or unknown: retry.
        }
        if (generation !== this.#generation)
            return;
        if (refusal) {
            this.emit("error", refusal);
            void this.#shutdown(refusal);
            return;
        }
        this.#scheduleReconnect();
    }
    async #getRoutes(token, timeout) {
        if (this.#fetch === undefined)
            throw new WsbridgeError("disconnected", "no fetch implementation");
        const controller = new AbortController();
        const timer = setTimeout(() => controller.abort(), Math.min(timeout, MAX_TIMER));
        try {
            const headers = {};
            if (token !== undefined)
                headers.Authorization = `Bearer ${token}`;
            return await this.#fetch(this.#routesUrl, { headers, signal: controller.signal });
        }
        catch (error) {
            if (controller.signal.aborted)
                throw new WsbridgeError("timeout", `GET ${this.#routesUrl} took longer than ${timeout} ms`);
            throw new WsbridgeError("disconnected", `GET ${this.#routesUrl} failed: ${describe(error)}`);
        }
        finally {
            clearTimeout(timer);
        }
    }
    #scheduleReconnect() {
        if (this.#closed)
            return;
        this.#setState("disconnected");
        // Full jitter: anywhere between 0 and a cap that doubles per failed attempt.
        const cap = Math.min(this.#maxDelay, this.#minDelay * 2 ** Math.min(this.#attempt, 30));
        this.#attempt++;
        clearTimeout(this.#reconnectTimer);
        this.#reconnectTimer = setTimeout(() => void this.#connect(), Math.random() * cap);
    }
    #opened(generation, token) {
        this.#attempt = 0;
        this.#connected = true;
        this.#currentToken = token;
        this.#setState("connected");
        if (generation !== this.#generation)
            return; // a state listener closed the client
        this.#scheduleRefresh(token);
        if (this.#pingInterval > 0) {
            this.#pingTimer = setInterval(() => this.#ping(), Math.min(this.#pingInterval, MAX_TIMER));
        }
        for (const slot of this.#subs.values())
            this.#sendSubscribe(slot);
        for (const entry of this.#queue.splice(0)) {
            clearTimeout(entry.queueTimer);
            this.#sendPublish(entry);
        }
    }
    #connectionLost(code) {
        this.#connected = false;
        this.#stopConnectionTimers();
        const pending = [...this.#pending.values()];
        this.#pending.clear();
        for (const p of pending) {
            clearTimeout(p.timer);
            p.settle({ kind: "lost" });
        }
        for (const slot of this.#subs.values()) {
            slot.wire = "none";
            clearTimeout(slot.retryTimer);
            slot.retries = 0;
        }
        // 4001: the token expired. The next attempt asks the token function for a fresh one.
        if (code === TOKEN_EXPIRED) {
            this.#attempt = 0;
            this.#expiredToken = this.#currentToken;
        }
        this.#scheduleReconnect();
    }
    /** Drops a connection that stopped answering and reconnects. */
    #dropConnection() {
        const socket = this.#socket;
        if (!socket || !this.#connected)
            return;
        this.#generation++;
        this.#abandon(socket);
        this.#connectionLost(1006);
    }
    #stopConnectionTimers() {
        clearTimeout(this.#refreshTimer);
        clearInterval(this.#pingTimer);
        this.#refreshTimer = undefined;
        this.#pingTimer = undefined;
    }
    async #shutdown(reason) {
        this.#closed = true;
        this.#connected = false;
        this.#generation++;
        clearTimeout(this.#reconnectTimer);
        clearTimeout(this.#connectTimer);
        this.#stopConnectionTimers();
        const socket = this.#socket;
        this.#socket = null;
        let socketClosed = Promise.resolve();
        if (socket) {
            socketClosed = new Promise((resolve) => {
                const timer = setTimeout(resolve, CLOSE_WAIT);
                this.#abandon(socket, () => {
                    clearTimeout(timer);
                    resolve();
                });
            });
        }
        const pending = [...this.#pending.values()];
        this.#pending.clear();
        for (const p of pending) {
            clearTimeout(p.timer);
            p.settle({ kind: "abort", error: reason });
        }
        for (const entry of this.#queue.splice(0)) {
            clearTimeout(entry.queueTimer);
            entry.reject(reason);
        }
        const slots = [...this.#subs.values()];
        this.#subs.clear();
        for (const slot of slots) {
            clearTimeout(slot.retryTimer);
            slot.sub.end(reason, false);
        }
        this.#setState("closed");
        await socketClosed;
    }
    // ---- requests ------------------------------------------------------------------------------
    /** Sends a request and calls `settle` exactly once with its outcome. */
    #request(request, settle, timeout) {
        const socket = this.#socket;
        if (!socket || !this.#connected) {
            settle({ kind: "lost" });
            return;
        }
        const id = String(this.#nextId++);
        const pending = { settle };
        pending.timer = setTimeout(() => {
            if (this.#pending.get(id) !== pending)
                return;
            this.#pending.delete(id);
            settle({ kind: "timeout" });
        }, Math.min(timeout, MAX_TIMER));
        this.#pending.set(id, pending);
        try {
            socket.send(this.#codec.encode({ ...request, id }));
        }
        catch {
            // The socket is closing: its close event settles the request as lost.
        }
    }
    #sendPublish(entry) {
        const { key, headers, partition } = entry.options;
        const request = { type: "publish", channel: entry.channel, payload: entry.payload };
        if (key !== undefined)
            request.key = key;
        if (headers !== undefined)
            request.headers = headers;
        if (partition !== undefined)
            request.partition = partition;
        const timeout = entry.options.timeout ?? this.#requestTimeout;
        this.#request(request, (outcome) => {
            switch (outcome.kind) {
                case "reply":
                    if (outcome.frame.type === "error")
                        entry.reject(new WsbridgeError(outcome.frame.code, outcome.frame.message));
                    else
                        entry.resolve(outcome.frame.type === "ok" && outcome.frame.position ? { position: outcome.frame.position } : {});
                    return;
                case "lost":
                    entry.reject(new WsbridgeError("disconnected", "the connection closed before the gateway answered; the message may or may not have been published"));
                    return;
                case "timeout":
                    entry.reject(new WsbridgeError("timeout", `no answer from the gateway within ${timeout} ms; the message may or may not have been published`));
                    return;
                case "abort":
                    entry.reject(outcome.error);
                    return;
            }
        }, timeout);
    }
    #sendSubscribe(slot) {
        if (slot.wire !== "none" || !this.#connected)
            return;
        slot.wire = "pending";
        const generation = this.#generation;
        const pattern = slot.sub.pattern;
        const leaving = this.#leaving.get(pattern);
        if (leaving) {
            // The gateway still holds this pattern for an earlier subscription: subscribing now would
            // meet that one, and its unsubscribe would then end this one.
            void leaving.then(() => {
                if (generation !== this.#generation || this.#subs.get(pattern) !== slot)
                    return;
                slot.wire = "none";
                this.#sendSubscribe(slot);
            });
            return;
        }
        this.#request({ type: "subscribe", channel: pattern, from: slot.sub.resumeFrom() }, (outcome) => {
            if (outcome.kind !== "reply") {
                // Lost or aborted: the next connection subscribes again. Timed out: no answer from a
                // gateway that always answers means the connection is stuck, so drop it.
                slot.wire = "none";
                if (this.#subs.get(pattern) !== slot)
                    slot.unsubscribeAfter?.();
                else if (outcome.kind === "timeout" && generation === this.#generation)
                    this.#dropConnection();
                return;
            }
            const frame = outcome.frame;
            const ok = frame.type !== "error" || frame.code === "already_subscribed";
            if (this.#subs.get(pattern) !== slot) {
                // Unsubscribed while the subscribe was on its way.
                slot.wire = ok ? "active" : "none";
                slot.unsubscribeAfter?.();
                return;
            }
            if (ok) {
                slot.wire = "active";
                slot.retries = 0;
                slot.sub.confirmed();
                return;
            }
            slot.wire = "none";
            const error = new WsbridgeError(frame.code, frame.message);
            if (RETRYABLE_SUBSCRIBE.has(error.code)) {
                slot.sub.refused(error);
                const cap = Math.min(this.#maxDelay, this.#minDelay * 2 ** Math.min(slot.retries++, 30));
                slot.retryTimer = setTimeout(() => {
                    if (generation === this.#generation && this.#subs.get(pattern) === slot)
                        this.#sendSubscribe(slot);
                }, this.#minDelay + Math.random() * cap);
            }
            else {
                this.#subs.delete(pattern);
                slot.sub.end(error, true);
            }
        }, this.#requestTimeout);
    }
    #unsubscribe(sub) {
        const slot = this.#subs.get(sub.pattern);
        if (!slot || slot.sub !== sub)
            return Promise.resolve();
        this.#subs.delete(sub.pattern);
        clearTimeout(slot.retryTimer);
        sub.end(new WsbridgeError("closed", "unsubscribed"), false);
        const done = new Promise((resolve) => {
            const send = () => {
                if (slot.wire !== "active" || !this.#connected) {
                    resolve();
                    return;
                }
                slot.wire = "none";
                // Whatever the answer, the subscription is gone for the caller; never reject.
                this.#request({ type: "unsubscribe", channel: sub.pattern }, () => resolve(), this.#requestTimeout);
            };
            if (slot.wire === "pending")
                slot.unsubscribeAfter = send;
            else
                send();
        });
        this.#leaving.set(sub.pattern, done);
        void done.then(() => {
            if (this.#leaving.get(sub.pattern) === done)
                this.#leaving.delete(sub.pattern);
        });
        return done;
    }
    #ping() {
        const generation = this.#generation;
        this.#request({ type: "ping" }, (outcome) => {
            if (outcome.kind === "timeout" && generation === this.#generation)
                this.#dropConnection();
        }, this.#requestTimeout);
    }
    // ---- token refresh -------------------------------------------------------------------------
    /** Plans the next refresh: `tokenRefreshMargin` before `exp`, and at the latest halfway through the token's remaining life. */
    #scheduleRefresh(token) {
        clearTimeout(this.#refreshTimer);
        this.#refreshTimer = undefined;
        if (token === undefined || typeof this.#token !== "function")
            return;
        const exp = tokenExpiry(token);
        if (exp === undefined)
            return;
        const left = exp * 1000 - Date.now();
        if (left <= 0)
            return; // the gateway closes with 4001; the reconnect fetches a new token
        const delay = Math.max(left - this.#refreshMargin, left / 2);
        this.#refreshTimer = setTimeout(() => void this.#refresh(), Math.min(delay, MAX_TIMER));
    }
    async #refresh() {
        const generation = this.#generation;
        let token;
        try {
            token = await this.#obtainToken();
        }
        catch (error) {
            if (generation !== this.#generation)
                return;
            this.emit("error", error);
            // Try again later; if the token expires meanwhile, the reconnect asks again.
            this.#refreshTimer = setTimeout(() => void this.#refresh(), Math.max(1000, this.#minDelay));
            return;
        }
        if (generation !== this.#generation || !this.#connected || token === undefined)
            return;
        this.#request({ type: "auth", token }, (outcome) => {
            if (generation !== this.#generation || outcome.kind !== "reply")
                return;
            const frame = outcome.frame;
            if (frame.type === "error") {
                // The connection ends with 4001 when the old token expires; the reconnect asks again.
                this.emit("error", new WsbridgeError(frame.code, `token refresh refused: ${frame.message}`));
                return;
            }
            this.#currentToken = token;
            this.#scheduleRefresh(token);
        }, this.#requestTimeout);
    }
    // ---- incoming frames -----------------------------------------------------------------------
    #received(data) {
        const frame = this.#codec.decode(data);
        if (frame === null)
            return;
        switch (frame.type) {
            case "ok":
            case "error":
            case "pong": {
                if (frame.id === undefined) {
                    this.emit("error", new WsbridgeError(frame.code, frame.message));
                    return;
                }
                const pending = this.#pending.get(frame.id);
                if (!pending)
                    return; // answered after its timeout
                this.#pending.delete(frame.id);
                clearTimeout(pending.timer);
                pending.settle({ kind: "reply", frame });
                return;
            }
            case "message": {
                const slot = this.#subs.get(frame.message.subscription);
                slot?.sub.deliver(frame.message);
                return;
            }
            case "status":
                this.#status(frame.status);
                return;
        }
    }
    #status(status) {
        this.emit("status", status);
        for (const pattern of status.subscriptions ?? []) {
            const slot = this.#subs.get(pattern);
            if (!slot)
                continue;
            slot.sub.emit("status", status);
            if (status.code === "subscription_revoked") {
                this.#subs.delete(pattern);
                clearTimeout(slot.retryTimer);
                slot.sub.end(new WsbridgeError("subscription_revoked", status.message), true);
            }
        }
    }
}
