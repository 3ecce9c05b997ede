//! The webhook port's places: at most `max_connections` open, at most a share of them per
//! sender (an IPv4 address, or an IPv6 /64, which one sender holds whole). When a newcomer
//! finds its sender's share or every place taken, the oldest connection (of that sender, or
//! of all) that is not handling a delivery is closed to make room: one idle between
//! requests, or waiting for a request or for a body that has not come within `GRACE`. A
//! connection whose request arrived whole is never closed before its answer is written, so
//! senders holding connections open cannot keep a real delivery out, and a proxy that carries
//! every sender is not turned away for holding its share.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A connection is not closed for another within this of its accept or of its request's
/// start: time for a real sender's request to arrive whole.
pub const GRACE: Duration = Duration::from_millis(250);

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its sender holds its share of the places, none of them closable.
    AddressShare,
    /// Every place is taken, none of them closable.
    Full,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::AddressShare => "address_share",
            Refused::Full => "full",
        }
    }
}

/// What senders hold (connections, bodies): each under an ID in the order it was taken (the
/// first is the oldest), and how many each sender holds, for its share.
pub struct Holdings<T> {
    next: u64,
    by_id: BTreeMap<u64, (IpAddr, T)>,
    per_sender: HashMap<IpAddr, usize>,
}

impl<T> Default for Holdings<T> {
    fn default() -> Self {
        Holdings {
            next: 0,
            by_id: BTreeMap::new(),
            per_sender: HashMap::new(),
        }
    }
}

impl<T> Holdings<T> {
    pub fn held_by(&self, sender: IpAddr) -> usize {
        self.per_sender.get(&sender).copied().unwrap_or(0)
    }

    /// How many are held, by every sender.
    pub fn count(&self) -> usize {
        self.by_id.len()
    }

    /// Holds `item` for `sender`; its ID.
    pub fn take(&mut self, sender: IpAddr, item: T) -> u64 {
        let id = self.next;
        self.next += 1;
        self.by_id.insert(id, (sender, item));
        *self.per_sender.entry(sender).or_default() += 1;
        id
    }

    /// Gives `id` back; a sender holding none is forgotten.
    pub fn give_back(&mut self, id: u64) -> Option<T> {
        let (sender, item) = self.by_id.remove(&id)?;
        if let Some(n) = self.per_sender.get_mut(&sender) {
            *n -= 1;
            if *n == 0 {
                self.per_sender.remove(&sender);
            }
        }
        Some(item)
    }

    pub fn get(&self, id: u64) -> Option<&T> {
        self.by_id.get(&id).map(|(_, item)| item)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.by_id.get_mut(&id).map(|(_, item)| item)
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, IpAddr, &T)> {
        self.by_id
            .iter()
            .map(|(id, (sender, item))| (*id, *sender, item))
    }
}

/// The sender an address stands for: itself for IPv4 (an IPv4-mapped IPv6 address is the
/// IPv4 one), its /64 for IPv6.
pub fn sender(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::from(s)
            }
        },
    }
}

/// The open connections.
pub struct Conns {
    max: usize,
    /// `None`: senders are not limited (the peer is a trusted proxy).
    per_address: Option<usize>,
    inner: Mutex<Open>,
    metrics: Option<Metrics>,
}

/// The open connections, oldest first.
type Open = Holdings<Place>;

struct Place {
    state: Arc<Mutex<State>>,
    close: CancellationToken,
}

/// What a connection is doing, as its requests say.
struct State {
    /// Requests begun and not yet answered.
    requests: usize,
    /// The current request arrived whole.
    complete: bool,
    /// Its accept, its request's start, or its last answer.
    since: Instant,
    /// Chosen to be closed for another.
    closing: bool,
}

