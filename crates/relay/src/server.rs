//! The relay: a QUIC endpoint that admits listed agents, and the drain on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_common::config::RelayConfig;
use tether_common::identity::Identity;
use tether_common::protocol::CloseCode;
use tether_common::tls::{self, AgentPins, TlsError};
use tether_common::transport;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::Table;
use crate::session;

/// How long a drain may take before the relay exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: io::Error,
    },
}

/// What every task of the relay shares.
pub struct Shared {
    pub config: RelayConfig,
    pub pins: Arc<AgentPins>,
    table: Mutex<Table>,
    pub tasks: TaskTracker,
    /// Cancelled when the relay drains: listeners close, sessions end.
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table as consistent as any step left it.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A relay bound to its QUIC address, ready to [`Relay::run`].
pub struct Relay {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: tether_common::identity::Fingerprint,
}

impl Relay {
    /// Binds the QUIC endpoint on `config.listen`.
    pub fn bind(config: RelayConfig, identity: &Identity) -> Result<Self, RelayError> {
        let pins = Arc::new(AgentPins::new(config.agents.iter().map(|a| a.fingerprint)));
        let mut server = tls::server_config(identity, pins.clone())?;
        server.transport_config(transport::relay());
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| RelayError::Bind {
                address: config.listen,
                source,
            })?;
        let shared = Arc::new(Shared {
            config,
            pins,
            table: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        Ok(Self {
            endpoint,
            shared,
            fingerprint: identity.fingerprint(),
        })
    }

    /// The UDP address agents connect to (useful when `listen` had port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves agents and visitors until `shutdown` is cancelled, then drains: stops accepting,
    /// closes every session with [`CloseCode::RelayShutdown`] so agents reconnect at once, and
    /// returns within [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay {
            endpoint,
            shared,
            fingerprint,
        } = self;
        tracing::info!(
            listen = %endpoint.local_addr().map_or("?".into(), |a| a.to_string()),
            %fingerprint,
            agents = shared.config.agents.len(),
            "relay listening"
        );
        if shared.config.agents.is_empty() {
            tracing::warn!("relay.toml lists no [[agent]]: no agent can connect");
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        shared.tasks.spawn(session::serve(shared.clone(), incoming));
                    }
                    None => break,
                },
            }
        }
        shared.shutdown.cancel();
        let code = CloseCode::RelayShutdown;
        endpoint.close(code.code(), code.reason().as_bytes());
        shared.tasks.close();
        let drained = async {
            shared.tasks.wait().await;
            endpoint.wait_idle().await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
            tracing::warn!("drain took longer than {SHUTDOWN_GRACE:?}; exiting anyway");
        }
        tracing::info!("relay stopped");
    }
}
