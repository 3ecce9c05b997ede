//! The webhook port's places: at most `max_connections` open, at most a share of them per
//! peer address. When a newcomer finds its address's share or every place taken, the oldest
//! connection (of that address, or of all) that is not busy with a delivery (idle between
//! requests, or still waiting for a request or a body that does not come) is closed to make
//! room, so that senders holding connections open cannot keep a real delivery out, and a
//! proxy that carries every sender is not turned away for holding its share.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds its share of the places, each busy with a delivery.
    AddressShare,
    /// Every place is busy with a delivery.
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

/// The open connections.
pub struct Conns {
    max: usize,
    /// `None`: addresses are not limited (the peer is a trusted proxy).
    per_address: Option<usize>,
    inner: Mutex<Inner>,
    metrics: Option<Metrics>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// By age: the first is the oldest.
    open: BTreeMap<u64, Place>,
    by_address: HashMap<IpAddr, usize>,
}

struct Place {
    address: IpAddr,
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// A connection's place; given back when dropped. `close` is cancelled when the place is
/// taken for another connection.
pub struct Admitted {
    conns: Arc<Conns>,
    id: u64,
    pub close: CancellationToken,
    pub handle: ConnHandle,
}

/// What a request knows of its connection: it marks the connection busy while it handles a
/// delivery, so that the connection is not closed for another.
#[derive(Clone)]
pub struct ConnHandle {
    busy: Arc<AtomicUsize>,
}

/// The connection is busy while this lives.
pub struct Busy(Arc<AtomicUsize>);

impl ConnHandle {
    pub fn busy(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conns {
    pub fn new(max: usize, per_address: Option<usize>, metrics: Option<Metrics>) -> Arc<Conns> {
        Arc::new(Conns {
            max: max.max(1),
            per_address: per_address.map(|n| n.max(1)),
            inner: Mutex::new(Inner::default()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here can panic while the lock is held; a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// A place for a connection from `address`, closing the oldest connection not busy (of
    /// the same address when it holds its share) when the places are taken.
    pub fn admit(self: &Arc<Conns>, address: IpAddr) -> Result<Admitted, Refused> {
        let mut inner = self.lock();
        let held = inner.by_address.get(&address).copied().unwrap_or(0);
        if self.per_address.is_some_and(|share| held >= share) {
            self.close_oldest_idle(&mut inner, Some(address))
                .ok_or(Refused::AddressShare)?;
        } else if inner.open.len() >= self.max {
            self.close_oldest_idle(&mut inner, None)
                .ok_or(Refused::Full)?;
        }
        let id = inner.next;
        inner.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        inner.open.insert(
            id,
            Place {
                address,
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        *inner.by_address.entry(address).or_default() += 1;
        self.count(&inner);
        Ok(Admitted {
            conns: self.clone(),
            id,
            close,
            handle: ConnHandle { busy },
        })
    }

    /// Closes the oldest connection not busy with a delivery (from `of`, when given).
    fn close_oldest_idle(&self, inner: &mut Inner, of: Option<IpAddr>) -> Option<()> {
        let id = inner
            .open
            .iter()
            .find(|(_, p)| of.is_none_or(|a| a == p.address) && p.busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id)?;
        let place = self.forget(inner, id)?;
        place.close.cancel();
        if let Some(m) = &self.metrics {
            m.inbound_refusal("evicted");
        }
        Some(())
    }

    fn forget(&self, inner: &mut Inner, id: u64) -> Option<Place> {
        let place = inner.open.remove(&id)?;
        if let Some(n) = inner.by_address.get_mut(&place.address) {
            *n -= 1;
            if *n == 0 {
                inner.by_address.remove(&place.address);
            }
        }
        self.count(inner);
        Some(place)
    }

    fn count(&self, inner: &Inner) {
        if let Some(m) = &self.metrics {
            m.connections_open
                .set(i64::try_from(inner.open.len()).unwrap_or(i64::MAX));
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.conns.lock();
        self.conns.forget(&mut inner, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn an_address_holds_at_most_its_share() {
        let c = Conns::new(10, Some(2), None);
        let a = c.admit(addr(1)).unwrap();
        let b = c.admit(addr(1)).unwrap();
        let other = c.admit(addr(2)).unwrap();
        // Its own oldest idle one makes room, not another address's.
        let third = c.admit(addr(1)).unwrap();
        assert!(a.close.is_cancelled());
        assert!(!other.close.is_cancelled());
        let _busy = (b.handle.busy(), third.handle.busy());
        assert_eq!(c.admit(addr(1)).err(), Some(Refused::AddressShare));
        assert!(c.admit(addr(3)).is_ok());
        // Behind a proxy, the peer is not limited.
        let proxied = Conns::new(10, None, None);
        let all: Vec<_> = (0..10).map(|_| proxied.admit(addr(1)).unwrap()).collect();
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn a_full_port_closes_its_oldest_idle_connection_never_a_busy_one() {
        let c = Conns::new(2, None, None);
        let first = c.admit(addr(1)).unwrap();
        let second = c.admit(addr(2)).unwrap();
        let delivering = first.handle.busy();
        let third = c.admit(addr(3)).unwrap();
        assert!(!first.close.is_cancelled(), "busy: kept");
        assert!(
            second.close.is_cancelled(),
            "the oldest idle one makes room"
        );
        assert_eq!(c.open(), 2);
        let _also_busy = third.handle.busy();
        assert_eq!(c.admit(addr(4)).err(), Some(Refused::Full));
        drop(delivering);
        let fourth = c.admit(addr(4)).unwrap();
        assert!(first.close.is_cancelled());
        drop(second);
        drop(first);
        assert_eq!(c.open(), 2);
        drop(fourth);
        assert_eq!(c.open(), 1);
    }
}
