/**
 * The binary protocol, `wsbridge.v1.protobuf`: one `wsbridge.v1.ClientFrame` per client frame, one
 * `wsbridge.v1.ServerFrame` per gateway frame (schemas/wsbridge/v1/client.proto). A hand-written
 * encoder and decoder for just these messages: varints, length-delimited fields, maps and nested
 * messages; unknown fields are skipped.
 */
import { payloadBytes, utf8Decode, utf8Encode, type ClientRequest, type Codec, type ServerFrame } from "./frames.js";
import type { Message, Position, StartPosition, Status } from "./types.js";

const VARINT = 0;
const FIXED64 = 1;
const LENGTH_DELIMITED = 2;
const FIXED32 = 5;

/** Appends fields to a growing buffer. */
export class ProtoWriter {
  #buf = new Uint8Array(64);
  #len = 0;

  #reserve(n: number): void {
    if (this.#len + n <= this.#buf.length) return;
    let size = this.#buf.length * 2;
    while (size < this.#len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.#buf.subarray(0, this.#len));
    this.#buf = next;
  }

  /** A varint; negative numbers are sign-extended to 64 bits, as for `int32` and `int64`. */
  varint(value: number | bigint): this {
    this.#reserve(10);
    if (typeof value === "number" && value >= 0 && Number.isSafeInteger(value)) {
      let v = value;
      while (v >= 0x80) {
        this.#buf[this.#len++] = (v % 0x80) | 0x80;
        v = Math.floor(v / 0x80);
      }
      this.#buf[this.#len++] = v;
      return this;
    }
    let v = BigInt.asUintN(64, BigInt(value));
    while (v >= 0x80n) {
      this.#buf[this.#len++] = Number(v & 0x7fn) | 0x80;
      v >>= 7n;
    }
    this.#buf[this.#len++] = Number(v);
    return this;
  }

  #tag(field: number, wireType: number): void {
    this.varint(field * 8 + wireType);
  }

  varintField(field: number, value: number | bigint): this {
    this.#tag(field, VARINT);
    return this.varint(value);
  }

  bytesField(field: number, bytes: Uint8Array): this {
    this.#tag(field, LENGTH_DELIMITED);
    this.varint(bytes.length);
    this.#reserve(bytes.length);
    this.#buf.set(bytes, this.#len);
    this.#len += bytes.length;
    return this;
  }

  stringField(field: number, text: string): this {
    return this.bytesField(field, utf8Encode(text));
  }

  /** A nested message; written even when empty, which is what marks a `oneof` case as set. */
  messageField(field: number, write: (w: ProtoWriter) => void): this {
    const nested = new ProtoWriter();
    write(nested);
    return this.bytesField(field, nested.finish());
  }

  finish(): Uint8Array {
    return this.#buf.slice(0, this.#len);
  }
}

/** Reads fields from a buffer; throws `RangeError` on malformed input. */
export class ProtoReader {
  readonly #buf: Uint8Array;
  #pos = 0;

  constructor(buf: Uint8Array) {
    this.#buf = buf;
  }

  get done(): boolean {
    return this.#pos >= this.#buf.length;
  }

  #byte(): number {
    if (this.#pos >= this.#buf.length) throw new RangeError("truncated protobuf message");
    return this.#buf[this.#pos++] as number;
  }

