//! Wall-clock times derived from the monotonic time the caller passes in,
//! so the cores stay deterministic and never read the system clock.

use std::time::Instant;

/// Maps monotonic instants to seconds since the Unix epoch, from one anchor
/// taken when a core is created.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    anchor: Instant,
    anchor_epoch: f64,
}

impl WallClock {
    /// A clock on which `anchor` is `anchor_epoch` seconds since the epoch.
    pub fn new(anchor: Instant, anchor_epoch: f64) -> Self {
        WallClock {
            anchor,
            anchor_epoch,
        }
    }

    /// A clock anchored at the system's current time, for real nodes.
    pub fn system() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        WallClock::new(Instant::now(), epoch)
    }

    /// `now` in seconds since the Unix epoch.
    pub fn epoch(&self, now: Instant) -> f64 {
        if now >= self.anchor {
            self.anchor_epoch + (now - self.anchor).as_secs_f64()
        } else {
            self.anchor_epoch - (self.anchor - now).as_secs_f64()
        }
    }
}
