//! The relay: a QUIC endpoint that admits listed agents, and the drain on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_common::config::RelayConfig;
use tether_common::datagram::UdpCounters;
use tether_common::identity::Identity;
use tether_common::protocol::CloseCode;
use tether_common::tls::{self, AgentPins, TlsError};
use tether_common::transport;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::Table;
use crate::session;

/// The relay's timings. The defaults are the product's; tests shorten them to see each limit
/// work without waiting for it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a QUIC and TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long an authenticated agent may take to open its control stream and say Hello.
    pub hello_timeout: Duration,
    /// How long a visitor who arrives while its agent is away waits for the agent's return.
    pub visitor_wait: Duration,
    /// How long an agent that went away keeps its public ports.
    pub port_hold: Duration,
    /// How long a drain may take before the relay exits anyway.
    pub shutdown_grace: Duration,
    /// UDP flows one forward carries at once; a new one evicts the longest idle.
    pub max_flows_per_forward: usize,
    /// UDP flows one visitor address has on one forward at once (mosh hops source ports, and a
    /// few visitors may share a NAT's address).
    pub max_flows_per_visitor: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            visitor_wait: Duration::from_secs(5),
            port_hold: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_flows_per_forward: 256,
            max_flows_per_visitor: 32,
        }
    }
}

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
    pub limits: Limits,
    table: Mutex<Table>,
    pub tasks: TaskTracker,
    /// Cancelled when the relay drains: listeners close, sessions end.
    pub shutdown: CancellationToken,
    pub udp: Arc<UdpCounters>,
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
        Self::bind_with(config, identity, Limits::default())
    }

    /// [`Relay::bind`] with other timings.
    pub fn bind_with(
        config: RelayConfig,
        identity: &Identity,
        limits: Limits,
    ) -> Result<Self, RelayError> {
        let pins = Arc::new(AgentPins::new(config.agents.iter().map(|a| a.fingerprint)));
        let mut server = tls::server_config(identity, pins)?;
        server.transport_config(transport::relay());
        let endpoint = std::net::UdpSocket::bind(config.listen)
            .and_then(|socket| {
                let runtime = Arc::new(quinn::TokioRuntime);
                let endpoint = transport::relay_endpoint(identity);
                quinn::Endpoint::new(endpoint, Some(server), socket, runtime)
            })
            .map_err(|source| RelayError::Bind {
                address: config.listen,
                source,
            })?;
        let shared = Arc::new(Shared {
            config,
            limits,
            table: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            udp: Arc::default(),
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

    /// What happened to UDP traffic since the relay started.
    pub fn udp_counters(&self) -> Arc<UdpCounters> {
        self.shared.udp.clone()
    }

    /// Serves agents and visitors until `shutdown` is cancelled, then drains: stops accepting,
    /// closes every session with [`CloseCode::RelayShutdown`] so agents reconnect at once, and
    /// returns within [`Limits::shutdown_grace`].
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
        let grace = shared.limits.shutdown_grace;
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("drain took longer than {grace:?}; exiting anyway");
        }
        tracing::info!("relay stopped");
    }
}
