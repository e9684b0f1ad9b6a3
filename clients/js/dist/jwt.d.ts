/** The token's `exp` claim in seconds since the epoch, or `undefined` when it has none or is not a JWT. */
export declare function tokenExpiry(token: string): number | undefined;
