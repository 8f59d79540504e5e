//! How the progress thread waits when there is nothing to do.
//!
//! MPI offers no file descriptor to sleep on: the only way to learn that a
//! message arrived is to probe. So the thread polls, and the policy below
//! trades the latency a sleeping thread adds against the CPU it burns.

use std::time::{Duration, Instant};

/// How the progress thread waits for work; see the [crate] documentation.
///
/// After the last thing that happened (a message in or out, a completed
/// send, a command from the async side), the thread:
///
/// 1. probes back to back for [`spin`](Self::spin): a reply that comes
///    within that time is seen at once;
/// 2. probes for [`yield_for`](Self::yield_for) more, giving its core to
///    any other runnable thread between probes: as fast on an idle core,
///    and polite on an oversubscribed one;
/// 3. then sleeps between probes, first for
///    [`first_sleep`](Self::first_sleep), doubling each time up to
///    [`max_sleep`](Self::max_sleep): an idle rank wakes a few thousand
///    times a second at most, and a message arriving then waits at most the
///    current sleep (plus the kernel's timer slack) before it is seen.
///
/// A command from the async side (a send, the shutdown) ends a sleep at
/// once, so sending never waits for the backoff. While a send of this rank
/// started in the last second is still in progress (a large message being
/// copied), the thread only yields between probes, because some MPI
/// transports move data only while MPI is called; older sends are taken as
/// stuck (a stopped peer) and do not keep the thread awake.
///
/// The policy assumes replies come soon or not for a while: two ranks
/// that answer each other after more than `spin + yield_for` each see the
/// other's message up to one sleep late, which in a tight ping-pong grows
/// towards `max_sleep` per hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdlePolicy {
    /// How long to probe without pausing after the last activity.
    pub spin: Duration,
    /// How long to go on probing after that, giving the core to any other
    /// thread that wants it between probes (`sched_yield`).
    pub yield_for: Duration,
    /// The first sleep after spinning.
    pub first_sleep: Duration,
    /// The longest sleep: the most latency idling adds to a message.
    pub max_sleep: Duration,
}

impl Default for IdlePolicy {
    /// Spin 50 µs, yield for 200 µs, then sleep 10 µs, 20 µs, … up to
    /// 500 µs.
    fn default() -> Self {
        IdlePolicy {
            spin: Duration::from_micros(50),
            yield_for: Duration::from_micros(200),
            first_sleep: Duration::from_micros(10),
            max_sleep: Duration::from_micros(500),
        }
    }
}

/// What the thread should do next while idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Probe again at once.
    Spin,
    /// Give the core to another thread, then probe.
    Yield,
    /// Wait this long for a command, then probe.
    Sleep(Duration),
}

/// The state of [`IdlePolicy`] between two activities.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: IdlePolicy,
    idle_since: Instant,
    next_sleep: Duration,
}

impl Backoff {
    pub(crate) fn new(policy: IdlePolicy) -> Self {
        Backoff {
            policy,
            idle_since: Instant::now(),
            next_sleep: policy.first_sleep,
        }
    }

    /// Something happened: start over with spinning.
    pub(crate) fn reset(&mut self) {
        self.idle_since = Instant::now();
        self.next_sleep = self.policy.first_sleep;
    }

    /// The pause after a round that found nothing to do; `sending` says
    /// whether sends of this rank are still in progress.
    pub(crate) fn pause(&mut self, sending: bool) -> Pause {
        let idle = self.idle_since.elapsed();
        if idle < self.policy.spin {
            return Pause::Spin;
        }
        if sending || idle < self.policy.spin + self.policy.yield_for {
            return Pause::Yield;
        }
        let sleep = self.next_sleep.min(self.policy.max_sleep);
        self.next_sleep = (sleep * 2).clamp(Duration::from_micros(1), self.policy.max_sleep);
        Pause::Sleep(sleep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_double_up_to_the_cap_after_spinning() {
        let policy = IdlePolicy {
            spin: Duration::ZERO,
            yield_for: Duration::ZERO,
            first_sleep: Duration::from_micros(10),
            max_sleep: Duration::from_micros(50),
        };
        let mut backoff = Backoff::new(policy);
        let sleeps: Vec<_> = (0..5).map(|_| backoff.pause(false)).collect();
        let us = Duration::from_micros;
        assert_eq!(
            sleeps,
            [
                Pause::Sleep(us(10)),
                Pause::Sleep(us(20)),
                Pause::Sleep(us(40)),
                Pause::Sleep(us(50)),
                Pause::Sleep(us(50)),
            ]
        );
        backoff.reset();
        assert_eq!(backoff.pause(false), Pause::Sleep(us(10)));
    }

    #[test]
    fn spins_then_yields_and_yields_while_sending() {
        let hour = Duration::from_secs(3600);
        let mut backoff = Backoff::new(IdlePolicy {
            spin: hour,
            ..IdlePolicy::default()
        });
        assert_eq!(backoff.pause(false), Pause::Spin);
        let mut backoff = Backoff::new(IdlePolicy {
            spin: Duration::ZERO,
            yield_for: hour,
            ..IdlePolicy::default()
        });
        assert_eq!(backoff.pause(false), Pause::Yield);
        let mut backoff = Backoff::new(IdlePolicy {
            spin: Duration::ZERO,
            yield_for: Duration::ZERO,
            ..IdlePolicy::default()
        });
        assert_eq!(backoff.pause(true), Pause::Yield);
        assert!(matches!(backoff.pause(false), Pause::Sleep(_)));
    }
}
