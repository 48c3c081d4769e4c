//! tether's relay: the public side of the tunnel. It admits agents by their pinned keys, opens
//! the public ports each may have, and carries visitors' connections to them.

mod admission;
pub mod agents;
mod audit;
mod carriers;
pub mod cli;
mod enroll;
mod flows;
pub mod handover;
mod handshakes;
pub mod invites;
pub mod limits;
pub mod live;
pub mod metrics;
mod pace;
mod places;
mod public;
pub mod registry;
pub mod server;
pub mod session;
pub mod shared;
pub mod status;
mod tally;
pub mod udp;
pub mod visitor;

pub use limits::Limits;
pub use server::{Control, Relay, RelayError};

#[cfg(test)]
mod testing {
    use std::future::Future;
    use std::time::Duration;

    /// Awaits a unit test's body, failing it after 10 s.
    pub async fn within<T>(test: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test timed out")
    }
}
