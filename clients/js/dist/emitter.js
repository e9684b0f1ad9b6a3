/** A small typed event emitter that works the same in browsers and Node. */
export class Emitter {
    #listeners = new Map();
    /** Adds a listener; returns a function that removes it again. */
    on(event, listener) {
        let set = this.#listeners.get(event);
        if (!set) {
            set = new Set();
            this.#listeners.set(event, set);
        }
        set.add(listener);
        return () => this.off(event, listener);
    }
    /** Adds a listener that is removed after its first call. */
    once(event, listener) {
        const off = this.on(event, (...args) => {
            off();
            listener(...args);
        });
        return off;
    }
    /** Removes a listener added with `on`. */
    off(event, listener) {
        this.#listeners.get(event)?.delete(listener);
    }
    /**
     * Calls every listener of `event`. A listener that throws does not stop the others nor the
     * client; its exception is reported the way the platform reports uncaught errors.
     * @internal
     */
    emit(event, ...args) {
        const set = this.#listeners.get(event);
        if (!set)
            return;
        for (const listener of [...set]) {
            try {
                listener(...args);
            }
            catch (error) {
                setTimeout(() => {
                    throw error;
                }, 0);
            }
        }
    }
}
