//! Sparkplug B edge nodes: their sessions as the writer stored them (online state, last birth
//! and death, bdSeq, devices), and the `online` state of their sensors on `/sensors`.

use std::collections::HashMap;

use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::access::ReadKey;
use super::error::ApiError;
use super::types::Reply;
use super::{ApiState, DEFAULT_PAGE, Tag, to_datetime};
use crate::domain::Timestamp;
use crate::sparkplug::{NodeKey, NodeSession};

pub struct Sparkplug {
    pub state: ApiState,
}

/// A Sparkplug B edge node, as its births and deaths left it.
#[derive(Debug, Object)]
#[oai(rename = "SparkplugNode")]
pub struct NodeOut {
    /// `<group>/<edge node>`: the prefix of its sensors' ids.
    pub node: String,
    pub group_id: String,
    pub edge_node_id: String,
    /// Born and not dead: an NBIRTH with no NDEATH of the same bdSeq since.
    pub online: bool,
    /// The bdSeq of the birth in force.
    #[oai(skip_serializing_if_is_none)]
    pub bd_seq: Option<i64>,
    /// The seq of its last message (0-255, wrapping).
    #[oai(skip_serializing_if_is_none)]
    pub seq: Option<u8>,
    /// When its last NBIRTH arrived.
    #[oai(skip_serializing_if_is_none)]
    pub last_birth: Option<time::OffsetDateTime>,
    /// When its last NDEATH that counted arrived.
    #[oai(skip_serializing_if_is_none)]
    pub last_death: Option<time::OffsetDateTime>,
    /// Set after an unknown alias or a seq gap (the reason code): its data is dead-lettered
    /// until the rebirth sensorhub asked for.
    #[oai(skip_serializing_if_is_none)]
    pub awaiting_rebirth: Option<String>,
    /// Metrics its NBIRTH declared.
    pub metrics: u64,
    /// Its devices, in id order.
    pub devices: Vec<DeviceOut>,
}

/// A device of an edge node.
#[derive(Debug, Object)]
#[oai(rename = "SparkplugDevice")]
pub struct DeviceOut {
    pub device_id: String,
    /// Born (DBIRTH) within its node's session and not dead since.
    pub online: bool,
    #[oai(skip_serializing_if_is_none)]
    pub last_birth: Option<time::OffsetDateTime>,
    #[oai(skip_serializing_if_is_none)]
    pub last_death: Option<time::OffsetDateTime>,
    /// Metrics its DBIRTH declared.
    pub metrics: u64,
}

/// A page of edge nodes.
#[derive(Debug, Object)]
#[oai(rename = "SparkplugNodePage")]
pub struct NodePageOut {
    pub nodes: Vec<NodeOut>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
    /// Whether more nodes follow.
    pub has_more: bool,
}

fn at(ms: Option<i64>) -> Option<time::OffsetDateTime> {
    ms.and_then(Timestamp::from_millis).map(to_datetime)
}

fn node_out(key: &NodeKey, node: NodeSession) -> NodeOut {
    NodeOut {
        node: key.to_string(),
        group_id: key.group().to_owned(),
        edge_node_id: key.node().to_owned(),
        online: node.online,
        bd_seq: node.bd_seq,
        seq: node.seq,
        last_birth: at(node.birth_at),
        last_death: at(node.death_at),
        awaiting_rebirth: node.suspect,
        metrics: node.metrics.len() as u64,
        devices: node
            .devices
            .into_iter()
            .map(|(id, d)| DeviceOut {
                device_id: id,
                online: d.online && node.online,
                last_birth: at(d.birth_at),
                last_death: at(d.death_at),
                metrics: d.metrics.len() as u64,
            })
            .collect(),
    }
}

/// Whether each of `sensor_ids` that belongs to a Sparkplug edge node is online: its node is,
/// and, for a device's metric, its device too. Other sensors are absent from the answer.
pub(super) async fn online(
    state: &ApiState,
    sensor_ids: &[&str],
) -> Result<HashMap<String, bool>, ApiError> {
    let node_of = |id: &str| {
        let mut parts = id.splitn(3, '/');
        let (group, node, rest) = (parts.next()?, parts.next()?, parts.next()?);
        Some((NodeKey::parse(&format!("{group}/{node}"))?, rest.to_owned()))
    };
    let mut keys: Vec<NodeKey> = sensor_ids
        .iter()
        .filter_map(|id| node_of(id))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys.dedup();
    let nodes: HashMap<NodeKey, NodeSession> = state
        .store
        .sparkplug_nodes_in(&keys)
        .await?
        .into_iter()
        .collect();
    let mut online = HashMap::new();
    for id in sensor_ids {
        let Some((key, rest)) = node_of(id) else {
            continue;
        };
        let Some(node) = nodes.get(&key) else {
            continue;
        };
        let state = if node.metrics.contains_name(&rest) {
            Some(node.online)
        } else {
            rest.split_once('/')
                .and_then(|(device, _)| node.devices.get(device))
                .map(|d| node.online && d.online)
        };
        if let Some(state) = state {
            online.insert((*id).to_owned(), state);
        }
    }
    Ok(online)
}

#[OpenApi(tag = "Tag::Sparkplug")]
impl Sparkplug {
    /// Sparkplug B edge nodes
    ///
    /// Every edge node that published on `spBv1.0/...`, in `<group>/<edge node>` order, with
    /// its online state (an NDEATH counts only with the bdSeq of the birth in force), last
    /// birth and death, bdSeq, seq, and devices. Data of a node awaiting a rebirth (after an
    /// unknown alias or a seq gap) goes to dead letters with reason `sparkplug_unknown_alias`
    /// or `sparkplug_seq_gap` until the NBIRTH sensorhub asked for arrives. As the writer last
    /// stored it: up to one batch behind the log. Paged: pass `next_cursor` as `cursor`.
    #[oai(path = "/sparkplug/nodes", method = "get")]
    async fn nodes(
        &self,
        _key: ReadKey,
        /// Nodes per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the previous page's `next_cursor` (a node).
        cursor: Query<Option<String>>,
    ) -> Reply<Json<NodePageOut>> {
        let limit = limit.0.unwrap_or(DEFAULT_PAGE);
        match self
            .state
            .store
            .sparkplug_nodes(cursor.0.as_deref(), limit + 1)
            .await
        {
            Ok(mut found) => {
                let next = (found.len() > limit as usize).then(|| {
                    found.truncate(limit as usize);
                    found[found.len() - 1].0.to_string()
                });
                Reply::Ok(
                    Json(NodePageOut {
                        nodes: found.into_iter().map(|(k, n)| node_out(&k, n)).collect(),
                        has_more: next.is_some(),
                        next_cursor: next,
                    }),
                    None,
                    None,
                )
            }
            Err(e) => ApiError::from(e).into(),
        }
    }
}
