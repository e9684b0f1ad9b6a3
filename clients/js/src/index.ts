/**
 * @wsbridge/client: a typed client for the wsbridge WebSocket gateway, for browsers and Node.js.
 *
 * ```ts
 * import { Client } from "@wsbridge/client";
 * const client = new Client("wss://gw.example.com/ws", { token: async () => fetchToken() });
 * const sub = client.subscribe("site/+/temp");
 * sub.on("message", (m) => console.log(m.channel, m.payload));
 * await client.publish("site/berlin/cmd", { on: true });
 * ```
 */
export { Client, type ClientEvents } from "./client.js";
export { Subscription, type SubscriptionEvents, type SubscriptionState } from "./subscription.js";
export { WsbridgeError } from "./errors.js";
export type {
  ClientOptions,
  ClientState,
  Message,
  Position,
  PublishAck,
  PublishOptions,
  Route,
  StartPosition,
  Status,
  SubscribeOptions,
  TokenSource,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
