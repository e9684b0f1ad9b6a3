/** The JSON protocol, `wsbridge.v1.json`: one JSON object per text frame. */
import { base64ToBytes, bytesToBase64, type ClientRequest, type Codec, type ServerFrame } from "./frames.js";
import type { Message, Position, Status } from "./types.js";

type Json = Record<string, unknown>;

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function str(value: unknown): string | undefined {
  return typeof value === "string" ? value : undefined;
}

function num(value: unknown): number | undefined {
  return typeof value === "number" && Number.isFinite(value) ? value : undefined;
}

function position(value: unknown): Position | undefined {
  if (!isObject(value)) return undefined;
  const partition = num(value.partition);
  const offset = num(value.offset);
  return partition === undefined || offset === undefined ? undefined : { partition, offset };
}

function headers(value: unknown): Record<string, string | string[]> | undefined {
  if (!isObject(value)) return undefined;
  const out: Record<string, string | string[]> = {};
  for (const [name, v] of Object.entries(value)) {
    if (typeof v === "string") out[name] = v;
    else if (Array.isArray(v)) out[name] = v.map(String);
  }
  return out;
}

/** Copies the fields that are present, so that absent ones stay absent (not `undefined`). */
function assignDefined<T extends object>(target: T, fields: Partial<T>): T {
  for (const [k, v] of Object.entries(fields)) {
    if (v !== undefined) (target as Record<string, unknown>)[k] = v;
  }
  return target;
}

function decodeMessage(f: Json): Message {
  const payload =
    f.encoding === "base64" && typeof f.payload === "string" ? base64ToBytes(f.payload) : f.payload;
  return assignDefined<Message>(
    { channel: str(f.channel) ?? "", subscription: str(f.subscription) ?? "", payload },
    {
      key: str(f.key),
      headers: headers(f.headers),
      contentType: str(f.content_type),
      messageId: str(f.message_id),
      correlationId: str(f.correlation_id),
      timestamp: num(f.timestamp),
      position: position(f.position),
    },
  );
}

function decodeStatus(f: Json): Status {
  return assignDefined<Status>(
    { code: str(f.code) ?? "", message: str(f.message) ?? "" },
    {
      backend: str(f.backend),
      subscriptions: Array.isArray(f.subscriptions) ? f.subscriptions.map(String) : undefined,
      count: num(f.count),
      partition: num(f.partition),
      requestedOffset: num(f.requested_offset),
      availableOffset: num(f.available_offset),
      reconnectAfterMs: num(f.reconnect_after_ms),
    },
  );
}

function id(value: unknown): string | undefined {
  return typeof value === "string" || typeof value === "number" ? String(value) : undefined;
}

export const jsonCodec: Codec = {
  subprotocol: "wsbridge.v1.json",

  encode(request: ClientRequest): string {
    switch (request.type) {
      case "subscribe": {
        const frame: Json = { type: "subscribe", id: request.id, channel: request.channel };
        if (request.from !== undefined && request.from !== "latest") frame.from = request.from;
        return JSON.stringify(frame);
      }
      case "publish": {
        const frame: Json = { type: "publish", id: request.id, channel: request.channel };
        const p = request.payload;
        if (p.kind === "bytes") {
          frame.payload = bytesToBase64(p.bytes);
          frame.encoding = "base64";
        } else {
          frame.payload = p.kind === "text" ? p.text : p.value;
        }
        if (request.key !== undefined) frame.key = request.key;
        if (request.headers !== undefined) frame.headers = request.headers;
        if (request.partition !== undefined) frame.partition = request.partition;
        return JSON.stringify(frame);
      }
      default:
        return JSON.stringify(request);
    }
  },

  decode(data: unknown): ServerFrame | null {
    if (typeof data !== "string") return null;
    let f: unknown;
    try {
      f = JSON.parse(data);
    } catch {
      return null;
    }
    if (!isObject(f)) return null;
    switch (f.type) {
      case "ok": {
        const frameId = id(f.id);
        if (frameId === undefined) return null;
        const pos = position(f.position);
        return pos ? { type: "ok", id: frameId, position: pos } : { type: "ok", id: frameId };
      }
      case "error": {
        const frameId = id(f.id);
        const frame: ServerFrame = { type: "error", code: str(f.code) ?? "", message: str(f.message) ?? "" };
        if (frameId !== undefined) frame.id = frameId;
        return frame;
      }
      case "pong": {
        const frameId = id(f.id);
        return frameId === undefined ? null : { type: "pong", id: frameId };
      }
      case "message":
        return { type: "message", message: decodeMessage(f) };
      case "status":
        return { type: "status", status: decodeStatus(f) };
      default:
        return null;
    }
  },
};
