//! A peer's Automerge sync state for one document, held whole only while an exchange is
//! under way.
//!
//! Once the peer has everything the server has and has said so (its heads are the
//! document's, the server's last message named them too, and nothing sent or asked is
//! unacknowledged), the state is *parked*: what remains is the heads both sides share, held
//! once and shared with every other peer parked at the same heads, and Automerge's flags.
//! When the peer is next involved the state is rebuilt whole. The rebuilt state makes
//! Automerge send what the parked one would have: its `have` says "everything up to these
//! heads", which is what the peer's own heads said, without the bloom filter of the changes
//! it had named since an older sync (the peer has all of them: they are ancestors of its
//! heads).
//!
//! Why: a household that 200 phones edited offline has 200 heads, and each phone's whole
//! state holds four copies of them (shared, last sent, theirs, their `have`); at 200 phones
//! and 10 such households that was about 65 MB of the server's 227 MB peak heap
//! (heaptrack, 1 December 2026). Must not: decide what to send (Automerge does), or touch
//! storage (the actor persists the shared heads).

use std::collections::BTreeSet;
use std::sync::Arc;

use automerge::sync::{self, BloomFilter, Capability, Have};
use automerge::ChangeHash;

/// A document's heads, allocated once and shared by the peers parked at them.
pub(super) type Heads = Arc<[ChangeHash]>;

#[derive(Debug)]
pub(super) enum PeerSync {
    /// An exchange is under way (or the peer was never settled): Automerge's whole state.
    Live(sync::State),
    /// Settled at `heads`; see the module comment.
    Parked(Parked),
}

/// What a settled state keeps besides its heads: the flags Automerge reads that are not
/// implied by being settled.
#[derive(Debug)]
pub(super) struct Parked {
    heads: Heads,
    in_flight: bool,
    their_capabilities: Option<Vec<Capability>>,
    read_only: bool,
    peer_read_only: bool,
}

impl PeerSync {
    pub(super) fn new(state: sync::State) -> Self {
        Self::Live(state)
    }

    /// The whole state, rebuilt first if it was parked.
    pub(super) fn live(&mut self) -> &mut sync::State {
        if let Self::Parked(p) = self {
            let heads = p.heads.to_vec();
            *self = Self::Live(sync::State {
                shared_heads: heads.clone(),
                last_sent_heads: heads.clone(),
                their_heads: Some(heads.clone()),
                their_need: Some(Vec::new()),
                their_have: Some(vec![Have {
                    last_sync: heads,
                    bloom: BloomFilter::default(),
                }]),
                sent_hashes: BTreeSet::new(),
                in_flight: p.in_flight,
                have_responded: true,
                their_capabilities: p.their_capabilities.take(),
                read_only: p.read_only,
                peer_read_only: p.peer_read_only,
                needs_reset: false,
            });
        }
        match self {
            Self::Live(state) => state,
            Self::Parked(_) => unreachable!("rebuilt above"),
        }
    }

    /// Parks the state if the peer is settled at `heads` (the document's current heads).
    /// Returns whether it is parked now.
    pub(super) fn park(&mut self, heads: &Heads) -> bool {
        let Self::Live(s) = self else {
            return true;
        };
        let settled = s.have_responded
            && !s.needs_reset
            && s.sent_hashes.is_empty()
            && s.shared_heads[..] == heads[..]
            && s.last_sent_heads[..] == heads[..]
            && s.their_heads.as_deref() == Some(&heads[..])
            && s.their_need.as_ref().is_some_and(Vec::is_empty)
            && s.their_have.as_ref().is_some_and(|h| h.len() == 1);
        if settled {
            *self = Self::Parked(Parked {
                heads: heads.clone(),
                in_flight: s.in_flight,
                their_capabilities: s.their_capabilities.take(),
                read_only: s.read_only,
                peer_read_only: s.peer_read_only,
            });
        }
        settled
    }

    /// Whether Automerge would generate no message for this peer, known without asking it
    /// (which costs a walk of the document's change graph): the peer was already told our
    /// heads and has them, or was told them and has not answered yet. A document 200 phones
    /// share asked this of all 200 each time one of them was due a push.
    pub(super) fn has_nothing_to_say(&self, heads: &[ChangeHash]) -> bool {
        match self {
            Self::Live(s) => {
                s.have_responded
                    && s.last_sent_heads == heads
                    && (s.in_flight || s.their_heads.as_deref() == Some(heads))
            }
            Self::Parked(p) => p.heads[..] == *heads,
        }
    }

    /// The heads both sides are known to have (what is persisted between connections).
    pub(super) fn shared_heads(&self) -> &[ChangeHash] {
        match self {
            Self::Live(s) => &s.shared_heads,
            Self::Parked(p) => &p.heads,
        }
    }

    /// What Automerge persists of a sync state (its shared heads).
    pub(super) fn encode(&self) -> Vec<u8> {
        match self {
            Self::Live(s) => s.encode(),
            Self::Parked(p) => sync::State {
                shared_heads: p.heads.to_vec(),
                ..sync::State::new()
            }
            .encode(),
        }
    }

    #[cfg(test)]
    pub(super) fn is_parked(&self) -> bool {
        matches!(self, Self::Parked(_))
    }
}

