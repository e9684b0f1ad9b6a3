//! The WebSocket client side the benchmark binaries share.

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to `url` and subscribes to `channel`; returns once the gateway answered `ok`.
pub async fn subscriber(url: String, channel: String) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let frame = serde_json::json!({"type": "subscribe", "id": 1, "channel": channel});
    ws.send(Message::Text(frame.to_string().into())).await?;
    while let Some(message) = ws.next().await {
        if let Message::Text(text) = message? {
            let reply: serde_json::Value = serde_json::from_str(&text)?;
            match reply["type"].as_str() {
                Some("ok") => return Ok(ws),
                Some("error") => bail!("subscribe failed: {reply}"),
                _ => {}
            }
        }
    }
    bail!("connection closed before the subscription was confirmed")
}
