const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder();
export function utf8Encode(text) {
    return utf8Encoder.encode(text);
}
export function utf8Decode(bytes) {
    return utf8Decoder.decode(bytes);
}
/** The payload's bytes as the broker will receive them. */
export function payloadBytes(payload) {
    switch (payload.kind) {
        case "bytes":
            return payload.bytes;
        case "text":
            return utf8Encode(payload.text);
        case "json":
            return utf8Encode(JSON.stringify(payload.value));
    }
}
export function bytesToBase64(bytes) {
    let binary = "";
    const chunk = 0x8000;
    for (let i = 0; i < bytes.length; i += chunk) {
        binary += String.fromCharCode(...bytes.subarray(i, i + chunk));
    }
    return btoa(binary);
}
export function base64ToBytes(base64) {
    const binary = atob(base64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++)
        bytes[i] = binary.charCodeAt(i);
    return bytes;
}
