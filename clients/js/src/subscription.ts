/** A subscription handle: its events, its state, and what it needs to resume after a reconnect. */
import { Emitter } from "./emitter.js";
import type { WsbridgeError } from "./errors.js";
import type { Message, StartPosition, Status } from "./types.js";

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

export class Subscription extends Emitter<SubscriptionEvents> {
  /** The channel or pattern, as subscribed. */
  readonly pattern: string;
  /**
   * Resolves once the gateway first confirms the subscription; rejects with the error that ended
   * it before that (a refused subscribe, `closed`).
   */
  readonly ready: Promise<void>;

  readonly #owner: SubscriptionOwner;
  readonly #from: StartPosition;
  #state: SubscriptionState = "pending";
  /** Last delivered offset per partition, for resuming and for dropping redeliveries. */
  readonly #lastOffsets = new Map<number, number>();
  #resolveReady!: () => void;
  #rejectReady!: (error: WsbridgeError) => void;

  /** @internal */
  constructor(owner: SubscriptionOwner, pattern: string, from: StartPosition) {
    super();
    this.#owner = owner;
    this.pattern = pattern;
    this.#from = from;
    this.ready = new Promise<void>((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    // Nobody has to await `ready`; an unobserved rejection must not be reported as unhandled.
    this.ready.catch(() => {});
  }

  /** `"pending"` until the gateway confirms, `"active"` after, `"closed"` once it has ended. */
  get state(): SubscriptionState {
    return this.#state;
  }

  /**
   * Per partition, the offset of the last message delivered (logs only), e.g. `{"0": 41}`.
   * A resubscribe starts right after these.
   */
  get positions(): Record<string, number> {
    return Object.fromEntries([...this.#lastOffsets].map(([p, o]) => [String(p), o]));
  }

  /** Ends the subscription: no message is delivered after this call. Resolves once the gateway confirms (or at once when offline); never rejects. */
  unsubscribe(): Promise<void> {
    return this.#owner.unsubscribeHandle(this);
  }

  /** The `from` of the next subscribe: the original one, or right after the last delivered message of each partition. @internal */
  resumeFrom(): StartPosition {
    if (this.#lastOffsets.size === 0) return this.#from;
    const offsets: Record<string, number> = {};
    if (typeof this.#from === "object" && "offsets" in this.#from) Object.assign(offsets, this.#from.offsets);
    for (const [partition, offset] of this.#lastOffsets) offsets[String(partition)] = offset + 1;
    return { offsets };
  }

  /** @internal */
  deliver(message: Message): void {
    if (this.#state === "closed") return;
    const pos = message.position;
    if (pos) {
      const last = this.#lastOffsets.get(pos.partition);
      if (last !== undefined && pos.offset <= last) return; // already delivered before a reconnect
      this.#lastOffsets.set(pos.partition, pos.offset);
    }
    this.emit("message", message);
  }

  /** @internal */
  confirmed(): void {
    if (this.#state === "closed") return;
    this.#state = "active";
    this.#resolveReady();
    this.emit("subscribed");
  }

  /** A refused subscribe that will be retried. @internal */
  refused(error: WsbridgeError): void {
    if (this.#state !== "closed") this.emit("error", error);
  }

  /** Ends the subscription; `emitError` also reports `error` to its listeners. @internal */
  end(error: WsbridgeError, emitError: boolean): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#rejectReady(error);
    if (emitError) this.emit("error", error);
  }
}
