//! The head core's table of pending requests, and the id sets and
//! leases of rule 11.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

use crate::pb::{CommandMode, Parameter};
use crate::{DriverId, Rank, RequestId};

#[derive(Debug)]
pub(super) enum RequestPhase {
    Queued,
    /// Sent to `server` after ping round `ping_round` had gone out.
    Sent {
        server: Rank,
        ping_round: u64,
    },
    /// Sent, then answered with a timeout; a real answer may still replace it.
    TimedOut {
        server: Rank,
        ping_round: u64,
    },
}

#[derive(Debug)]
pub(super) struct Request {
    pub(super) driver: DriverId,
    pub(super) command: String,
    pub(super) mode: CommandMode,
    pub(super) parameters: Vec<Parameter>,
    pub(super) deadline_seconds: Option<f64>,
    pub(super) phase: RequestPhase,
    /// Its place in "oldest first" (rules 12-13).
    pub(super) arrival: u64,
    /// Submitted without a target: any server may run it.
    pub(super) shared: bool,
    /// Its parameters take more than [`PREFETCH_MAX_BYTES`]: never sent
    /// ahead, so that at most one such request is on its way to a server
    /// and pings do not queue behind several.
    pub(super) heavy: bool,
    /// Sent ahead, and a recall of it is on its way to its server.
    pub(super) recalling: bool,
    /// Queued again after a restart (rule 33): a server that ran it for
    /// the head node before may still answer it, and that answer counts.
    pub(super) recovered: bool,
}

/// Pops the entries at the front of `queue` whose requests are no longer
/// queued (sent, answered or cancelled meanwhile).
pub(super) fn skip_unqueued(queue: &mut VecDeque<(u64, RequestId)>, requests: &RequestTable) {
    while queue.front().is_some_and(|(_, id)| {
        !requests
            .get(id)
            .is_some_and(|r| matches!(r.phase, RequestPhase::Queued))
    }) {
        queue.pop_front();
    }
}

/// Requests by id. Ids are unique but not dense: leased ids arrive from
/// many drivers' blocks at once, with gaps where a lease went unused. A hash
/// map with a multiplicative hasher (one multiply per lookup) holds them,
/// so memory stays bounded by what is pending whatever the ids.
#[derive(Debug, Default)]
pub(super) struct RequestTable {
    requests: FxHashMap<RequestId, Request>,
}

impl RequestTable {
    pub(super) fn insert(&mut self, id: RequestId, request: Request) {
        let previous = self.requests.insert(id, request);
        debug_assert!(previous.is_none(), "request ids are never reused");
    }

    pub(super) fn get(&self, id: &RequestId) -> Option<&Request> {
        self.requests.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &RequestId) -> Option<&mut Request> {
        self.requests.get_mut(id)
    }

    pub(super) fn remove(&mut self, id: &RequestId) -> Option<Request> {
        let request = self.requests.remove(id);
        // A burst of requests leaves a large table behind: give the memory
        // back once most of it is empty.
        if self.requests.capacity() > 1024 && self.requests.len() < self.requests.capacity() / 8 {
            self.requests.shrink_to(self.requests.len() * 2);
        }
        request
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (RequestId, &Request)> {
        self.requests.iter().map(|(id, r)| (*id, r))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Request> {
        self.requests.values()
    }
}

/// Ids leased to a driver: `first..end`, `left` of them unused.
#[derive(Debug)]
pub(super) struct Lease {
    pub(super) first: RequestId,
    pub(super) end: RequestId,
    pub(super) left: RequestId,
}

/// A set of ids as disjoint ranges (start -> end, exclusive). Ids are used
/// in increasing order within each lease, so the set holds about one range
/// per lease whatever the number of ids.
#[derive(Debug, Default)]
pub(super) struct IdSet {
    ranges: BTreeMap<RequestId, RequestId>,
}

impl IdSet {
    pub(super) fn contains(&self, id: RequestId) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id < end)
    }

    pub(super) fn insert(&mut self, id: RequestId) {
        if self.contains(id) {
            return;
        }
        let mut start = id;
        if let Some((&s, &e)) = self.ranges.range(..id).next_back() {
            if e == id {
                start = s;
            }
        }
        let end = self.ranges.remove(&(id + 1)).unwrap_or(id + 1);
        self.ranges.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_set_merges_neighbours_and_keeps_gaps() {
        let mut set = IdSet::default();
        for id in [1, 2, 3, 7, 5, 6] {
            set.insert(id);
        }
        assert_eq!(set.ranges.iter().collect::<Vec<_>>(), [(&1, &4), (&5, &8)]);
        assert!(set.contains(3) && set.contains(5) && set.contains(7));
        assert!(!set.contains(0) && !set.contains(4) && !set.contains(8));
        set.insert(4);
        set.insert(4);
        assert_eq!(set.ranges.iter().collect::<Vec<_>>(), [(&1, &8)]);
    }

    #[test]
    fn id_set_of_sequentially_used_leases_holds_one_range_per_lease() {
        let mut set = IdSet::default();
        // Two drivers' leases used in turns, each leaving its tail unused.
        for i in 0..1000 {
            set.insert(1 + i);
            set.insert(5000 + i);
        }
        assert_eq!(set.ranges.len(), 2);
    }

    fn request(command: &str) -> Request {
        Request {
            driver: DriverId(1),
            command: command.into(),
            mode: CommandMode::Eval,
            parameters: Vec::new(),
            deadline_seconds: None,
            phase: RequestPhase::Queued,
            arrival: 0,
            shared: true,
            heavy: false,
            recalling: false,
            recovered: false,
        }
    }

    #[test]
    fn request_table_takes_sparse_ids_in_any_order() {
        let mut table = RequestTable::default();
        let ids = [70_000, 3, 1 << 40, 65_537, 4];
        for id in ids {
            table.insert(id, request(&id.to_string()));
        }
        for id in ids {
            assert_eq!(table.get(&id).unwrap().command, id.to_string());
        }
        assert!(table.get(&5).is_none());
        assert_eq!(table.remove(&3).unwrap().command, "3");
        assert!(table.remove(&3).is_none());
        let mut left: Vec<_> = table.iter().map(|(id, _)| id).collect();
        left.sort_unstable();
        assert_eq!(left, [4, 65_537, 70_000, 1 << 40]);
    }

    #[test]
    fn request_table_gives_memory_back_after_a_burst() {
        let mut table = RequestTable::default();
        for id in 1..=100_000 {
            table.insert(id, request(""));
        }
        let full = table.requests.capacity();
        for id in 1..=99_990 {
            table.remove(&id);
        }
        assert!(
            table.requests.capacity() < full / 100,
            "{full} -> {}",
            table.requests.capacity()
        );
        assert!(table.get(&100_000).is_some());
    }
}
