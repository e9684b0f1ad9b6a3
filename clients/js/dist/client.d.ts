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
import { Subscription } from "./subscription.js";
import type { ClientOptions, ClientState, PublishAck, PublishOptions, Route, Status, SubscribeOptions } from "./types.js";
export type ClientEvents = {
    /** `connecting` → `connected` → `disconnected` (waiting to reconnect) → `connecting` ... → `closed`. */
    state: [state: ClientState];
    /**
     * Problems that concern the client as a whole: a refused token (`invalid_token`, after which the
     * client is `closed`), a refused origin (`forbidden`, same), a failed refresh, a failing `token`
     * function (`token_unavailable`), an error frame the gateway could not attach to a request.
     */
    error: [error: WsbridgeError];
    /** Every status frame, including those that name no subscription (`shutting_down`). */
    status: [status: Status];
};
export declare class Client extends Emitter<ClientEvents> {
    #private;
    /** The gateway's WebSocket URL. */
    readonly url: string;
    /**
     * Starts connecting at once (after the current task, so listeners added right after the
     * constructor see the first `connecting`).
     */
    constructor(url: string, options?: ClientOptions);
    /** The current connection state. */
    get state(): ClientState;
    /**
     * Subscribes to a channel or pattern. The subscription is sent now or on the next connection and
     * renewed after every reconnect; on logs it resumes right after the last message it delivered.
     */
    subscribe(pattern: string, options?: SubscribeOptions): Subscription;
    /**
     * Publishes to a concrete channel; resolves once the broker has acknowledged it (with its
     * `position` on logs), rejects with a {@link WsbridgeError}. `payload`: a `Uint8Array` (or
     * other binary view) is sent as raw bytes, a string as its UTF-8 text, anything else as JSON.
     */
    publish(channel: string, payload: unknown, options?: PublishOptions): Promise<PublishAck>;
    /**
     * The routes this client's token may use (`GET /routes`). Rejects with `invalid_token` (401),
     * `forbidden` (403), `disconnected` when the gateway cannot be reached, or `timeout`.
     */
    routes(): Promise<Route[]>;
    /**
     * Stops for good: closes the connection, rejects every pending publish with `closed`, ends
     * every subscription. Resolves once the socket has closed (at most about a second later).
     */
    close(): Promise<void>;
}