  /** The raw 64-bit varint. */
  varint(): bigint {
    let result = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      const b = this.#byte();
      result |= BigInt(b & 0x7f) << shift;
      if (b < 0x80) return BigInt.asUintN(64, result);
    }
    throw new RangeError("varint longer than 10 bytes");
  }

  /** A varint small enough for a number (tags, lengths). */
  #smallVarint(): number {
    const v = this.varint();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError("length out of range");
    return Number(v);
  }

  int32(): number {
    return Number(BigInt.asIntN(32, this.varint()));
  }

  int64(): number {
    return Number(BigInt.asIntN(64, this.varint()));
  }

  uint64(): number {
    return Number(this.varint());
  }

  bool(): boolean {
    return this.varint() !== 0n;
  }

  /** A view into the buffer; copy it if it must outlive the frame. */
  bytes(): Uint8Array {
    const len = this.#smallVarint();
    if (this.#pos + len > this.#buf.length) throw new RangeError("truncated protobuf message");
    const out = this.#buf.subarray(this.#pos, this.#pos + len);
    this.#pos += len;
    return out;
  }

  string(): string {
    return utf8Decode(this.bytes());
  }

  /** The next field's number and wire type, or `null` at the end. */
  tag(): { field: number; wireType: number } | null {
    if (this.done) return null;
    const tag = this.#smallVarint();
    return { field: Math.floor(tag / 8), wireType: tag % 8 };
  }

  skip(wireType: number): void {
    switch (wireType) {
      case VARINT:
        this.varint();
        return;
      case FIXED64:
        this.#advance(8);
        return;
      case LENGTH_DELIMITED:
        this.bytes();
        return;
      case FIXED32:
        this.#advance(4);
        return;
      default:
        throw new RangeError(`unsupported wire type ${wireType}`);
    }
  }

  #advance(n: number): void {
    if (this.#pos + n > this.#buf.length) throw new RangeError("truncated protobuf message");
    this.#pos += n;
  }
}

/** Calls `onField` for every field; the callback returns false for fields it does not read. */
function readFields(bytes: Uint8Array, onField: (field: number, wireType: number, r: ProtoReader) => boolean): void {
  const r = new ProtoReader(bytes);
  for (let t = r.tag(); t !== null; t = r.tag()) {
    if (!onField(t.field, t.wireType, r)) r.skip(t.wireType);
  }
}

function decodePosition(bytes: Uint8Array): Position {
  const pos: Position = { partition: 0, offset: 0 };
  readFields(bytes, (field, wt, r) => {
    if (wt !== VARINT) return false;
    if (field === 1) pos.partition = r.int32();
    else if (field === 2) pos.offset = r.int64();
    else return false;
    return true;
  });
  return pos;
}

function decodeDelivery(bytes: Uint8Array): Message {
  const m: Message = { channel: "", subscription: "", payload: new Uint8Array(0) };
  const headers: Record<string, string | string[]> = {};
  let hasHeaders = false;
  readFields(bytes, (field, wt, r) => {
    if (wt === LENGTH_DELIMITED) {
      switch (field) {
        case 1: m.channel = r.string(); return true;
        case 2: m.subscription = r.string(); return true;
        case 3: m.payload = r.bytes().slice(); return true;
        case 4: m.key = r.string(); return true;
        case 5: {
          let name = "";
          let value = "";
          readFields(r.bytes(), (f, w, hr) => {
            if (w !== LENGTH_DELIMITED) return false;
            if (f === 1) name = hr.string();
            else if (f === 2) value = hr.string();
            else return false;
            return true;
          });
          const prev = headers[name];
          if (prev === undefined) headers[name] = value;
          else if (Array.isArray(prev)) prev.push(value);
          else headers[name] = [prev, value];
          hasHeaders = true;
          return true;
        }
        case 6: m.contentType = r.string(); return true;
        case 7: m.messageId = r.string(); return true;
        case 8: m.correlationId = r.string(); return true;
        case 10: m.position = decodePosition(r.bytes()); return true;
      }
    } else if (wt === VARINT && field === 9) {
      m.timestamp = r.int64();
      return true;
    }
    return false;
  });
  if (hasHeaders) m.headers = headers;
  return m;
}

function decodeStatus(bytes: Uint8Array): Status {
  const s: Status = { code: "", message: "" };
  const subscriptions: string[] = [];
  readFields(bytes, (field, wt, r) => {
    if (wt === LENGTH_DELIMITED) {
      switch (field) {
        case 1: s.code = r.string(); return true;
        case 2: s.message = r.string(); return true;
        case 3: s.backend = r.string(); return true;
        case 4: subscriptions.push(r.string()); return true;
      }
    } else if (wt === VARINT) {
      switch (field) {
        case 5: s.count = r.uint64(); return true;
        case 6: s.partition = r.int32(); return true;
        case 7: s.requestedOffset = r.int64(); return true;
        case 8: s.availableOffset = r.int64(); return true;
        case 9: s.reconnectAfterMs = r.uint64(); return true;
      }
    }
    return false;
  });
  if (subscriptions.length > 0) s.subscriptions = subscriptions;
  return s;
}

