//! Tests of the credit accounting: edge cases one at a time, then
//! properties of a sender and a receiver that exchange random
//! interleavings of messages, grants and credit requests.

use proptest::collection::vec;
use proptest::prelude::*;

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

/// What the connection carries from the sender to the receiver, in order.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// A data message, flagged if its sender wants its credit back at once;
    /// a `malformed` one the receiver drops on arrival and credits as if
    /// consumed.
    Data {
        credit_wanted: bool,
        malformed: bool,
    },
    /// A credit request.
    Request,
}

/// A send the sender has started and not finished.
#[derive(Debug, Clone, Copy)]
enum Sending {
    /// It waits for a message of credit.
    Message { len: usize, malformed: bool },
    /// It holds a message of credit and waits for `size` bytes of the
    /// budget proper; it asked for credit when it began to.
    Bytes { size: u32, malformed: bool },
}

/// What the receiver decided, in order.
#[derive(Debug, Clone, Copy)]
enum Decision {
    /// It read a credit request when `owed` messages were consumed and not
    /// credited, and `unconsumed` were delivered and not consumed.
    Request {
        owed: u32,
        unconsumed: u32,
        grant: Option<Grant>,
    },
    /// Its application consumed a message, flagged if `credit_wanted`,
    /// which made `owed` consumed and not credited.
    Consume {
        credit_wanted: bool,
        owed: u32,
        grant: Option<Grant>,
    },
}

/// One step of a run.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// The sender's application sends a message of this many millionths of
    /// the budget (up to twice it), unless a send is under way.
    Send { millionths: u32, malformed: bool },
    /// The connection carries the oldest frame to the receiver.
    Deliver,
    /// The receiver's application consumes the oldest message delivered.
    Consume,
    /// The connection carries the oldest grant to the sender.
    Return,
    /// The sender asks for credit without waiting for any (it asks only
    /// when it waits; the receiver must not care).
    Request,
}

/// One direction of a link: a sender (the credit it has not used, as the
/// handle's semaphores hold it, and its engine's [`SendWindow`]), the
/// connection both ways, and a receiver (its engine's [`ReceiveWindow`]
/// and its application's queue), which opens the window at the start.
#[derive(Debug)]
struct Model {
    budget: Budget,
    window: u32,
    /// Messages the sender may send.
    messages: usize,
    /// Bytes left in the budget proper.
    bytes: usize,
    /// Bytes left in the reserve.
    reserve: usize,
    sending: SendWindow,
    /// The send under way.
    pending: Option<Sending>,
    /// Whether the grant that opens the window has reached the sender.
    opened: bool,
    to_receiver: VecDeque<Frame>,
    to_sender: VecDeque<u32>,
    receiving: ReceiveWindow,
    /// The flags of the messages delivered and not yet consumed, in order.
    application: VecDeque<bool>,
    /// Messages consumed and not yet credited, as the model counts them.
    owed: u32,
    decisions: Vec<Decision>,
}

