//! The memory budget every body not yet verified shares: a body takes its declared size (or
//! what has arrived, when none is declared) before it is read, and gives it back once it is
//! verified or turned away. When the budget is short, bodies are cut to make room: any
//! larger than the newcomer's, and any that has been arriving for longer than
//! `CUTTABLE_AFTER` (a real sender's body arrives in one burst), oldest first. Filling the
//! budget takes large bodies (the connections are too few to fill it with small ones), so a
//! real delivery, a few kilobytes, always finds room; when none can be made, the newcomer is
//! turned away (503) rather than buffered.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::server::conns::{self, Holdings};

/// A body younger than this is not cut to make room for another of its size or larger: the
/// bodies of real senders are complete well within it.
pub const CUTTABLE_AFTER: Duration = Duration::from_millis(250);

/// Why a body could not have budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// Its address already has its share of bodies being read.
    AddressShare,
    /// Every byte is held by bodies too young to cut.
    Exhausted,
}

/// The shared budget.
pub struct Budget {
    total: usize,
    per_address: usize,
    inner: Mutex<Inner>,
    metrics: Option<Metrics>,
}

#[derive(Default)]
struct Inner {
    in_use: usize,
    /// The most held since the last `peak_since` (to tell when a storm has passed).
    peak: usize,
    /// The bodies being read, oldest first.
    held: Holdings<Holder>,
}

struct Holder {
    bytes: usize,
    since: Instant,
    cut: CancellationToken,
}

/// A body's share of the budget; given back when dropped.
pub struct Lease {
    budget: Arc<Budget>,
    id: u64,
    cut: CancellationToken,
}

