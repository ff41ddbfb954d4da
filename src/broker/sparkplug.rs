//! The embedded broker's Sparkplug duties (Sparkplug 3.0, "Sparkplug Aware MQTT Server"), on a
//! local link of its own:
//! - the last NBIRTH and DBIRTH of each edge node and device are kept retained under
//!   `$sparkplug/certificates/<the birth's topic>`, so a host application that connects late
//!   learns the aliases without asking for a rebirth;
//! - the rebirth requests the ingest asks for go out as NCMD `Node Control/Rebirth` = true.
//!
//! The certificates are a broker feature, taken from the router like any subscriber takes
//! messages; readings do not depend on them (the capture codec logged the births on arrival).
//! It runs on its own thread and waits on nothing but the link and its queue.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sparkplug::{self, CERTIFICATES_PREFIX, NAMESPACE, NodeKey};

/// The filters of the births this link keeps as certificates.
pub fn birth_filters() -> [String; 2] {
    [
        format!("{NAMESPACE}+/NBIRTH/+"),
        format!("{NAMESPACE}+/DBIRTH/+/+"),
    ]
}

/// How long the link waits for a birth before it looks at the request queue and `stop`.
const POLL: Duration = Duration::from_millis(20);

/// Keeps certificates and sends rebirth requests until `stop` or the router goes away.
/// Blocking: run it on its own thread.
pub fn run(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut rebirths: mpsc::Receiver<NodeKey>,
    stop: &CancellationToken,
) {
    while !stop.is_cancelled() {
        while let Ok(node) = rebirths.try_recv() {
            let at = crate::domain::Timestamp::now().as_millis();
            let payload = sparkplug::rebirth_request(u64::try_from(at).unwrap_or(0));
            match tx.publish(node.ncmd_topic(), payload) {
                Ok(_) => tracing::info!(%node, "asked a Sparkplug edge node for a rebirth"),
                Err(e) => {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
        }
        let next = match rx.recv_deadline(Instant::now() + POLL) {
            Ok(next) => next,
            Err(rumqttd::local::LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "broker link closed");
                return;
            }
        };
        match next {
            Some(Notification::Forward(forward)) => {
                let topic = certificate_topic(&forward.publish.topic);
                let retained = Publish::new(topic, forward.publish.payload, true);
                // `send` is async in name only: it queues and notifies without waiting.
                let sent = tx.send(Packet::Publish(retained, None)).now_or_never();
                if let Some(Err(e)) = sent {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
            Some(Notification::Unschedule) => {
                // Without this the router never delivers again.
                if let Err(e) = rx.ready() {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
            Some(_) | None => {}
        }
    }
}

fn certificate_topic(birth: &[u8]) -> Bytes {
    let mut topic = Vec::with_capacity(CERTIFICATES_PREFIX.len() + birth.len());
    topic.extend_from_slice(CERTIFICATES_PREFIX.as_bytes());
    topic.extend_from_slice(birth);
    topic.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_sit_under_the_sparkplug_prefix() {
        assert_eq!(
            &certificate_topic(b"spBv1.0/g/DBIRTH/n/d")[..],
            b"$sparkplug/certificates/spBv1.0/g/DBIRTH/n/d"
        );
    }
}
