//! The device-side codec: rumqttd's own MQTT codecs, wrapped so sensorhub sees every packet of
//! every device connection before the router does.
//!
//! Two jobs, both impossible from behind rumqttd's router:
//! - accept CONNECTs with keep-alive 0 (MQTT's "no keep-alive"), which rumqttd refuses;
//! - hand each PUBLISH on `sensors/#` to the local log before any packet, the PUBACK above all,
//!   is written back on that connection. A reading the broker acknowledged is therefore already
//!   in the log, and a process crash cannot lose it.
//!
//! Messages are staged per connection as they are decoded and written to the log as one batch
//! when the codec runs out of buffered bytes or is about to encode a reply. When the log refuses
//! a batch (full, or closing for shutdown) the codec fails the connection: nothing staged is
//! acknowledged, so the publisher keeps it and sends it again. This module must not interpret
//! payloads; judging them is `domain::decode`'s job, later.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol};

use crate::domain::{Captured, Timestamp, is_reading_topic};
use crate::metrics::Metrics;

/// Where captured messages go: returns `Err` when they cannot be kept.
pub type CaptureSink = Arc<dyn Fn(&[Captured]) -> Result<(), Refused> + Send + Sync>;

/// Why the sink did not keep a batch: its own error, whole, for the one line that reports it.
/// (The broker does not know the sink's type: it must not import the journal.)
#[derive(Debug, thiserror::Error)]
#[error("the local log did not take the batch")]
pub struct Refused(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// The keep-alive given to clients that asked for none: about 18 hours, with rumqttd's 1.5
/// grace factor about 27, which is as close to "off" as its u16 seconds allow.
pub const KEEP_ALIVE_FOR_ZERO: u16 = u16::MAX;

pub struct Capture<P> {
    inner: P,
    sink: CaptureSink,
    metrics: Arc<Metrics>,
    max_payload_bytes: usize,
    /// Decoded and not yet in the log. `Protocol::write` takes `&self`, hence the lock; a codec
    /// belongs to one connection task, so it is never contended.
    staged: Mutex<Vec<Captured>>,
    /// MQTT 5 topic aliases of this connection, so aliased publishes are captured too.
    aliases: HashMap<u16, Bytes>,
}

impl<P: fmt::Debug> fmt::Debug for Capture<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("inner", &self.inner)
            .field("staged", &self.staged().len())
            .finish_non_exhaustive()
    }
}

impl<P: Clone> Clone for Capture<P> {
    /// rumqttd clones the server's codec for each new connection: each gets empty state.
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            Arc::clone(&self.sink),
            Arc::clone(&self.metrics),
            self.max_payload_bytes,
        )
    }
}

impl<P> Capture<P> {
    pub fn new(
        inner: P,
        sink: CaptureSink,
        metrics: Arc<Metrics>,
        max_payload_bytes: usize,
    ) -> Self {
        Self {
            inner,
            sink,
            metrics,
            max_payload_bytes,
            staged: Mutex::new(Vec::new()),
            aliases: HashMap::new(),
        }
    }

