/**
 * The binary protocol, `wsbridge.v1.protobuf`: one `wsbridge.v1.ClientFrame` per client frame, one
 * `wsbridge.v1.ServerFrame` per gateway frame (schemas/wsbridge/v1/client.proto). A hand-written
 * encoder and decoder for just these messages: varints, length-delimited fields, maps and nested
 * messages; unknown fields are skipped.
 */
import { type ClientRequest, type Codec, type ServerFrame } from "./frames.js";
/** Appends fields to a growing buffer. */
export declare class ProtoWriter {
    #private;
    /** A varint; negative numbers are sign-extended to 64 bits, as for `int32` and `int64`. */
    varint(value: number | bigint): this;
    varintField(field: number, value: number | bigint): this;
    bytesField(field: number, bytes: Uint8Array): this;
    stringField(field: number, text: string): this;
    /** A nested message; written even when empty, which is what marks a `oneof` case as set. */
    messageField(field: number, write: (w: ProtoWriter) => void): this;
    finish(): Uint8Array;
}
/** Reads fields from a buffer; throws `RangeError` on malformed input. */
export declare class ProtoReader {
    #private;
    constructor(buf: Uint8Array);
    get done(): boolean;
    /** The raw 64-bit varint. */
    varint(): bigint;
    int32(): number;
    int64(): number;
    uint64(): number;
    bool(): boolean;
    /** A view into the buffer; copy it if it must outlive the frame. */
    bytes(): Uint8Array;
    string(): string;
    /** The next field's number and wire type, or `null` at the end. */
    tag(): {
        field: number;
        wireType: number;
    } | null;
    skip(wireType: number): void;
}
/** Decodes a `wsbridge.v1.ServerFrame`; `null` when no known frame is set. */
export declare function decodeServerFrame(bytes: Uint8Array): ServerFrame | null;
/** Encodes a `wsbridge.v1.ClientFrame`. */
export declare function encodeClientFrame(request: ClientRequest): Uint8Array;
export declare const protobufCodec: Codec;
