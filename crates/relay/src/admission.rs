//! Which visitors one forward lets in: those its `allow_from` admits, up to a cap of open TCP
//! connections for the forward and for each visitor address. A visitor refused here never
//! reaches the agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tether_common::cidr::Cidr;

/// Why a visitor was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not in the forward's `allow_from`.
    NotAllowed,
    /// The forward has its most open connections.
    ForwardFull,
    /// The visitor's address has its most open connections to the forward.
    AddressFull,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::NotAllowed => "not in the forward's allow_from",
            Refused::ForwardFull => "the forward has its most open connections",
            Refused::AddressFull => "the visitor's address has its most open connections",
        }
    }
}

/// One forward's door.
pub struct Admission {
    allow_from: Vec<Cidr>,
    max_open: usize,
    max_open_per_address: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted visitor connection; dropping it frees its place.
pub struct Ticket {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    /// `allow_from` empty lets every address in.
    pub fn new(allow_from: Vec<Cidr>, max_open: usize, max_open_per_address: usize) -> Self {
        Self {
            allow_from,
            max_open,
            max_open_per_address,
            open: Mutex::default(),
        }
    }

    /// Whether `address` may reach the forward at all.
    pub fn allows(&self, address: IpAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|b| b.contains(address))
    }

    /// Takes a place for a new connection from `address`.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Ticket, Refused> {
        if !self.allows(address) {
            return Err(Refused::NotAllowed);
        }
        let mut open = self.lock();
        if open.total >= self.max_open {
            return Err(Refused::ForwardFull);
        }
        let from_address = open.by_address.entry(address).or_default();
        if *from_address >= self.max_open_per_address {
            return Err(Refused::AddressFull);
        }
        *from_address += 1;
        open.total += 1;
        Ok(Ticket {
            admission: self.clone(),
            address,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total -= 1;
        if let Some(count) = open.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn allow_from_lets_in_its_blocks_only() {
        let blocks = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let door = Arc::new(Admission::new(blocks, 10, 10));
        assert!(door.admit(ip("203.0.113.77")).is_ok());
        assert!(door.admit(ip("2001:db8::5")).is_ok());
        assert_eq!(
            door.admit(ip("198.51.100.1")).err(),
            Some(Refused::NotAllowed)
        );
        let open = Arc::new(Admission::new(vec![], 10, 10));
        assert!(open.admit(ip("198.51.100.1")).is_ok());
    }

    #[test]
    fn caps_hold_per_forward_and_per_address_and_free_on_drop() {
        let door = Arc::new(Admission::new(vec![], 3, 2));
        let a1 = door.admit(ip("192.0.2.1")).unwrap();
        let _a2 = door.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            door.admit(ip("192.0.2.1")).err(),
            Some(Refused::AddressFull)
        );
        let _b1 = door.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(
            door.admit(ip("192.0.2.3")).err(),
            Some(Refused::ForwardFull)
        );
        assert_eq!(door.open(), 3);
        drop(a1);
        assert_eq!(door.open(), 2);
        let _a3 = door.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(door.lock().by_address.len(), 2);
    }
}
