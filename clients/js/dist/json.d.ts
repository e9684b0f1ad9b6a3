/** The JSON protocol, `wsbridge.v1.json`: one JSON object per text frame. */
import { type Codec } from "./frames.js";
export declare const jsonCodec: Codec;
