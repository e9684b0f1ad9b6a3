/** Public types of the client API. */
/** Connection state, reported by the client's `state` event. */
export type ClientState = "connecting" | "connected" | "disconnected" | "closed";
/** Where a subscription starts on backends with a log (Kafka); other backends accept only `"latest"`. */
export type StartPosition = "latest" | "earliest" | {
    timestamp: number;
}
/** Partition number (as a string) to the next offset to read. */
 | {
    offsets: Record<string, number>;
};
/** Where a message sits in a partitioned log. */
export interface Position {
    partition: number;
    offset: number;
}
/** A message delivered to a subscription. */
export interface Message {
    /** The concrete channel the message was published on. */
    channel: string;
    /** The pattern of the subscription it is delivered for. */
    subscription: string;
    /**
     * JSON protocol: the JSON value the gateway made of the broker's bytes, or a `Uint8Array`
     * when the bytes are binary (sent base64-encoded by the gateway).
     * Protobuf protocol: always a `Uint8Array` of the broker's bytes.
     */
    payload: unknown;
    key?: string;
    /** Header name to value; a name the broker sent several times maps to an array of its values. */
    headers?: Record<string, string | string[]>;
    contentType?: string;
    messageId?: string;
    correlationId?: string;
    /** Milliseconds since the Unix epoch, when the broker knows it. */
    timestamp?: number;
    /** Partitioned logs (Kafka): where the message sits. */
    position?: Position;
}
/** A status event of the gateway (docs/PROTOCOL.md, "Status codes"). */
export interface Status {
    /** `backend_down`, `backend_up`, `messages_dropped`, `gap`, `decode_error`, `subscription_revoked`, `shutting_down`, ... */
    code: string;
    message: string;
    backend?: string;
    /** The subscriptions of this connection the event concerns. */
    subscriptions?: string[];
    /** `messages_dropped`: how many. */
    count?: number;
    /** `gap`: the partition, the offset asked for and the first offset still held. */
    partition?: number;
    requestedOffset?: number;
    availableOffset?: number;
    /** `shutting_down`: when the gateway closes the connection, in ms from the status. */
    reconnectAfterMs?: number;
}
export interface SubscribeOptions {
    /** Where to start (default `"latest"`). Only the first subscribe uses it: reconnects resume. */
    from?: StartPosition;
}
export interface PublishOptions {
    /** Message key, for backends with keys. */
    key?: string;
    /** Message headers / properties. */
    headers?: Record<string, string>;
    /** Partition, for partitioned backends. */
    partition?: number;
    /** Overrides the client's `requestTimeout` for this publish, in ms. */
    timeout?: number;
}
/** What a publish resolves with once the broker has acknowledged it. */
export interface PublishAck {
    /** Partitioned logs: where the message was written. */
    position?: Position;
}
/** A route this principal may use, from `GET /routes`. */
export interface Route {
    /** The channel template, e.g. `site/{site}/#`. */
    channel: string;
    /** The template with each `{name}` as `+`, ready to subscribe to. */
    pattern: string;
    backend: string;
    /** `subscribe`, `publish`. */
    operations: string[];
}
/** A token, or a function returning one (called on every connect and before every refresh). */
export type TokenSource = string | (() => string | Promise<string>);
/** The part of the standard `WebSocket` the client uses. */
export interface WebSocketLike {
    binaryType: string;
    readonly readyState: number;
    onopen: ((event: unknown) => void) | null;
    onmessage: ((event: {
        data: unknown;
    }) => void) | null;
    onclose: ((event: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((event: unknown) => void) | null;
    send(data: string | Uint8Array): void;
    close(code?: number, reason?: string): void;
}
/** A `WebSocket` constructor: the browser's, Node 22's global one, or the `ws` package's. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;
export interface ClientOptions {
    /** JWT for gateways with `auth.mode = "jwt"`, sent as a `Sec-WebSocket-Protocol` entry. */
    token?: TokenSource;
    /** `"json"` (default, `wsbridge.v1.json`) or `"protobuf"` (`wsbridge.v1.protobuf`). */
    protocol?: "json" | "protobuf";
    /** WebSocket implementation; default `globalThis.WebSocket`. */
    WebSocket?: WebSocketConstructor;
    /** fetch implementation for `GET /routes`; default `globalThis.fetch`. */
    fetch?: typeof fetch;
    /** URL of `GET /routes`; default: the WebSocket URL with `http(s)` and its last path segment replaced by `routes`. */
    routesUrl?: string;
    /** Backoff between reconnect attempts: full jitter, doubling from this (ms, default 500) ... */
    minReconnectDelay?: number;
    /** ... up to this (ms, default 20000). */
    maxReconnectDelay?: number;
    /** A WebSocket handshake that has not completed after this many ms is abandoned (default 10000). */
    connectTimeout?: number;
    /** How long a sent request may wait for its answer, in ms (default 15000). */
    requestTimeout?: number;
    /** Publishing while disconnected: `"queue"` (default) waits for the connection, `"fail"` rejects at once. */
    offlinePublish?: "queue" | "fail";
    /** How long a publish waits for a connection with `offlinePublish: "queue"`, in ms (default 10000). */
    publishQueueTimeout?: number;
    /** Refresh the token this many ms before it expires (default 30000; at the latest halfway through its life). */
    tokenRefreshMargin?: number;
    /** Send an application `ping` this often (ms, default 25000, 0 = never); no `pong` within `requestTimeout` drops the connection and reconnects. */
    pingInterval?: number;
}
