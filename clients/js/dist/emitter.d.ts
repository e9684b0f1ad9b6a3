/** A small typed event emitter that works the same in browsers and Node. */
export declare class Emitter<Events extends {
    [name: string]: unknown[];
}> {
    #private;
    /** Adds a listener; returns a function that removes it again. */
    on<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): () => void;
    /** Adds a listener that is removed after its first call. */
    once<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): () => void;
    /** Removes a listener added with `on`. */
    off<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): void;
}
