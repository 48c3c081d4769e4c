//! A NAT lab scene, ready for a scenario: the relay on the VPS side, the agent behind the NAT,
//! a service at home and a visitor connected to it through the relay.

use std::time::{Duration, Instant};

use crate::lab::{session_of, Lab, Peer, Shim, RELAY_LISTEN, RELAY_PUBLIC};
use crate::process::Process;

/// How long a visitor waits for an answer that should come at once.
pub const AT_ONCE: &str = "2000";

/// A lab with a relay, an agent with `settings`, `service` (a lab-peer mode) on home's port
/// 7000, and a visitor connected to it through relay port 7000.
pub struct Scene {
    pub lab: Lab,
    pub relay: Process,
    /// Runs until the scene is dropped.
    _shim: Option<Peer>,
    pub agent: Process,
    pub session: String,
    pub service: Peer,
    pub visitor: Peer,
}

impl Scene {
    pub async fn start(settings: &str, service: &str) -> Self {
        Self::start_via(None, settings, service).await
    }

    /// With `shim`, the agent reaches the relay through the impairment shim.
    pub async fn start_via(shim: Option<Shim>, settings: &str, service: &str) -> Self {
        Self::start_with(shim, "", settings, service).await
    }

    /// With `relay_settings` in relay.toml too.
    pub async fn start_with(
        shim: Option<Shim>,
        relay_settings: &str,
        settings: &str,
        service: &str,
    ) -> Self {
        let lab = Lab::build();
        let (service, ready) = lab.peer(&lab.home, &[service, "127.0.0.1:7000"]).await;
        assert_eq!(ready, "listening");
        let relay = lab.start_relay_with(relay_settings).await;
        let (shim, relay_address) = match shim {
            Some(shim) => {
                let (shim, address) = lab.start_shim(shim).await;
                (Some(shim), address)
            }
            None => (None, RELAY_LISTEN),
        };
        let (agent, session) = lab.start_agent_via(relay_address, settings).await;
        let public = format!("{RELAY_PUBLIC}:7000");
        let (visitor, connected) = lab.peer(&lab.visitor, &["client", &public]).await;
        assert_eq!(connected, "connected");
        Self {
            lab,
            relay,
            _shim: shim,
            agent,
            session,
            service,
            visitor,
        }
    }

    /// The visitor sends a line to the echo service; it must come back at once.
    pub async fn echo_at_once(&mut self, text: &str) -> String {
        self.visitor.ask(&format!("echo {text} {AT_ONCE}")).await
    }

    /// A new visitor connection to the echo service; its echo must come back at once.
    pub async fn new_visitor_echo(&self) -> String {
        let public = format!("{RELAY_PUBLIC}:7000");
        let (mut visitor, connected) = self.lab.peer(&self.lab.visitor, &["client", &public]).await;
        assert_eq!(connected, "connected");
        visitor.ask(&format!("echo new-visitor {AT_ONCE}")).await
    }

    /// Restarts the relay after stopping it with `signal`, and returns how long after it
    /// listened again a new visitor was served.
    pub async fn served_after_restart(&mut self, signal: &str) -> Duration {
        self.relay.signal_and_wait(signal).await;
        self.relay = self.lab.start_relay().await;
        let back = Instant::now();
        self.agent.wait_for_line("connected to relay").await;
        let echo = self.new_visitor_echo().await;
        assert!(echo.starts_with("echoed"), "{echo}");
        back.elapsed()
    }

    /// Stops the agent and returns the ids of every session it had.
    pub async fn agent_sessions(&mut self) -> Vec<String> {
        self.agent.signal_and_wait("TERM").await;
        let log = &self.agent.log;
        log.iter()
            .filter(|l| l.contains("connected to relay"))
            .map(|l| session_of(l))
            .collect()
    }
}

/// Sends `bytes` (more than 8 MiB) from the visitor to the sink at home, calling `meanwhile` once
/// the first 8 MiB are out; returns (sent line, received line).
pub async fn transfer(
    scene: &mut Scene,
    bytes: u64,
    meanwhile: impl FnOnce(&Lab),
) -> (String, String) {
    // Slow under loss and in debug builds: each 8 MiB may take a while.
    let slow = Duration::from_secs(60);
    scene.visitor.tell(&format!("send {bytes}")).await;
    let mut meanwhile = Some(meanwhile);
    let sent = loop {
        let line = scene.visitor.line_within(slow).await;
        if !line.starts_with("progress") {
            break line;
        }
        if let Some(meanwhile) = meanwhile.take() {
            meanwhile(&scene.lab);
        }
    };
    assert!(
        meanwhile.is_none(),
        "the transfer ended before its first 8 MiB"
    );
    let received = scene.service.line_within(slow).await;
    (sent, received)
}

/// "sent BYTES SHA MILLIS" and "received BYTES SHA" describe the same bytes.
pub fn assert_same_bytes(sent: &str, received: &str) -> (u64, Duration) {
    let sent: Vec<&str> = sent.split(' ').collect();
    let received: Vec<&str> = received.split(' ').collect();
    assert_eq!(sent[0], "sent", "{sent:?}");
    assert_eq!(received[0], "received", "{received:?}");
    assert_eq!(sent[1..3], received[1..3], "bytes and sha256 must match");
    (
        sent[1].parse().unwrap(),
        Duration::from_millis(sent[3].parse().unwrap()),
    )
}
