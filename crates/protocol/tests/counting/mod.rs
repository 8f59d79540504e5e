//! A counting global allocator for the tests that bound what decoding
//! allocates (`mod counting;` installs it in that test binary).
//!
//! It records, on the current thread only and only inside [`measure`], the
//! largest single allocation request, the peak of live bytes and the number
//! of allocations. The workspace forbids unsafe code, so the allocator is
//! `tracking-allocator`'s, which wraps the system allocator and calls safe
//! hooks. Its `realloc` is an allocation of the new size followed by a
//! release of the old one, so a growing buffer counts old and new together
//! at the peak: the figures are upper bounds of what the system allocator
//! really holds (and what `scan.rs` models).

#![allow(dead_code)]

use std::alloc::System;
use std::cell::Cell;
use std::sync::Once;

use tracking_allocator::{AllocationGroupId, AllocationRegistry, AllocationTracker, Allocator};

#[global_allocator]
static GLOBAL: Allocator<System> = Allocator::system();

/// What one thread's measuring window has seen.
struct Window {
    active: Cell<bool>,
    live: Cell<isize>,
    peak: Cell<isize>,
    largest: Cell<usize>,
    count: Cell<usize>,
}

thread_local! {
    static WINDOW: Window = const {
        Window {
            active: Cell::new(false),
            live: Cell::new(0),
            peak: Cell::new(0),
            largest: Cell::new(0),
            count: Cell::new(0),
        }
    };
}

/// Feeds every allocation and release to the current thread's window.
struct Counter;

impl AllocationTracker for Counter {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, _group: AllocationGroupId) {
        let _ = WINDOW.try_with(|w| {
            if w.active.get() {
                let live = w.live.get() + size as isize;
                w.live.set(live);
                w.peak.set(w.peak.get().max(live));
                w.largest.set(w.largest.get().max(size));
                w.count.set(w.count.get() + 1);
            }
        });
    }

    fn deallocated(
        &self,
        _addr: usize,
        size: usize,
        _wrapped: usize,
        _source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        let _ = WINDOW.try_with(|w| {
            if w.active.get() {
                w.live.set(w.live.get() - size as isize);
            }
        });
    }
}

/// What `f` allocated on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The largest single allocation requested, in bytes.
    pub largest: usize,
    /// The most bytes live at once, counted from zero when `f` started
    /// (memory freed that was allocated before counts negative).
    pub peak: usize,
    /// Allocations made.
    pub count: usize,
}

/// Runs `f`, recording its allocations on this thread. What `f` returns
/// is dropped after the window closes, so its release is not counted.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        AllocationRegistry::set_global_tracker(Counter).expect("no other tracker is set");
        AllocationRegistry::enable_tracking();
    });
    WINDOW.with(|w| {
        w.live.set(0);
        w.peak.set(0);
        w.largest.set(0);
        w.count.set(0);
        w.active.set(true);
    });
    let result = f();
    let usage = WINDOW.with(|w| {
        w.active.set(false);
        Usage {
            largest: w.largest.get(),
            peak: w.peak.get().max(0) as usize,
            count: w.count.get(),
        }
    });
    (result, usage)
}
