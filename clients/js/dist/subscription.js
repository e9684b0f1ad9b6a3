/** A subscription handle: its events, its state, and what it needs to resume after a reconnect. */
import { Emitter } from "./emitter.js";
export class Subscription extends Emitter {
    /** The channel or pattern, as subscribed. */
    pattern;
    /**
     * Resolves once the gateway first confirms the subscription; rejects with the error that ended
     * it before that (a refused subscribe, `closed`).
     */
    ready;
    #owner;
    #from;
    #state = "pending";
    /** Last delivered offset per partition, for resuming and for dropping redeliveries. */
    #lastOffsets = new Map();
    #resolveReady;
    #rejectReady;
    /** @internal */
    constructor(owner, pattern, from) {
        super();
        this.#owner = owner;
        this.pattern = pattern;
        this.#from = from;
        this.ready = new Promise((resolve, reject) => {
            this.#resolveReady = resolve;
            this.#rejectReady = reject;
        });
        // Nobody has to await `ready`; an unobserved rejection must not be reported as unhandled.
        this.ready.catch(() => { });
    }
    /** `"pending"` until the gateway confirms, `"active"` after, `"closed"` once it has ended. */
    get state() {
        return this.#state;
    }
    /**
     * Per partition, the offset of the last message delivered (logs only), e.g. `{"0": 41}`.
     * A resubscribe starts right after these.
     */
    get positions() {
        return Object.fromEntries([...this.#lastOffsets].map(([p, o]) => [String(p), o]));
    }
    /** Ends the subscription: no message is delivered after this call. Resolves once the gateway confirms (or at once when offline); never rejects. */
    unsubscribe() {
        return this.#owner.unsubscribeHandle(this);
    }
    /** The `from` of the next subscribe: the original one, or right after the last delivered message of each partition. @internal */
    resumeFrom() {
        if (this.#lastOffsets.size === 0)
            return this.#from;
        const offsets = {};
        if (typeof this.#from === "object" && "offsets" in this.#from)
            Object.assign(offsets, this.#from.offsets);
        for (const [partition, offset] of this.#lastOffsets)
            offsets[String(partition)] = offset + 1;
        return { offsets };
    }
    /** @internal */
    deliver(message) {
        if (this.#state === "closed")
            return;
        const pos = message.position;
        if (pos) {
            const last = this.#lastOffsets.get(pos.partition);
            if (last !== undefined && pos.offset <= last)
                return; // already delivered before a reconnect
            this.#lastOffsets.set(pos.partition, pos.offset);
        }
        this.emit("message", message);
    }
    /** @internal */
    confirmed() {
        if (this.#state === "closed")
            return;
        this.#state = "active";
        this.#resolveReady();
        this.emit("subscribed");
    }
    /** A refused subscribe that will be retried. @internal */
    refused(error) {
        if (this.#state !== "closed")
            this.emit("error", error);
    }
    /** Ends the subscription; `emitError` also reports `error` to its listeners. @internal */
    end(error, emitError) {
        if (this.#state === "closed")
            return;
        this.#state = "closed";
        this.#rejectReady(error);
        if (emitError)
            this.emit("error", error);
    }
}
