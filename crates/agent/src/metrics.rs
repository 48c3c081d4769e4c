//! The agent's Prometheus metrics, gathered from its status at each scrape. Every family is
//! `tether_agent_…`; "sent" is to the local services, "received" is from them.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::{Registry, Unit};
use tether_common::carry::traffic::TrafficCount;
use tether_common::service::metrics::Families;

use crate::client::AgentControl;
use crate::status::ForwardReport;

/// A registry with the agent's metrics, for [`tether_common::service::metrics::serve`].
pub fn registry(control: AgentControl) -> Registry {
    let mut registry = Registry::with_prefix("tether_agent");
    registry.register_collector(Box::new(control));
    registry
}

impl Collector for AgentControl {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let status = self.status();
        let mut f = Families::new(encoder);
        f.gauge_of(
            "connected",
            "Whether a session to the relay is up.",
            None,
            Some(f64::from(u8::from(status.connected))),
        )?;
        f.counter_of(
            "sessions",
            "Sessions set up with the relay.",
            status.sessions,
        )?;
        f.counter_of(
            "reconnects",
            "Sessions set up after the first.",
            status.reconnects,
        )?;
        let (by_path, moves) = self.paths();
        f.counter(
            "transport_sessions",
            "Sessions set up with the relay, by path: quic (UDP) or tcp.",
            None,
            by_path
                .iter()
                .map(|(path, n)| ([("transport", path.to_string())], *n)),
        )?;
        f.counter_of(
            "transport_moves",
            "Sessions moved to the other path (UDP to TCP or back) while up.",
            moves,
        )?;
        f.gauge_of(
            "rtt",
            "Round-trip time of the live session.",
            Some(Unit::Seconds),
            status.rtt_ms.map(|ms| ms / 1000.0),
        )?;

        let forwards = || {
            status
                .forwards
                .iter()
                .map(|f: &ForwardReport| ([("forward", f.name.clone())], f))
        };
        let traffic = |value: fn(&TrafficCount) -> u64| {
            forwards().map(move |(labels, f)| (labels, value(&f.traffic)))
        };
        f.gauge(
            "open_visitors",
            "Visitor TCP connections open now.",
            None,
            traffic(|t| t.visitors_open).map(|(l, v)| (l, v as f64)),
        )?;
        f.counter(
            "visitors",
            "Visitor TCP connections carried.",
            None,
            traffic(|t| t.visitors),
        )?;
        f.gauge(
            "open_flows",
            "UDP flows open now.",
            None,
            forwards().map(|(l, f)| (l, f.flows_open as f64)),
        )?;
        f.counter("flows", "UDP flows opened.", None, traffic(|t| t.flows))?;
        f.counter(
            "sent",
            "Payload sent to local services, TCP and UDP.",
            Some(Unit::Bytes),
            traffic(|t| t.bytes_in + t.datagram_bytes_in),
        )?;
        f.counter(
            "received",
            "Payload received from local services, TCP and UDP.",
            Some(Unit::Bytes),
            traffic(|t| t.bytes_out + t.datagram_bytes_out),
        )?;
        f.counter(
            "sent_datagrams",
            "UDP datagrams sent to local services.",
            None,
            traffic(|t| t.datagrams_in),
        )?;
        f.counter(
            "received_datagrams",
            "UDP datagrams received from local services and sent on to the relay.",
            None,
            traffic(|t| t.datagrams_out),
        )?;
        f.counter(
            "dropped_datagrams",
            "UDP datagrams dropped, by reason.",
            None,
            status
                .dropped_datagrams
                .iter()
                .map(|(reason, &n)| ([("reason", reason.clone())], n)),
        )
    }
}
