//! The Sparkplug edge-node sessions (`sparkplug::NodeSession`), one document per node, so the
//! ingest resumes them after a restart without asking every node for a rebirth.
//!
//! `{_id: "<group>/<node>", log_id, applied_to, ...session}`. A write replaces the document only
//! when it is older: from another log, or applied to an earlier position of the same log. Writes
//! therefore commute (the furthest state wins whatever order they land in) and repeat harmlessly;
//! a write that lost the race is a duplicate-key error on the upsert, counted as success.

use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;

use super::{DUPLICATE_KEY, Store, StoreError};
use crate::sparkplug::{NodeKey, NodeSession};

impl Store {
    /// Stores node sessions, each unless a further one is stored already.
    pub async fn save_sparkplug_sessions(
        &self,
        sessions: &[(NodeKey, NodeSession)],
    ) -> Result<(), StoreError> {
        let writes = sessions.iter().map(|(key, node)| async move {
            let mut document = bson::to_document(node).map_err(|e| {
                StoreError::Failed(mongodb::error::Error::custom(format!(
                    "the session of {key} does not convert to BSON: {e}"
                )))
            })?;
            document.insert("_id", key.as_str());
            let applied_to = i64::try_from(node.applied_to).unwrap_or(i64::MAX);
            let filter = doc! {"_id": key.as_str(), "$or": [
                {"log_id": {"$ne": node.log_id.as_str()}},
                {"applied_to": {"$lt": applied_to}},
            ]};
            match self
                .sparkplug
                .replace_one(filter, document)
                .upsert(true)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_duplicate_key(&e) => Ok(()),
                Err(e) => Err(StoreError::from(e)),
            }
        });
        futures_util::future::try_join_all(writes).await?;
        Ok(())
    }

    /// Every stored node session, in key order.
    pub async fn sparkplug_sessions(&self) -> Result<Vec<(NodeKey, NodeSession)>, StoreError> {
        self.find_sparkplug(doc! {}, None).await
    }

    /// Up to `limit` node sessions after `after`, in key order (the API's pages).
    pub async fn sparkplug_nodes(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(NodeKey, NodeSession)>, StoreError> {
        let filter = match after {
            Some(after) => doc! {"_id": {"$gt": after}},
            None => doc! {},
        };
        self.find_sparkplug(filter, Some(limit)).await
    }

    /// The sessions of these nodes (those known).
    pub async fn sparkplug_nodes_in(
        &self,
        keys: &[NodeKey],
    ) -> Result<Vec<(NodeKey, NodeSession)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = keys.iter().map(NodeKey::as_str).collect();
        self.find_sparkplug(doc! {"_id": {"$in": keys}}, None).await
    }

    async fn find_sparkplug(
        &self,
        filter: Document,
        limit: Option<u32>,
    ) -> Result<Vec<(NodeKey, NodeSession)>, StoreError> {
        let mut find = self.sparkplug.find(filter).sort(doc! {"_id": 1});
        if let Some(limit) = limit {
            find = find.limit(i64::from(limit));
        }
        let docs: Vec<Document> = find.await?.try_collect().await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let key = d.get("_id").and_then(Bson::as_str).and_then(NodeKey::parse)?;
                match bson::from_document::<NodeSession>(d) {
                    Ok(node) => Some((key, node)),
                    Err(e) => {
                        tracing::warn!(node = %key, error = %e, "ignoring an unreadable Sparkplug session");
                        None
                    }
                }
            })
            .collect())
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => {
            w.code == DUPLICATE_KEY
        }
        mongodb::error::ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}