impl Model {
    fn new(window: u32, budget: Budget) -> Self {
        let mut receiving = ReceiveWindow::new(window);
        let Grant(count) = receiving.open();
        Model {
            budget,
            window,
            messages: 0,
            bytes: budget.bytes as usize,
            reserve: budget.reserve as usize,
            sending: SendWindow::default(),
            pending: None,
            opened: false,
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::from([count]),
            receiving,
            application: VecDeque::new(),
            owed: 0,
            decisions: Vec::new(),
        }
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Send {
                millionths,
                malformed,
            } => {
                if self.pending.is_none() {
                    let len = u64::from(self.budget.bytes) * u64::from(millionths) / 1_000_000;
                    let len = len as usize;
                    self.pending = Some(Sending::Message { len, malformed });
                }
            }
            Op::Deliver => {
                if let Some(frame) = self.to_receiver.pop_front() {
                    self.arrive(frame)?;
                }
            }
            Op::Consume => {
                if let Some(credit_wanted) = self.application.pop_front() {
                    self.consume(credit_wanted)?;
                }
            }
            Op::Return => {
                if let Some(count) = self.to_sender.pop_front() {
                    let refund = self.sending.on_credit(count, self.messages);
                    prop_assert!(refund.is_ok(), "a grant of {} was refused", count);
                    let refund = refund.expect("checked");
                    self.messages += refund.messages;
                    self.bytes += refund.bytes;
                    self.reserve += refund.reserve;
                    self.opened = true;
                }
            }
            Op::Request => self.to_receiver.push_back(Frame::Request),
        }
        self.go_on_sending()
    }

    /// Takes the send under way as far as the credit allows, as the
    /// handle's `send` does.
    fn go_on_sending(&mut self) -> Result<(), TestCaseError> {
        loop {
            match self.pending {
                Some(Sending::Message { len, malformed }) if self.messages > 0 => {
                    self.messages -= 1;
                    let size = self.budget.size(len);
                    match self.budget.source(size, self.bytes, self.reserve) {
                        Source::Bytes => self.send(size, false, malformed)?,
                        Source::Reserve => self.send(size, true, malformed)?,
                        Source::Wait => {
                            self.to_receiver.push_back(Frame::Request);
                            self.pending = Some(Sending::Bytes { size, malformed });
                        }
                    }
                }
                Some(Sending::Bytes { size, malformed }) if self.bytes >= size as usize => {
                    self.send(size, false, malformed)?;
                }
                _ => return Ok(()),
            }
        }
    }

    fn send(&mut self, size: u32, reserved: bool, malformed: bool) -> Result<(), TestCaseError> {
        if reserved {
            prop_assert!(size <= self.budget.small, "{} bytes from the reserve", size);
            self.reserve -= size as usize;
        } else {
            self.bytes -= size as usize;
        }
        let credit_wanted = self.budget.credit_wanted(reserved, self.bytes);
        self.sending.sent(charge(size, reserved));
        self.to_receiver.push_back(Frame::Data {
            credit_wanted,
            malformed,
        });
        self.pending = None;
        Ok(())
    }

    fn arrive(&mut self, frame: Frame) -> Result<(), TestCaseError> {
        match frame {
            Frame::Data {
                credit_wanted,
                malformed,
            } => {
                prop_assert_eq!(
                    self.receiving.received(),
                    Ok(()),
                    "a message sent within its credit was refused"
                );
                self.receiving.delivered();
                if malformed {
                    self.consume(credit_wanted)?;
                } else {
                    self.application.push_back(credit_wanted);
                }
            }
            Frame::Request => {
                let grant = self.receiving.credit_requested();
                self.decisions.push(Decision::Request {
                    owed: self.owed,
                    unconsumed: self.application.len() as u32,
                    grant,
                });
                self.grant(grant)?;
            }
        }
        Ok(())
    }

    fn consume(&mut self, credit_wanted: bool) -> Result<(), TestCaseError> {
        self.owed += 1;
        let grant = self.receiving.consumed(credit_wanted);
        self.decisions.push(Decision::Consume {
            credit_wanted,
            owed: self.owed,
            grant,
        });
        self.grant(grant)
    }

    fn grant(&mut self, grant: Option<Grant>) -> Result<(), TestCaseError> {
        if let Some(Grant(count)) = grant {
            prop_assert!(
                count <= self.owed,
                "granted {} for {} messages consumed",
                count,
                self.owed
            );
            self.owed -= count;
            self.to_sender.push_back(count);
        }
        Ok(())
    }

    /// Lets the connection carry everything and the receiver's
    /// application consume everything, until nothing moves; sends nothing
    /// new.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        while !(self.to_receiver.is_empty()
            && self.application.is_empty()
            && self.to_sender.is_empty())
        {
            for op in [Op::Deliver, Op::Consume, Op::Return] {
                self.step(op)?;
            }
        }
        Ok(())
    }

    /// Whether the sender holds a message of credit for a send that waits
    /// for bytes.
    fn holding(&self) -> usize {
        usize::from(matches!(self.pending, Some(Sending::Bytes { .. })))
    }

    /// The bytes of the charges in flight: from the budget proper, and from
    /// the reserve.
    fn charged(&self) -> (usize, usize) {
        let mut charged = (0, 0);
        for charge in &self.sending.charges {
            if charge.reserved {
                charged.1 += charge.bytes as usize;
            } else {
                charged.0 += charge.bytes as usize;
            }
        }
        charged
    }
}