#[cfg(test)]
mod tests {
    use super::{Heads, PeerSync};
    use automerge::sync::{self, SyncDoc};
    use automerge::transaction::CommitOptions;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, Automerge, ReadDoc, ROOT};

    /// Syncs `server` (whose state for the peer is `held`, parked whenever it can be) with
    /// `phone` until neither has anything to say. Returns the messages the server sent.
    fn exchange(
        server: &mut Automerge,
        held: &mut PeerSync,
        phone: &mut AutoCommit,
        phone_state: &mut sync::State,
    ) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        for _ in 0..10 {
            let from_server = server.generate_sync_message(held.live());
            let heads: Heads = server.get_heads().into();
            held.park(&heads);
            let from_phone = phone.sync().generate_sync_message(phone_state);
            if from_server.is_none() && from_phone.is_none() {
                return sent;
            }
            if let Some(m) = from_server {
                sent.push(m.clone().encode());
                phone.sync().receive_sync_message(phone_state, m).unwrap();
            }
            if let Some(m) = from_phone {
                server.receive_sync_message(held.live(), m).unwrap();
                let heads: Heads = server.get_heads().into();
                held.park(&heads);
            }
        }
        panic!("the exchange did not settle in 10 rounds");
    }

    fn phone_with_visits(actor: u8, visits: usize) -> AutoCommit {
        let mut phone = AutoCommit::new().with_actor(automerge::ActorId::from(vec![actor; 16]));
        for i in 0..visits {
            phone
                .put(ROOT, format!("visit-{actor}-{i}"), "heard the family")
                .unwrap();
            // Fixed times: the changes' hashes, and so the bloom filters, are the same each run.
            phone.commit_with(CommitOptions::default().with_time(i as i64));
        }
        phone
    }

    #[test]
    fn a_settled_peer_is_parked_and_a_push_after_it_is_what_the_whole_state_sends() {
        // Two phones edited the household offline: the server holds both, phone A syncs.
        let mut server = Automerge::new();
        let mut a = phone_with_visits(1, 3);
        let mut b = phone_with_visits(2, 2);
        server.merge(&mut b.document().clone()).unwrap();
        let mut held = PeerSync::new(sync::State::new());
        let mut whole = sync::State::new();
        let mut a_state = sync::State::new();
        exchange(&mut server, &mut held, &mut a, &mut a_state);
        assert!(held.is_parked(), "the peer has everything and said so");
        assert_eq!(a.get_heads(), server.get_heads());
        assert_eq!(held.shared_heads(), &server.get_heads()[..]);
        assert!(held.has_nothing_to_say(&server.get_heads()));

        // The same exchange, with the state never parked, for comparison.
        let mut server2 = Automerge::new();
        server2.merge(&mut b.document().clone()).unwrap();
        let mut a2 = phone_with_visits(1, 3);
        let mut a2_state = sync::State::new();
        for _ in 0..10 {
            let s = server2.generate_sync_message(&mut whole);
            let p = a2.sync().generate_sync_message(&mut a2_state);
            if s.is_none() && p.is_none() {
                break;
            }
            if let Some(m) = s {
                a2.sync().receive_sync_message(&mut a2_state, m).unwrap();
            }
            if let Some(m) = p {
                server2.receive_sync_message(&mut whole, m).unwrap();
            }
        }

        // Phone B's next visit reaches the server: the push to A is the same message whether
        // A's state was parked or whole.
        b.put(ROOT, "visit-2-late", "a tip about the bridge")
            .unwrap();
        b.commit_with(CommitOptions::default().with_time(100));
        let late = b.save_after(&server.get_heads());
        server.load_incremental(&late).unwrap();
        server2.load_incremental(&late).unwrap();
        assert!(!held.has_nothing_to_say(&server.get_heads()));
        let pushed = server.generate_sync_message(held.live()).unwrap();
        let pushed_whole = server2.generate_sync_message(&mut whole).unwrap();
        assert_eq!(pushed.changes.len(), 1, "only the new change goes");
        assert_eq!(pushed.clone().encode(), pushed_whole.encode());

        // And A ends with it, parked again once it says so.
        a.sync().receive_sync_message(&mut a_state, pushed).unwrap();
        exchange(&mut server, &mut held, &mut a, &mut a_state);
        let (late_visit, _) = a.get(ROOT, "visit-2-late").unwrap().unwrap();
        assert_eq!(late_visit.as_str(), Some("a tip about the bridge"));
        assert!(held.is_parked());
    }

    #[test]
    fn a_peer_with_changes_unacknowledged_is_not_parked_and_its_state_is_persisted_the_same() {
        let mut server = Automerge::new();
        let mut held = PeerSync::new(sync::State::new());
        let mut a = phone_with_visits(1, 1);
        let mut a_state = sync::State::new();
        // The phone offers its visit; the server takes it and answers, unacknowledged yet.
        let offer = a.sync().generate_sync_message(&mut a_state).unwrap();
        server.receive_sync_message(held.live(), offer).unwrap();
        let heads: Heads = server.get_heads().into();
        assert!(
            !held.park(&heads),
            "the phone has not seen the server's heads yet"
        );
        let before = held.encode();
        exchange(&mut server, &mut held, &mut a, &mut a_state);
        assert!(held.is_parked());
        let parked = held.encode();
        assert_eq!(
            sync::State::decode(&parked).unwrap().shared_heads,
            server.get_heads()
        );
        assert_ne!(before, parked);
        assert_eq!(
            held.live().encode(),
            parked,
            "rebuilt, it persists the same"
        );
    }
}
