/** A subscription handle: its events, its state, and what it needs to resume after a reconnect. */
import { Emitter } from "./emitter.js";
import type { WsbridgeError } from "./errors.js";
import type { Message, Status } from "./types.js";
export type SubscriptionState = "pending" | "active" | "closed";
export type SubscriptionEvents = {
    /** A message for this subscription, in the order the backend delivered them. */
    message: [message: Message];
    /** A gateway status naming this subscription: `backend_down`, `backend_up`, `gap`, `messages_dropped`, ... */
    status: [status: Status];
    /**
     * The gateway refused the subscribe. With a code that may pass (`backend_unavailable`,
     * `backend_timeout`, `rate_limited`, `too_many_replays`) the client retries with backoff and
     * `state` stays `"pending"`; otherwise the subscription ends (`state` is `"closed"`).
     * Also `subscription_revoked` when a token refresh removed the right to it.
     */
    error: [error: WsbridgeError];
    /** The gateway confirmed the subscription: after the first subscribe and after every resubscribe. */
    subscribed: [];
};
/** The controller a subscription reports to; implemented by the client. */
export interface SubscriptionOwner {
    unsubscribeHandle(sub: Subscription): Promise<void>;
}
export declare class Subscription extends Emitter<SubscriptionEvents> {
    #private;
    /** The channel or pattern, as subscribed. */
    readonly pattern: string;
    /**
     * Resolves once the gateway first confirms the subscription; rejects with the error that ended
     * it before that (a refused subscribe, `closed`).
     */
    readonly ready: Promise<void>;
    /** `"pending"` until the gateway confirms, `"active"` after, `"closed"` once it has ended. */
    get state(): SubscriptionState;
    /**
     * Per partition, the offset of the last message delivered (logs only), e.g. `{"0": 41}`.
     * A resubscribe starts right after these.
     */
    get positions(): Record<string, number>;
    /** Ends the subscription: no message is delivered after this call. Resolves once the gateway confirms (or at once when offline); never rejects. */
    unsubscribe(): Promise<void>;
}
