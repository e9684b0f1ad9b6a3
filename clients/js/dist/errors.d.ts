/**
 * The one error type the client rejects promises with and emits in `error` events.
 *
 * `code` is either one of the gateway's error codes (docs/PROTOCOL.md: `no_route`, `forbidden`,
 * `invalid_token`, `backend_unavailable`, ...) or one of the client's own:
 *
 * | code | meaning |
 * |---|---|
 * | `timeout` | no answer within `requestTimeout`, or a queued publish found no connection within `publishQueueTimeout` |
 * | `disconnected` | not connected and `offlinePublish: "fail"`, or the connection was lost before the gateway answered (the outcome is unknown) |
 * | `closed` | `client.close()` was called, or the client stopped for good |
 * | `token_unavailable` | the `token` function threw or returned something that is not a non-empty string |
 * | `invalid_payload` | the payload cannot be sent (e.g. `undefined`) |
 */
export declare class WsbridgeError extends Error {
    /** Machine-readable code: the gateway's error code or one of the client codes above. */
    readonly code: string;
    constructor(code: string, message: string);
}