    fn stage(
        &mut self,
        publish: &protocol::Publish,
        properties: Option<&protocol::PublishProperties>,
    ) {
        let mut topic = publish.topic.clone();
        if let Some(alias) = properties.and_then(|p| p.topic_alias) {
            if topic.is_empty() {
                topic = self.aliases.get(&alias).cloned().unwrap_or_default();
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if !is_reading_topic(&topic) {
            return;
        }
        // An empty retained publish deletes the retained message: a broker command, not a reading.
        if publish.retain && publish.payload.is_empty() {
            return;
        }
        self.staged().push(Captured::new(
            Timestamp::now(),
            topic,
            publish.payload.clone(),
            self.max_payload_bytes,
        ));
    }

    fn staged(&self) -> MutexGuard<'_, Vec<Captured>> {
        self.staged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes what is staged to the log. On refusal the staged messages are dropped unacknowledged
    /// and the connection must end.
    fn flush(&self) -> Result<(), protocol::Error> {
        let mut staged = self.staged();
        if staged.is_empty() {
            return Ok(());
        }
        let count = staged.len() as u64;
        let result = (self.sink)(&staged);
        staged.clear();
        match result {
            Ok(()) => {
                self.metrics.captured.fetch_add(count, Ordering::Relaxed);
                Ok(())
            }
            Err(refused) => {
                self.metrics.refused.fetch_add(count, Ordering::Relaxed);
                tracing::error!(
                    refused = count,
                    reason = crate::error_chain(&refused),
                    "REFUSING readings: the local log did not take them; closing the \
                     publisher's connection unacknowledged so it sends them again"
                );
                // rumqttd has no error that means "try later"; any error ends the connection.
                Err(protocol::Error::InvalidProtocol)
            }
        }
    }
}

impl<P: Protocol> Protocol for Capture<P> {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        match self.inner.read_mut(stream, max_size) {
            Ok(Packet::Connect(mut connect, props, will, will_props, login)) => {
                if connect.keep_alive == 0 {
                    connect.keep_alive = KEEP_ALIVE_FOR_ZERO;
                    self.metrics.keep_alive_zero.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Packet::Connect(connect, props, will, will_props, login))
            }
            Ok(Packet::Publish(publish, properties)) => {
                self.stage(&publish, properties.as_ref());
                Ok(Packet::Publish(publish, properties))
            }
            Err(protocol::Error::InsufficientBytes(needed)) => {
                // The end of what the socket gave us: the batch is complete.
                self.flush()?;
                Err(protocol::Error::InsufficientBytes(needed))
            }
            other => other,
        }
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, protocol::Error> {
        // Nothing, an acknowledgement least of all, leaves before the log has what came in.
        self.flush()?;
        self.inner.write(packet, write)
    }
}

impl<P> Drop for Capture<P> {
    fn drop(&mut self) {
        // QoS 0 messages of a closing connection may still be staged; they were never acked,
        // but they did arrive.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rumqttd::protocol::v4::V4;

    use super::*;

    fn sink() -> (CaptureSink, Arc<Mutex<Vec<Captured>>>) {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let to = Arc::clone(&kept);
        let sink: CaptureSink = Arc::new(move |batch: &[Captured]| {
            to.lock().unwrap().extend_from_slice(batch);
            Ok(())
        });
        (sink, kept)
    }

    fn encode(packet: Packet) -> BytesMut {
        let mut out = BytesMut::new();
        V4.write(packet, &mut out).unwrap();
        out
    }

    fn connect(keep_alive: u16) -> Packet {
        Packet::Connect(
            protocol::Connect {
                keep_alive,
                client_id: "dev".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        )
    }

    #[test]
    fn keep_alive_zero_is_accepted_as_very_long() {
        let (sink, _) = sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024);
        let mut stream = encode(connect(0));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert_eq!(c.keep_alive, KEEP_ALIVE_FOR_ZERO),
            other => panic!("{other:?}"),
        }
        let mut stream = encode(connect(30));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert_eq!(c.keep_alive, 30),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sensor_publishes_reach_the_sink_before_any_reply_is_written() {
        let (sink, kept) = sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024);
        let mut stream = encode(Packet::Publish(
            protocol::Publish::new("sensors/temperature", "{}", false),
            None,
        ));
        stream.extend_from_slice(&encode(Packet::Publish(
            protocol::Publish::new("other/topic", "x", false),
            None,
        )));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Publish(..))
        ));
        assert!(
            kept.lock().unwrap().is_empty(),
            "staged until the batch ends"
        );
        let mut out = BytesMut::new();
        codec
            .write(Packet::PingResp(protocol::PingResp), &mut out)
            .unwrap();
        assert_eq!(kept.lock().unwrap().len(), 1, "flushed before the reply");
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Publish(..))
        ));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Err(protocol::Error::InsufficientBytes(_))
        ));
        let kept = kept.lock().unwrap();
        assert_eq!(kept.len(), 1, "other topics are not captured");
        assert_eq!(&kept[0].topic[..], b"sensors/temperature");
    }

    #[test]
    fn a_refused_batch_fails_the_connection() {
        let sink: CaptureSink =
            Arc::new(|_: &[Captured]| Err(Refused(Box::new(std::io::Error::other("full")))));
        let metrics = Arc::new(Metrics::default());
        let mut codec = Capture::new(V4, sink, Arc::clone(&metrics), 1024);
        let mut stream = encode(Packet::Publish(
            protocol::Publish::new("sensors/t", "{}", false),
            None,
        ));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_ok());
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        assert_eq!(metrics.refused.load(Ordering::Relaxed), 1);
        let mut out = BytesMut::new();
        assert!(
            codec
                .write(Packet::PingResp(protocol::PingResp), &mut out)
                .is_ok()
        );
    }
}
