/**
 * The frames of the wire protocol as the client handles them, independent of the encoding.
 * `json.ts` and `protobuf.ts` turn them into text or binary WebSocket frames and back.
 */
import type { Message, Position, StartPosition, Status } from "./types.js";

/** A publish payload after the client has decided how its bytes are formed. */
export type OutgoingPayload =
  | { kind: "bytes"; bytes: Uint8Array }
  /** Sent to the broker as its UTF-8 text. */
  | { kind: "text"; text: string }
  /** Sent to the broker as its JSON text. */
  | { kind: "json"; value: unknown };

export type ClientRequest =
  | { type: "subscribe"; id: string; channel: string; from?: StartPosition }
  | { type: "unsubscribe"; id: string; channel: string }
  | {
      type: "publish";
      id: string;
      channel: string;
      payload: OutgoingPayload;
      key?: string;
      headers?: Record<string, string>;
      partition?: number;
    }
  | { type: "ping"; id: string }
  | { type: "auth"; id: string; token: string };

export type ServerFrame =
  | { type: "ok"; id: string; position?: Position }
  | { type: "error"; id?: string; code: string; message: string }
  | { type: "pong"; id: string }
  | { type: "message"; message: Message }
  | { type: "status"; status: Status };

/** One of the two client protocols. */
export interface Codec {
  /** The `Sec-WebSocket-Protocol` it is negotiated with. */
  readonly subprotocol: string;
  encode(request: ClientRequest): string | Uint8Array;
  /** `null` for data that is not a frame of this protocol. */
  decode(data: unknown): ServerFrame | null;
}

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder();

export function utf8Encode(text: string): Uint8Array {
  return utf8Encoder.encode(text);
}

export function utf8Decode(bytes: Uint8Array): string {
  return utf8Decoder.decode(bytes);
}

/** The payload's bytes as the broker will receive them. */
export function payloadBytes(payload: OutgoingPayload): Uint8Array {
  switch (payload.kind) {
    case "bytes":
      return payload.bytes;
    case "text":
      return utf8Encode(payload.text);
    case "json":
      return utf8Encode(JSON.stringify(payload.value));
  }
}

export function bytesToBase64(bytes: Uint8Array): string {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

export function base64ToBytes(base64: string): Uint8Array {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
