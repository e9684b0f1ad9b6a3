/** Public types of the client API. */
export {};
