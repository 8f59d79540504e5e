//! Tests of the credit accounting: edge cases one at a time.

use super::*;

fn charge(bytes: u32, reserved: bool) -> Charge {
    Charge { bytes, reserved }
}

/// Receives `count` messages and delivers them to the application.
fn deliver(receiving: &mut ReceiveWindow, count: u32) {
    for _ in 0..count {
        assert_eq!(receiving.received(), Ok(()));
        receiving.delivered();
    }
}

#[test]
fn the_default_budget_has_the_reserve_and_small_messages_the_crate_documents() {
    let budget = Budget::new(crate::DEFAULT_MAX_IN_FLIGHT_BYTES);
    assert_eq!(budget.bytes, 64 << 20);
    // A 64th of the budget, for messages of at most a 1024th of it.
    assert_eq!(budget.reserve, 1 << 20);
    assert_eq!(budget.small, 64 << 10);
}

#[test]
fn a_budget_of_nothing_is_one_byte_without_a_reserve() {
    let budget = Budget::new(0);
    assert_eq!(
        budget,
        Budget {
            bytes: 1,
            reserve: 0,
            small: 0
        }
    );
    assert_eq!(budget.size(0), 1);
    assert_eq!(budget.size(usize::MAX), 1);
    assert_eq!(budget.source(1, 1, 0), Source::Bytes);
    assert_eq!(budget.source(1, 0, 0), Source::Wait);
}

#[test]
fn a_message_larger_than_the_budget_takes_all_of_it_and_goes_alone() {
    let budget = Budget::new(1 << 20);
    let (all, reserve) = (budget.bytes as usize, budget.reserve as usize);
    for len in [(1 << 20) + 1, 5 << 20, u32::MAX as usize, usize::MAX] {
        let size = budget.size(len);
        assert_eq!(size, budget.bytes, "{len}");
        assert_eq!(budget.source(size, all, reserve), Source::Bytes);
        assert_eq!(budget.source(size, all - 1, reserve), Source::Wait);
    }
    // Once it has gone, nothing is left: it wants its credit back at once.
    assert!(budget.credit_wanted(false, 0));
}

#[test]
fn only_small_messages_go_past_on_the_reserve() {
    // A reserve of 16 KiB, for messages of at most 1 KiB.
    let budget = Budget::new(1 << 20);
    let (small, reserve) = (budget.small, budget.reserve as usize);
    assert_eq!(small, 1 << 10);
    assert_eq!(budget.source(small, 0, reserve), Source::Reserve);
    assert_eq!(budget.source(small + 1, 0, reserve), Source::Wait);
    assert_eq!(budget.source(small, 0, small as usize - 1), Source::Wait);
    // The budget proper comes first while it has room.
    assert_eq!(budget.source(small, small as usize, reserve), Source::Bytes);
    // A message from the reserve always wants its credit back at once.
    assert!(budget.credit_wanted(true, budget.bytes as usize));
}

#[test]
fn credit_is_wanted_once_less_than_half_the_budget_is_left() {
    let budget = Budget::new(100);
    assert!(!budget.credit_wanted(false, 100));
    assert!(!budget.credit_wanted(false, 50));
    assert!(budget.credit_wanted(false, 49));
}

#[test]
fn an_unsent_message_gives_back_one_message_and_its_bytes_to_its_pool() {
    assert_eq!(
        Refund::unsent(charge(7, false)),
        Refund {
            messages: 1,
            bytes: 7,
            reserve: 0
        }
    );
    assert_eq!(
        Refund::unsent(charge(7, true)),
        Refund {
            messages: 1,
            bytes: 0,
            reserve: 7
        }
    );
}

#[test]
fn the_grant_that_opens_the_window_settles_nothing() {
    let mut sending = SendWindow::default();
    assert_eq!(
        sending.on_credit(8, 0),
        Ok(Refund {
            messages: 8,
            ..Refund::default()
        })
    );
}

