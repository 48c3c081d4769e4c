//! Ports and ranges as the configs and the protocol speak of them: `2222`, `60000-60010`,
//! `2222/tcp`.

use std::fmt;
use std::str::FromStr;

/// The transport a forward carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn wire(self) -> u8 {
        match self {
            Proto::Tcp => 1,
            Proto::Udp => 2,
        }
    }

    pub fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Proto::Tcp),
            2 => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(()),
        }
    }
}

/// A non-empty, inclusive range of non-zero ports. A single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// `None` if the range is empty or includes port 0.
    pub fn new(start: u16, end: u16) -> Option<Self> {
        (start != 0 && start <= end).then_some(Self { start, end })
    }

    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    pub fn start(self) -> u16 {
        self.start
    }

    pub fn end(self) -> u16 {
        self.end
    }

    /// How many ports: 1 to 65,535.
    pub fn size(self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn overlaps(self, other: PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }

    /// The port at the same position in `self` as `port` is in `from`: how a range maps one to
    /// one onto another of the same length.
    pub fn map_from(self, from: PortRange, port: u16) -> Option<u16> {
        if !from.contains(port) || from.size() != self.size() {
            return None;
        }
        Some(self.start + (port - from.start))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Text that is not a port (1-65535) or a range `A-B` of them with A <= B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRange;

impl FromStr for PortRange {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<Self, BadRange> {
        let port = |p: &str| p.parse::<u16>().map_err(|_| BadRange);
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        PortRange::new(start, end).ok_or(BadRange)
    }
}

/// An entry of a relay's allowlist: `2222/tcp`, `60000-60010/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub proto: Proto,
    pub range: PortRange,
}

impl FromStr for PortSpec {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<Self, BadRange> {
        let (range, proto) = s.split_once('/').ok_or(BadRange)?;
        Ok(PortSpec {
            proto: proto.parse().map_err(|()| BadRange)?,
            range: range.parse()?,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.range, self.proto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print() {
        assert_eq!("22".parse(), Ok(PortRange::single(22).unwrap()));
        assert_eq!(
            "60000-60010".parse(),
            Ok(PortRange::new(60000, 60010).unwrap())
        );
        assert_eq!(
            "60000-60010".parse::<PortRange>().unwrap().to_string(),
            "60000-60010"
        );
        assert_eq!("65535".parse::<PortRange>().unwrap().size(), 1);
        assert_eq!("1-65535".parse::<PortRange>().unwrap().size(), 65535);
        for bad in [
            "", "0", "65536", "10-9", "a", "1-", "-1", "1-2-3", " 22", "0-5",
        ] {
            assert_eq!(bad.parse::<PortRange>(), Err(BadRange), "{bad:?}");
        }
    }

    #[test]
    fn specs_parse_and_print() {
        let spec: PortSpec = "60000-60010/udp".parse().unwrap();
        assert_eq!(spec.proto, Proto::Udp);
        assert_eq!(spec.to_string(), "60000-60010/udp");
        for bad in ["2222", "2222/sctp", "/tcp", "2222/", "2222/TCP"] {
            assert_eq!(bad.parse::<PortSpec>(), Err(BadRange), "{bad:?}");
        }
    }

    #[test]
    fn ranges_map_one_to_one() {
        let public = PortRange::new(60000, 60010).unwrap();
        let local = PortRange::new(61000, 61010).unwrap();
        assert_eq!(local.map_from(public, 60000), Some(61000));
        assert_eq!(local.map_from(public, 60010), Some(61010));
        assert_eq!(local.map_from(public, 60011), None);
        let short = PortRange::new(61000, 61001).unwrap();
        assert_eq!(short.map_from(public, 60000), None);
    }

    #[test]
    fn overlaps() {
        let a = PortRange::new(10, 20).unwrap();
        assert!(a.overlaps(PortRange::new(20, 30).unwrap()));
        assert!(a.overlaps(PortRange::single(15).unwrap()));
        assert!(!a.overlaps(PortRange::new(21, 30).unwrap()));
    }
}
