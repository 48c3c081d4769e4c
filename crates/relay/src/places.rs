//! A limited number of places, in total and for each address: visitor connections open, to a
//! forward and to the whole relay. A place is held until its [`Place`] is dropped. Addresses are counted by
//! [`address_group`]: an IPv6 visitor by its /64.

use std::collections::HashMap;
use std::net::IpAddr;
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
    by_address: HashMap<IpAddr, usize>,
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
    address: IpAddr,
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
        let address = address_group(address);
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

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.lock().total
    }

    /// Whether every place is taken.
    pub fn full(&self) -> bool {
        self.taken() >= self.max
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

#[cfg(test)]
mod tests {
    use super::*;

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