impl State {
    fn closable(&self, now: Instant) -> bool {
        !self.closing
            && now.duration_since(self.since) >= GRACE
            && (self.requests == 0 || !self.complete)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can panic while a lock is held; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection's place; given back when dropped. `close` is cancelled when the place is
/// taken for another connection.
pub struct Admitted {
    conns: Arc<Conns>,
    id: u64,
    pub close: CancellationToken,
    pub handle: ConnHandle,
}

/// What a request knows of its connection: it says when a request begins, when it has
/// arrived whole, and (by dropping the guard) when its answer is written.
#[derive(Clone)]
pub struct ConnHandle(Arc<Mutex<State>>);

/// A request in progress on its connection; dropped once its answer is written.
pub struct Request(Arc<Mutex<State>>);

impl ConnHandle {
    pub fn request(&self) -> Request {
        let mut s = lock(&self.0);
        s.requests += 1;
        s.complete = false;
        s.since = Instant::now();
        Request(self.0.clone())
    }

    /// The request arrived whole: the connection is kept until it is answered. `false` when
    /// the connection is already being closed for another.
    pub fn complete(&self) -> bool {
        let mut s = lock(&self.0);
        if s.closing {
            return false;
        }
        s.complete = true;
        true
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.requests = s.requests.saturating_sub(1);
        s.complete = false;
        s.since = Instant::now();
    }
}

impl Conns {
    pub fn new(max: usize, per_address: Option<usize>, metrics: Option<Metrics>) -> Arc<Conns> {
        Arc::new(Conns {
            max: max.max(1),
            per_address: per_address.map(|n| n.max(1)),
            inner: Mutex::new(Open::default()),
            metrics,
        })
    }

    /// A place for a connection from `address`, closing the oldest closable connection (of
    /// the same sender when it holds its share) when the places are taken.
    pub fn admit(self: &Arc<Conns>, address: IpAddr) -> Result<Admitted, Refused> {
        let sender = sender(address);
        let mut inner = lock(&self.inner);
        let held = inner.held_by(sender);
        if self.per_address.is_some_and(|share| held >= share) {
            self.close_oldest(&mut inner, Some(sender))
                .ok_or(Refused::AddressShare)?;
        } else if inner.count() >= self.max {
            self.close_oldest(&mut inner, None).ok_or(Refused::Full)?;
        }
        let state = Arc::new(Mutex::new(State {
            requests: 0,
            complete: false,
            since: Instant::now(),
            closing: false,
        }));
        let close = CancellationToken::new();
        let place = Place {
            state: state.clone(),
            close: close.clone(),
        };
        let id = inner.take(sender, place);
        self.count(&inner);
        Ok(Admitted {
            conns: self.clone(),
            id,
            close,
            handle: ConnHandle(state),
        })
    }

    /// Closes the oldest closable connection (of `of`, when given).
    fn close_oldest(&self, inner: &mut Open, of: Option<IpAddr>) -> Option<()> {
        let now = Instant::now();
        let id = inner
            .iter()
            .find(|(_, sender, p)| {
                if of.is_some_and(|s| s != *sender) {
                    return false;
                }
                // Marked as it is chosen, under its own lock: a request that arrives whole
                // at this moment either keeps its connection or learns it is closing.
                let mut state = lock(&p.state);
                let closable = state.closable(now);
                state.closing |= closable;
                closable
            })
            .map(|(id, _, _)| id)?;
        let place = self.forget(inner, id)?;
        place.close.cancel();
        Metrics::count_refusal(self.metrics.as_ref(), "evicted");
        Some(())
    }

    fn forget(&self, inner: &mut Open, id: u64) -> Option<Place> {
        let place = inner.give_back(id)?;
        self.count(inner);
        Some(place)
    }

    fn count(&self, inner: &Open) {
        if let Some(m) = &self.metrics {
            m.connections_open
                .set(i64::try_from(inner.count()).unwrap_or(i64::MAX));
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = lock(&self.conns.inner);
        self.conns.forget(&mut inner, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn aged() {
        std::thread::sleep(GRACE + Duration::from_millis(20));
    }

    #[test]
    fn a_sender_holds_at_most_its_share() {
        let c = Conns::new(10, Some(2), None);
        let a = c.admit(addr(1)).unwrap();
        let b = c.admit(addr(1)).unwrap();
        let other = c.admit(addr(2)).unwrap();
        // Within the grace of their accept, none is closed: the newcomer is refused.
        assert_eq!(c.admit(addr(1)).err(), Some(Refused::AddressShare));
        aged();
        // Its own oldest idle one makes room, not another sender's.
        let third = c.admit(addr(1)).unwrap();
        assert!(a.close.is_cancelled());
        assert!(!other.close.is_cancelled());
        let busy = (b.handle.request(), third.handle.request());
        assert!(b.handle.complete() && third.handle.complete());
        aged();
        assert_eq!(c.admit(addr(1)).err(), Some(Refused::AddressShare));
        assert!(c.admit(addr(3)).is_ok());
        drop(busy);
        // Behind a proxy, the peer is not limited.
        let proxied = Conns::new(10, None, None);
        let all: Vec<_> = (0..10).map(|_| proxied.admit(addr(1)).unwrap()).collect();
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn an_ipv6_sender_is_its_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let same: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(sender(one), sender(same));
        assert_ne!(sender(one), sender(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(sender(mapped), IpAddr::from([192, 0, 2, 7]));
    }

    #[test]
    fn a_full_port_closes_its_oldest_idle_or_stalled_connection_never_one_answering() {
        let c = Conns::new(3, None, None);
        let answering = c.admit(addr(1)).unwrap();
        let stalled = c.admit(addr(2)).unwrap();
        let idle = c.admit(addr(3)).unwrap();
        let whole = answering.handle.request();
        assert!(answering.handle.complete());
        let _mid_body = stalled.handle.request();
        aged();
        // The oldest closable: the one whose body has not come, not the one being answered.
        let fourth = c.admit(addr(4)).unwrap();
        assert!(!answering.close.is_cancelled());
        assert!(stalled.close.is_cancelled());
        // A closing connection's request cannot claim it arrived whole.
        assert!(!stalled.handle.complete());
        aged();
        let _fifth = c.admit(addr(5)).unwrap();
        assert!(idle.close.is_cancelled());
        // Once answered, a connection is idle: closable after a grace from its answer.
        drop(whole);
        let _sixth = c.admit(addr(6)).unwrap();
        assert!(!answering.close.is_cancelled());
        assert!(fourth.close.is_cancelled());
        aged();
        let _seventh = c.admit(addr(7)).unwrap();
        assert!(answering.close.is_cancelled());
    }
}
