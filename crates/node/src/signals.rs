//! SIGINT and SIGTERM as a count the event loops watch: the first asks for
//! a graceful stop, the second for an immediate one.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Starts counting SIGINT and SIGTERM; must be called inside a runtime.
pub fn watch() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tx.send_modify(|count| *count += 1);
        }
    });
    rx
}
