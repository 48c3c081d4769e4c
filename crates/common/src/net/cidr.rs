//! Address blocks in CIDR notation (`203.0.113.0/24`, `2001:db8::/32`), for a forward's
//! `allow_from` list of visitors; and the block a visitor's address counts in for the caps per
//! address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One block of addresses: an address whose bits past `prefix` are all zero, and the prefix
/// length. IPv4 blocks match IPv4 visitors, including those seen as IPv4-mapped IPv6 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected an address or ADDRESS/PREFIX like \"203.0.113.0/24\"")]
    Syntax,
    #[error("the prefix length of an {family} block is at most {max}")]
    Prefix { family: &'static str, max: u8 },
    #[error("bits are set past the prefix; the block is {0}")]
    HostBits(Cidr),
    #[error("write an IPv4 block in IPv4 form, like \"203.0.113.0/24\"")]
    Mapped,
}

impl Cidr {
    /// A block from its parts, refused if the prefix is too long or host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        if addr != addr.to_canonical() {
            return Err(CidrError::Mapped);
        }
        let max = bits(addr);
        if prefix > max {
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(CidrError::Prefix { family, max });
        }
        let block = Cidr {
            addr: masked(addr, prefix),
            prefix,
        };
        if block.addr != addr {
            return Err(CidrError::HostBits(block));
        }
        Ok(block)
    }

    pub fn addr(self) -> IpAddr {
        self.addr
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn contains(self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix) == self.addr
    }
}

fn bits(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// What the caps per address count a visitor's address as: an IPv4 address alone, an IPv6
/// address by its /64. One home or one server is given a whole /64, so counting its addresses
/// apart would let one visitor walk past every cap.
pub fn address_group(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => masked(v6, 64),
    }
}

fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u32::from(v4) & mask).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u128::from(v6) & mask).to_be_bytes())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDRESS/PREFIX`, or a bare address for a block of one.
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => {
                let digits = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
                let prefix = digits.then(|| prefix.parse::<u8>().ok()).flatten();
                (addr, Some(prefix.ok_or(CidrError::Syntax)?))
            }
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax)?;
        Cidr::new(addr, prefix.unwrap_or_else(|| bits(addr)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_visitors_count_by_their_64_and_ipv4_ones_alone() {
        let group = |text: &str| address_group(text.parse().unwrap()).to_string();
        assert_eq!(group("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(group("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_eq!(group("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(group("203.0.113.7"), "203.0.113.7");
        assert_eq!(group("::ffff:203.0.113.7"), "203.0.113.7");
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_and_no_others() {
        let v4: Cidr = "203.0.113.0/24".parse().unwrap();
        assert!(v4.contains(ip("203.0.113.0")));
        assert!(v4.contains(ip("203.0.113.255")));
        assert!(v4.contains(ip("::ffff:203.0.113.9")));
        assert!(!v4.contains(ip("203.0.114.1")));
        assert!(!v4.contains(ip("2001:db8::1")));

        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.1")));

        let one: Cidr = "198.51.100.7".parse().unwrap();
        assert_eq!(one.to_string(), "198.51.100.7/32");
        assert!(one.contains(ip("198.51.100.7")));
        assert!(!one.contains(ip("198.51.100.8")));

        let everyone: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(everyone.contains(ip("192.0.2.1")));
        assert!(!everyone.contains(ip("::1")));
        let everyone6: Cidr = "::/0".parse().unwrap();
        assert!(everyone6.contains(ip("::1")));
    }

    #[test]
    fn bad_blocks_say_what_is_wrong() {
        for text in [
            "",
            "/24",
            "203.0.113.0/",
            "203.0.113.0/x",
            "203.0.113.0/+8",
            "foo",
        ] {
            assert_eq!(text.parse::<Cidr>(), Err(CidrError::Syntax), "{text}");
        }
        assert_eq!(
            "203.0.113.0/33".parse::<Cidr>().unwrap_err().to_string(),
            "the prefix length of an IPv4 block is at most 32"
        );
        assert_eq!(
            "2001:db8::/129".parse::<Cidr>().unwrap_err().to_string(),
            "the prefix length of an IPv6 block is at most 128"
        );
        assert_eq!(
            "203.0.113.5/24".parse::<Cidr>().unwrap_err().to_string(),
            "bits are set past the prefix; the block is 203.0.113.0/24"
        );
    }

    #[test]
    fn ipv4_blocks_are_written_as_ipv4() {
        for text in ["::ffff:203.0.113.0/120", "::ffff:203.0.113.7"] {
            assert_eq!(text.parse::<Cidr>(), Err(CidrError::Mapped), "{text}");
        }
    }
}
