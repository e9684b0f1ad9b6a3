/**
 * The frames of the wire protocol as the client handles them, independent of the encoding.
 * `json.ts` and `protobuf.ts` turn them into text or binary WebSocket frames and back.
 */
import type { Message, Position, StartPosition, Status } from "./types.js";
/** A publish payload after the client has decided how its bytes are formed. */
export type OutgoingPayload = {
    kind: "bytes";
    bytes: Uint8Array;
}
/** Sent to the broker as its UTF-8 text. */
 | {
    kind: "text";
    text: string;
}
/** Sent to the broker as its JSON text. */
 | {
    kind: "json";
    value: unknown;
};
export type ClientRequest = {
    type: "subscribe";
    id: string;
    channel: string;
    from?: StartPosition;
} | {
    type: "unsubscribe";
    id: string;
    channel: string;
} | {
    type: "publish";
    id: string;
    channel: string;
    payload: OutgoingPayload;
    key?: string;
    headers?: Record<string, string>;
    partition?: number;
} | {
    type: "ping";
    id: string;
} | {
    type: "auth";
    id: string;
    token: string;
};
export type ServerFrame = {
    type: "ok";
    id: string;
    position?: Position;
} | {
    type: "error";
    id?: string;
    code: string;
    message: string;
} | {
    type: "pong";
    id: string;
} | {
    type: "message";
    message: Message;
} | {
    type: "status";
    status: Status;
};
/** One of the two client protocols. */
export interface Codec {
    /** The `Sec-WebSocket-Protocol` it is negotiated with. */
    readonly subprotocol: string;
    encode(request: ClientRequest): string | Uint8Array;
    /** `null` for data that is not a frame of this protocol. */
    decode(data: unknown): ServerFrame | null;
}
export declare function utf8Encode(text: string): Uint8Array;
export declare function utf8Decode(bytes: Uint8Array): string;
/** The payload's bytes as the broker will receive them. */
export declare function payloadBytes(payload: OutgoingPayload): Uint8Array;
export declare function bytesToBase64(bytes: Uint8Array): string;
export declare function base64ToBytes(base64: string): Uint8Array;