/** Decodes a `wsbridge.v1.ServerFrame`; `null` when no known frame is set. */
export function decodeServerFrame(bytes: Uint8Array): ServerFrame | null {
  let frame: ServerFrame | null = null;
  readFields(bytes, (field, wt, r) => {
    if (wt !== LENGTH_DELIMITED) return false;
    switch (field) {
      case 1: {
        let id = "";
        let position: Position | undefined;
        readFields(r.bytes(), (f, w, fr) => {
          if (w !== LENGTH_DELIMITED) return false;
          if (f === 1) id = fr.string();
          else if (f === 2) position = decodePosition(fr.bytes());
          else return false;
          return true;
        });
        frame = position ? { type: "ok", id, position } : { type: "ok", id };
        return true;
      }
      case 2: {
        let id: string | undefined;
        let code = "";
        let message = "";
        readFields(r.bytes(), (f, w, fr) => {
          if (w !== LENGTH_DELIMITED) return false;
          if (f === 1) id = fr.string();
          else if (f === 2) code = fr.string();
          else if (f === 3) message = fr.string();
          else return false;
          return true;
        });
        frame = id === undefined ? { type: "error", code, message } : { type: "error", id, code, message };
        return true;
      }
      case 3: {
        let id = "";
        readFields(r.bytes(), (f, w, fr) => {
          if (f !== 1 || w !== LENGTH_DELIMITED) return false;
          id = fr.string();
          return true;
        });
        frame = { type: "pong", id };
        return true;
      }
      case 4:
        frame = { type: "message", message: decodeDelivery(r.bytes()) };
        return true;
      case 5:
        frame = { type: "status", status: decodeStatus(r.bytes()) };
        return true;
    }
    return false;
  });
  return frame;
}

function writeStartPosition(w: ProtoWriter, from: Exclude<StartPosition, "latest">): void {
  if (from === "earliest") {
    w.varintField(2, 1);
  } else if ("timestamp" in from) {
    w.varintField(3, from.timestamp);
  } else {
    w.messageField(4, (offsets) => {
      for (const [partition, next] of Object.entries(from.offsets)) {
        offsets.messageField(1, (entry) => entry.varintField(1, Number(partition)).varintField(2, next));
      }
    });
  }
}

/** Encodes a `wsbridge.v1.ClientFrame`. */
export function encodeClientFrame(request: ClientRequest): Uint8Array {
  const w = new ProtoWriter().stringField(1, request.id);
  switch (request.type) {
    case "subscribe":
      w.messageField(2, (s) => {
        s.stringField(1, request.channel);
        const from = request.from;
        if (from !== undefined && from !== "latest") s.messageField(2, (p) => writeStartPosition(p, from));
      });
      break;
    case "unsubscribe":
      w.messageField(3, (u) => u.stringField(1, request.channel));
      break;
    case "publish":
      w.messageField(4, (p) => {
        p.stringField(1, request.channel);
        const bytes = payloadBytes(request.payload);
        if (bytes.length > 0) p.bytesField(2, bytes);
        if (request.key !== undefined) p.stringField(3, request.key);
        for (const [name, value] of Object.entries(request.headers ?? {})) {
          p.messageField(4, (entry) => entry.stringField(1, name).stringField(2, value));
        }
        if (request.partition !== undefined) p.varintField(5, request.partition);
      });
      break;
    case "ping":
      w.messageField(5, () => {});
      break;
    case "auth":
      w.messageField(6, (a) => a.stringField(1, request.token));
      break;
  }
  return w.finish();
}

function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return null;
}

export const protobufCodec: Codec = {
  subprotocol: "wsbridge.v1.protobuf",
  encode: encodeClientFrame,
  decode(data: unknown): ServerFrame | null {
    const bytes = toBytes(data);
    if (bytes === null) return null;
    try {
      return decodeServerFrame(bytes);
    } catch {
      return null;
    }
  },
};
