use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    swept: Instant,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            swept: Instant::now(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        let mut saved = self.connections.remove(id)?;
        if saved.session_state.as_ref().is_some_and(SessionState::expired) {
            saved.session_state = None;
        }
        Some(saved)
    }

    /// Ends expired sessions (keeping their metrics), at most once a second.
    fn sweep(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.swept) < Duration::from_secs(1) {
            return;
        }
        self.swept = now;
        for saved in self.connections.values_mut() {
            if saved.session_state.as_ref().is_some_and(SessionState::expired) {
                saved.session_state = None;
            }
        }
    }

    /// Save connection tracker
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        lifetime: Option<Duration>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();
        self.sweep();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            expires: lifetime.and_then(|lifetime| Instant::now().checked_add(lifetime)),
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
            },
        );
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
            },
        );
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// When an MQTT 5 session ends (its Session Expiry Interval after the disconnection);
    /// None: never
    pub expires: Option<Instant>,
}

impl SessionState {
    fn expired(&self) -> bool {
        self.expires.is_some_and(|expires| Instant::now() >= expires)
    }
}
