//! Which visitors one forward lets in: those its `allow_from` admits, up to a cap of open TCP
//! connections for the forward and for each visitor address. A visitor refused here never
//! reaches the agent.

use std::net::IpAddr;
use std::sync::Arc;

use tether_common::net::cidr::Cidr;

use crate::places::{Full, Place, Places};

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
    open: Arc<Places>,
}

impl Admission {
    /// `allow_from` empty lets every address in.
    pub fn new(allow_from: Vec<Cidr>, max_open: usize, max_open_per_address: usize) -> Self {
        Self {
            allow_from,
            open: Arc::new(Places::new(max_open, max_open_per_address)),
        }
    }

    /// Whether `address` may reach the forward at all.
    pub fn allows(&self, address: IpAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|b| b.contains(address))
    }

    /// Whether `place` was given by this admission.
    pub fn gave(&self, place: &Place) -> bool {
        place.is_of(&self.open)
    }

    /// Takes a place for a new connection from `address`, held until the place is dropped.
    pub fn admit(&self, address: IpAddr) -> Result<Place, Refused> {
        if !self.allows(address) {
            return Err(Refused::NotAllowed);
        }
        self.open.take(address).map_err(|full| match full {
            Full::Total => Refused::ForwardFull,
            Full::Address => Refused::AddressFull,
        })
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
        let door = Admission::new(blocks, 10, 10);
        assert!(door.admit(ip("203.0.113.77")).is_ok());
        assert!(door.admit(ip("2001:db8::5")).is_ok());
        assert_eq!(
            door.admit(ip("198.51.100.1")).err(),
            Some(Refused::NotAllowed)
        );
        let open = Admission::new(vec![], 10, 10);
        assert!(open.admit(ip("198.51.100.1")).is_ok());
    }

    #[test]
    fn the_caps_say_which_limit_a_visitor_met() {
        let door = Admission::new(vec![], 2, 1);
        let _first = door.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            door.admit(ip("192.0.2.1")).err(),
            Some(Refused::AddressFull)
        );
        let _second = door.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(
            door.admit(ip("192.0.2.3")).err(),
            Some(Refused::ForwardFull)
        );
    }
}