fn setups() -> impl Strategy<Value = (u32, Budget)> {
    let windows = prop_oneof![1u32..=4, 1u32..=40];
    let budgets = prop_oneof![1u32..=64, 1024u32..=200_000].prop_map(Budget::new);
    (windows, budgets)
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    // Small enough for the reserve, up to half the budget, or large.
    let sizes = prop_oneof![0u32..=1_000, 0u32..=600_000, 400_000u32..=2_000_000];
    let op = prop_oneof![
        3 => (sizes, prop::bool::weighted(0.05))
            .prop_map(|(millionths, malformed)| Op::Send { millionths, malformed }),
        3 => Just(Op::Deliver),
        3 => Just(Op::Consume),
        3 => Just(Op::Return),
        1 => Just(Op::Request),
    ];
    vec(op, 0..300)
}

/// Runs `ops`, calling `check` after each step.
fn run(
    (window, budget): (u32, Budget),
    ops: &[Op],
    mut check: impl FnMut(&Model) -> Result<(), TestCaseError>,
) -> Result<Model, TestCaseError> {
    let mut model = Model::new(window, budget);
    check(&model)?;
    for &op in ops {
        model.step(op)?;
        check(&model)?;
    }
    Ok(model)
}

proptest! {
    /// At every step the sender has no more messages in flight than the
    /// window, nor more bytes than the budget and its reserve; and every
    /// message of the window is accounted for, once, somewhere: as credit
    /// the sender has, a message on its way or unconsumed, a consumed one
    /// not yet credited, or a grant on its way back. The receiver agrees
    /// with the sender on what it may still send.
    #[test]
    fn the_sender_stays_within_the_window_and_the_budget(setup in setups(), ops in ops()) {
        run(setup, &ops, |model| {
            let window = model.window as usize;
            let holding = model.holding();
            let data = model
                .to_receiver
                .iter()
                .filter(|frame| matches!(frame, Frame::Data { .. }))
                .count();
            let unconsumed = model.application.len();
            let granted: usize = model.to_sender.iter().map(|&count| count as usize).sum();
            prop_assert!(holding + data + unconsumed <= window);
            prop_assert_eq!(
                model.messages + holding + data + unconsumed + model.owed as usize + granted,
                window
            );
            prop_assert_eq!(
                model.receiving.allowed,
                (model.messages + holding + data + granted) as u64
            );
            prop_assert_eq!(model.receiving.unconsumed as usize, unconsumed);
            prop_assert_eq!(model.receiving.consumed, model.owed);
            let in_flight = model.sending.charges.len();
            if model.opened {
                prop_assert_eq!(model.messages + holding + in_flight, window);
            } else {
                prop_assert_eq!(model.messages + holding + in_flight, 0);
            }
            let (bytes, reserve) = model.charged();
            prop_assert!(bytes <= model.budget.bytes as usize);
            prop_assert!(reserve <= model.budget.reserve as usize);
            prop_assert_eq!(model.bytes + bytes, model.budget.bytes as usize);
            prop_assert_eq!(model.reserve + reserve, model.budget.reserve as usize);
            Ok(())
        })?;
    }

    /// Once the receiver's application has consumed everything, no send
    /// waits (a send short of bytes asked for credit) and the sender may
    /// send again; and once the sender asks for credit, its window and
    /// budget are whole again: no credit leaks.
    #[test]
    fn every_message_consumed_is_credited_back(setup in setups(), ops in ops()) {
        let mut model = run(setup, &ops, |_| Ok(()))?;
        model.settle()?;
        prop_assert!(model.pending.is_none(), "a send still waits: {:?}", model.pending);
        prop_assert!(model.messages > 0);
        model.to_receiver.push_back(Frame::Request);
        model.settle()?;
        prop_assert_eq!(model.messages, model.window as usize);
        prop_assert_eq!(model.bytes, model.budget.bytes as usize);
        prop_assert_eq!(model.reserve, model.budget.reserve as usize);
        prop_assert!(model.sending.charges.is_empty());
        prop_assert_eq!(model.receiving.allowed, u64::from(model.window));
        prop_assert_eq!(model.receiving.consumed, 0);
    }

    /// A credit request gets the receiver to return at once every message
    /// consumed and not yet credited, and each message then unconsumed as
    /// soon as it is consumed.
    #[test]
    fn a_credit_request_gets_back_what_is_owed(setup in setups(), ops in ops()) {
        let model = run(setup, &ops, |_| Ok(()))?;
        let mut hurried = 0;
        for decision in model.decisions {
            match decision {
                Decision::Request { owed, unconsumed, grant } => {
                    prop_assert_eq!(grant, (owed > 0).then_some(Grant(owed)));
                    hurried = unconsumed;
                }
                Decision::Consume { grant, .. } => {
                    if hurried > 0 {
                        prop_assert!(grant.is_some(), "a hurried message was not credited");
                        hurried -= 1;
                    }
                }
            }
        }
    }

    /// The receiver grants credit exactly when a consumed message was
    /// flagged or hurried, or completes half a window (at least one), and
    /// then grants every message consumed since its last grant.
    #[test]
    fn credit_is_granted_by_half_windows_unless_wanted_sooner(setup in setups(), ops in ops()) {
        let model = run(setup, &ops, |_| Ok(()))?;
        let batch = (model.window / 2).max(1);
        let mut hurried = 0u32;
        for decision in model.decisions {
            match decision {
                Decision::Request { unconsumed, .. } => hurried = unconsumed,
                Decision::Consume { credit_wanted, owed, grant } => {
                    let due = credit_wanted || hurried > 0 || owed >= batch;
                    hurried = hurried.saturating_sub(1);
                    prop_assert_eq!(grant, due.then_some(Grant(owed)));
                }
            }
        }
    }

    /// Whatever a peer grants, the window (credit available plus messages
    /// in flight) stays within MAX_WINDOW; a grant that would take it
    /// beyond is refused and changes nothing, and one that is taken gives
    /// back its count of messages and the bytes of the oldest charges.
    #[test]
    fn a_grant_never_makes_the_window_larger_than_the_largest(
        available in 0..=MAX_WINDOW as usize,
        steps in vec(
            prop_oneof![
                (1u32..=1000, any::<bool>()).prop_map(|(bytes, reserved)| Err(charge(bytes, reserved))),
                prop_oneof![0..=2 * MAX_WINDOW, any::<u32>()].prop_map(Ok),
            ],
            0..200,
        ),
    ) {
        let mut available = available;
        let mut sending = SendWindow::default();
        for step in steps {
            match step {
                Err(charge) => {
                    if available > 0 {
                        available -= 1;
                        sending.sent(charge);
                    }
                }
                Ok(count) => {
                    let before = sending.charges.clone();
                    match sending.on_credit(count, available) {
                        Ok(refund) => {
                            let settled = before.iter().take(count as usize);
                            let expected = Refund {
                                messages: count as usize,
                                bytes: settled.clone().filter(|c| !c.reserved).map(|c| c.bytes as usize).sum(),
                                reserve: settled.filter(|c| c.reserved).map(|c| c.bytes as usize).sum(),
                            };
                            prop_assert_eq!(refund, expected);
                            available += refund.messages;
                            prop_assert!(available + sending.charges.len() <= MAX_WINDOW as usize);
                        }
                        Err(BeyondWindow) => {
                            prop_assert!(available + before.len() + count as usize > MAX_WINDOW as usize);
                            prop_assert_eq!(&sending.charges, &before);
                        }
                    }
                }
            }
        }
    }

    /// A message of any length takes between one byte and the whole
    /// budget, so it can go once nothing else is in flight, however large.
    #[test]
    fn a_message_of_any_size_goes_when_nothing_is_in_flight(
        max_in_flight_bytes in any::<u32>(),
        len in prop_oneof![0usize..=1 << 20, any::<usize>()],
    ) {
        let budget = Budget::new(max_in_flight_bytes);
        let size = budget.size(len);
        prop_assert!(1 <= size && size <= budget.bytes);
        if (1..=budget.bytes as usize).contains(&len) {
            prop_assert_eq!(size as usize, len);
        }
        let all = (budget.bytes as usize, budget.reserve as usize);
        prop_assert_eq!(budget.source(size, all.0, all.1), Source::Bytes);
    }
}