#[test]
fn a_grant_settles_the_oldest_charges_each_into_its_own_pool() {
    let mut sending = SendWindow::default();
    sending.sent(charge(10, false));
    sending.sent(charge(2, true));
    sending.sent(charge(30, false));
    assert_eq!(
        sending.on_credit(2, 5),
        Ok(Refund {
            messages: 2,
            bytes: 10,
            reserve: 2
        })
    );
    // More than is in flight settles all of it, and gives every message.
    assert_eq!(
        sending.on_credit(4, 7),
        Ok(Refund {
            messages: 4,
            bytes: 30,
            reserve: 0
        })
    );
    assert!(sending.charges.is_empty());
}

#[test]
fn a_grant_up_to_the_largest_window_is_taken_and_one_beyond_changes_nothing() {
    let mut sending = SendWindow::default();
    sending.sent(charge(1, false));
    let available = MAX_WINDOW as usize - 3;
    assert_eq!(sending.on_credit(3, available), Err(BeyondWindow));
    assert_eq!(sending.charges.len(), 1);
    assert_eq!(sending.on_credit(u32::MAX, usize::MAX), Err(BeyondWindow));
    assert_eq!(sending.charges.len(), 1);
    assert_eq!(
        sending.on_credit(2, available),
        Ok(Refund {
            messages: 2,
            bytes: 1,
            reserve: 0
        })
    );
}

#[test]
fn nothing_may_be_sent_before_the_window_opens_nor_beyond_it() {
    let mut receiving = ReceiveWindow::new(2);
    assert_eq!(receiving.received(), Err(BeyondCredit));
    assert_eq!(receiving.open(), Grant(2));
    deliver(&mut receiving, 2);
    assert_eq!(receiving.received(), Err(BeyondCredit));
    // A refused message is not counted: one consumed is one more allowed.
    assert_eq!(receiving.consumed(false), Some(Grant(1)));
    assert_eq!(receiving.received(), Ok(()));
    assert_eq!(receiving.received(), Err(BeyondCredit));
}

#[test]
fn a_window_of_one_credits_every_message_as_it_is_consumed() {
    let mut receiving = ReceiveWindow::new(1);
    assert_eq!(receiving.open(), Grant(1));
    for _ in 0..3 {
        deliver(&mut receiving, 1);
        assert_eq!(receiving.received(), Err(BeyondCredit));
        assert_eq!(receiving.consumed(false), Some(Grant(1)));
    }
}

#[test]
fn credit_goes_back_by_half_windows_or_at_once_for_a_flagged_message() {
    let mut receiving = ReceiveWindow::new(9);
    let _ = receiving.open();
    deliver(&mut receiving, 9);
    for _ in 0..3 {
        assert_eq!(receiving.consumed(false), None);
    }
    assert_eq!(receiving.consumed(false), Some(Grant(4)));
    assert_eq!(receiving.consumed(false), None);
    assert_eq!(receiving.consumed(true), Some(Grant(2)));
    assert_eq!(receiving.consumed(true), Some(Grant(1)));
}

#[test]
fn a_credit_request_returns_what_is_owed_then_each_unconsumed_message_as_consumed() {
    let mut receiving = ReceiveWindow::new(100);
    let _ = receiving.open();
    deliver(&mut receiving, 5);
    assert_eq!(receiving.consumed(false), None);
    assert_eq!(receiving.consumed(false), None);
    assert_eq!(receiving.credit_requested(), Some(Grant(2)));
    for _ in 0..3 {
        assert_eq!(receiving.consumed(false), Some(Grant(1)));
    }
    // What arrives after the request waits for half a window again.
    deliver(&mut receiving, 1);
    assert_eq!(receiving.consumed(false), None);
}

#[test]
fn a_credit_request_with_nothing_consumed_grants_nothing_yet() {
    let mut receiving = ReceiveWindow::new(100);
    let _ = receiving.open();
    assert_eq!(receiving.credit_requested(), None);
    deliver(&mut receiving, 1);
    assert_eq!(receiving.credit_requested(), None);
    assert_eq!(receiving.consumed(false), Some(Grant(1)));
    assert_eq!(receiving.credit_requested(), None);
}