impl Budget {
    pub fn new(total: usize, per_address: usize, metrics: Option<Metrics>) -> Arc<Budget> {
        if let Some(m) = &metrics {
            m.body_budget.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        Arc::new(Budget {
            total,
            per_address: per_address.max(1),
            inner: Mutex::new(Inner::default()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here can panic while the lock is held; a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// The budget's size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The most held since the last call, which starts counting again from what is held now.
    pub fn peak_since(&self) -> usize {
        let mut inner = self.lock();
        let peak = inner.peak;
        inner.peak = inner.in_use;
        peak
    }

    /// `bytes` for a body from `address`, cutting the oldest bodies if that makes room.
    pub fn take(self: &Arc<Budget>, address: IpAddr, bytes: usize) -> Result<Lease, Short> {
        let address = conns::sender(address);
        let mut inner = self.lock();
        if inner.held.held_by(address) >= self.per_address {
            return Err(Short::AddressShare);
        }
        self.make_room(&mut inner, bytes, bytes, None)?;
        let cut = CancellationToken::new();
        let holder = Holder {
            bytes,
            since: Instant::now(),
            cut: cut.clone(),
        };
        let id = inner.held.take(address, holder);
        self.add(&mut inner, bytes as i64);
        Ok(Lease {
            budget: self.clone(),
            id,
            cut,
        })
    }

    /// Frees `bytes` for a body of `size` by cutting bodies larger than it or older than
    /// `CUTTABLE_AFTER`, oldest first (never `except`, itself); their bytes are handed over at
    /// once, and each sees its `cut`.
    fn make_room(
        &self,
        inner: &mut Inner,
        bytes: usize,
        size: usize,
        except: Option<u64>,
    ) -> Result<(), Short> {
        if inner.in_use + bytes <= self.total {
            return Ok(());
        }
        let now = Instant::now();
        let mut freed = 0;
        let mut victims = Vec::new();
        for (id, _, h) in inner.held.iter() {
            if inner.in_use - freed + bytes <= self.total {
                break;
            }
            let cuttable = h.bytes > size || now.duration_since(h.since) >= CUTTABLE_AFTER;
            if cuttable && Some(id) != except {
                freed += h.bytes;
                victims.push(id);
            }
        }
        if inner.in_use - freed + bytes > self.total {
            return Err(Short::Exhausted);
        }
        for id in victims {
            if let Some(h) = self.forget(inner, id) {
                h.cut.cancel();
                Metrics::count_refusal(self.metrics.as_ref(), "cut");
            }
        }
        Ok(())
    }

    fn forget(&self, inner: &mut Inner, id: u64) -> Option<Holder> {
        let h = inner.held.give_back(id)?;
        self.add(inner, -(h.bytes as i64));
        Some(h)
    }

    fn add(&self, inner: &mut Inner, delta: i64) {
        inner.in_use = inner.in_use.saturating_add_signed(delta as isize);
        inner.peak = inner.peak.max(inner.in_use);
        if let Some(m) = &self.metrics {
            m.body_budget_in_use
                .set(i64::try_from(inner.in_use).unwrap_or(i64::MAX));
        }
    }
}

impl Lease {
    /// `more` bytes for the same body (one whose size was not declared).
    pub fn grow(&mut self, more: usize) -> Result<(), Short> {
        let budget = self.budget.clone();
        let mut inner = budget.lock();
        let Some(size) = inner.held.get(self.id).map(|h| h.bytes + more) else {
            return Err(Short::Exhausted);
        };
        budget.make_room(&mut inner, more, size, Some(self.id))?;
        if let Some(h) = inner.held.get_mut(self.id) {
            h.bytes += more;
        }
        budget.add(&mut inner, more as i64);
        Ok(())
    }

    /// Resolves when the body was cut to make room for another.
    pub async fn cut(&self) {
        self.cut.cancelled().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.budget.lock();
        self.budget.forget(&mut inner, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// Waits, a second at most, for `lease`'s body to be cut.
    async fn cut_soon(lease: &Lease) {
        let waited = tokio::time::timeout(Duration::from_secs(1), lease.cut()).await;
        assert!(waited.is_ok(), "the body was not cut");
    }

    #[test]
    fn bodies_share_the_budget_and_give_it_back() {
        let b = Budget::new(100, 10, None);
        let one = b.take(addr(1), 50).unwrap();
        assert_eq!(b.in_use(), 50);
        let two = b.take(addr(2), 50).unwrap();
        // Both too young to cut, and no larger than the newcomer: it is turned away.
        assert_eq!(b.take(addr(3), 50).err(), Some(Short::Exhausted));
        assert_eq!(b.in_use(), 100);
        drop(one);
        drop(two);
        assert_eq!(b.in_use(), 0);
        assert_eq!(b.peak_since(), 100);
        assert_eq!(b.peak_since(), 0);
    }

    #[tokio::test]
    async fn a_larger_body_is_cut_for_a_smaller_one_however_young() {
        let b = Budget::new(100, 10, None);
        let small = b.take(addr(1), 10).unwrap();
        let large = b.take(addr(2), 80).unwrap();
        let newcomer = b.take(addr(3), 20).unwrap();
        cut_soon(&large).await;
        assert!(!small.cut.is_cancelled());
        assert_eq!(b.in_use(), 30);
        drop((small, large, newcomer));
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn the_oldest_body_is_cut_to_make_room() {
        let b = Budget::new(100, 10, None);
        let old = b.take(addr(1), 60).unwrap();
        let older_too = b.take(addr(3), 30).unwrap();
        std::thread::sleep(CUTTABLE_AFTER + Duration::from_millis(20));
        // As large as the oldest, which is cut for its age; that was enough.
        let new = b.take(addr(2), 60).unwrap();
        cut_soon(&old).await;
        assert!(!older_too.cut.is_cancelled());
        assert_eq!(b.in_use(), 90);
        drop(old);
        assert_eq!(b.in_use(), 90);
        drop((new, older_too));
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn an_address_has_a_share_of_the_bodies() {
        let b = Budget::new(1000, 2, None);
        let _a = b.take(addr(1), 1).unwrap();
        let _b = b.take(addr(1), 1).unwrap();
        assert_eq!(b.take(addr(1), 1).err(), Some(Short::AddressShare));
        assert!(b.take(addr(2), 1).is_ok());
    }

    #[test]
    fn a_body_of_unknown_size_grows_within_the_budget() {
        let b = Budget::new(100, 10, None);
        let mut lease = b.take(addr(1), 0).unwrap();
        lease.grow(70).unwrap();
        let _other = b.take(addr(2), 30).unwrap();
        assert_eq!(lease.grow(1), Err(Short::Exhausted));
        assert_eq!(b.in_use(), 100);
        drop(lease);
        assert_eq!(b.in_use(), 30);
    }
}
