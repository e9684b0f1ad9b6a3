/** Reading a JWT's expiry without verifying it: only to know when to ask for a fresh one. */
import { base64ToBytes, utf8Decode } from "./frames.js";
/** The token's `exp` claim in seconds since the epoch, or `undefined` when it has none or is not a JWT. */
export function tokenExpiry(token) {
    const part = token.split(".")[1];
    if (part === undefined)
        return undefined;
    try {
        const base64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
        const claims = JSON.parse(utf8Decode(base64ToBytes(base64)));
        if (typeof claims !== "object" || claims === null)
            return undefined;
        const exp = claims.exp;
        return typeof exp === "number" && Number.isFinite(exp) ? exp : undefined;
    }
    catch {
        return undefined;
    }
}
