//! A limited number of places: [`Places`] in total and for each address (a forward's visitor
//! connections), [`Seats`] in total only (the whole relay's). A place is held until its
//! [`Place`] or [`Seat`] is dropped. Addresses are counted by [`address_group`]: an IPv6
//! visitor by its /64.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tether_common::net::cidr::address_group;

pub struct Places {
    max: usize,
    max_per_address: usize,
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    total: usize,
    by_address: HashMap<Group, usize>,
}

/// An address's group ([`address_group`]), an IPv4 one mapped into IPv6: 16 bytes, where an
/// `IpAddr` takes 17 and, beside a reference, 24 in every visitor's future.
type Group = Ipv6Addr;

fn group_of(address: IpAddr) -> Group {
    match address_group(address) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Which limit a refused place met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Address,
}

/// One place, given back when dropped.
pub struct Place {
    places: Arc<Places>,
    address: Group,
}

impl Place {
    /// Whether the place is one of `places`.
    pub fn is_of(&self, places: &Arc<Places>) -> bool {
        Arc::ptr_eq(&self.places, places)
    }
}

impl Places {
    pub fn new(max: usize, max_per_address: usize) -> Self {
        Self {
            max,
            max_per_address,
            taken: Mutex::default(),
        }
    }

    /// Takes a place for `address`, if both limits allow.
    pub fn take(self: &Arc<Self>, address: IpAddr) -> Result<Place, Full> {
        let address = group_of(address);
        let mut taken = self.lock();
        if taken.total >= self.max {
            return Err(Full::Total);
        }
        let of_address = taken.by_address.entry(address).or_default();
        if *of_address >= self.max_per_address {
            return Err(Full::Address);
        }
        *of_address += 1;
        taken.total += 1;
        Ok(Place {
            places: self.clone(),
            address,
        })
    }

    #[cfg(test)]
    fn taken(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut taken = self.places.lock();
        taken.total -= 1;
        if let Some(count) = taken.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                taken.by_address.remove(&self.address);
            }
        }
    }
}

/// A number of places with no limit per address. One is held by every visitor connection, so
/// it is a counter and a reference: no lock, no entry per address.
pub struct Seats {
    max: usize,
    taken: AtomicUsize,
}

/// One of the [`Seats`], given back when dropped.
pub struct Seat(Arc<Seats>);

impl Seats {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            taken: AtomicUsize::new(0),
        }
    }

    /// Takes a seat, if one is free.
    pub fn take(self: &Arc<Self>) -> Option<Seat> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < self.max).then_some(taken + 1)
            })
            .ok()?;
        Some(Seat(self.clone()))
    }

    #[cfg(test)]
    fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_stop_at_their_number_and_come_back_on_drop() {
        let seats = Arc::new(Seats::new(2));
        let first = seats.take().unwrap();
        let _second = seats.take().unwrap();
        assert!(seats.take().is_none());
        assert_eq!(seats.taken(), 2);
        drop(first);
        assert_eq!(seats.taken(), 1);
        let _third = seats.take().unwrap();
        assert!(seats.take().is_none());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn limits_hold_in_total_and_per_address_and_places_come_back_on_drop() {
        let places = Arc::new(Places::new(3, 2));
        let a1 = places.take(ip(1)).unwrap();
        let _a2 = places.take(ip(1)).unwrap();
        assert_eq!(places.take(ip(1)).err(), Some(Full::Address));
        let _b = places.take(ip(2)).unwrap();
        assert_eq!(places.take(ip(3)).err(), Some(Full::Total));
        assert_eq!(places.taken(), 3);
        drop(a1);
        assert_eq!(places.taken(), 2);
        let _a3 = places.take(ip(1)).unwrap();
        drop(_b);
        // An address with no place left is forgotten.
        assert_eq!(places.lock().by_address.len(), 1);
    }

    #[test]
    fn the_addresses_of_one_ipv6_64_share_its_places() {
        let places = Arc::new(Places::new(100, 2));
        let v6 = |text: &str| text.parse::<IpAddr>().unwrap();
        let _one = places.take(v6("2001:db8:0:1::1")).unwrap();
        let _two = places.take(v6("2001:db8:0:1::2")).unwrap();
        assert_eq!(
            places.take(v6("2001:db8:0:1::3")).err(),
            Some(Full::Address)
        );
        let _other_64 = places.take(v6("2001:db8:0:2::1")).unwrap();
    }
}
