//! The relay's Prometheus metrics, gathered from its status at each scrape. Every family is
//! `tether_relay_…`; "received" is from visitors, "sent" is to visitors.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::{Registry, Unit};
use tether_common::carry::traffic::TrafficCount;
use tether_common::service::metrics::{reason_label, Families};

use crate::server::Control;
use crate::status::{AgentState, ForwardState};

/// A registry with the relay's metrics, for [`tether_common::service::metrics::serve`].
pub fn registry(control: Control) -> Registry {
    let mut registry = Registry::with_prefix("tether_relay");
    registry.register_collector(Box::new(control));
    registry
}

impl Collector for Control {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let status = self.status();
        let mut f = Families::new(encoder);
        let agents = || status.agents.iter();
        let agent = |a: &AgentState| [("agent", a.name.clone())];
        f.gauge(
            "agent_up",
            "Whether the agent has a live session.",
            None,
            agents().map(|a| (agent(a), f64::from(u8::from(a.connected)))),
        )?;
        f.counter(
            "sessions",
            "Sessions opened by the agent.",
            None,
            agents().map(|a| (agent(a), a.sessions)),
        )?;
        f.counter(
            "reconnects",
            "Sessions opened by the agent after its first.",
            None,
            agents().map(|a| (agent(a), a.reconnects)),
        )?;
        f.gauge(
            "transport_sessions",
            "Live sessions, by path: quic (UDP) or tcp.",
            None,
            ["quic", "tcp"].into_iter().map(|path| {
                let live = agents()
                    .filter(|a| a.transport.as_deref() == Some(path))
                    .count();
                ([("transport", path.to_string())], live as f64)
            }),
        )?;
        f.gauge(
            "rtt",
            "Round-trip time of the agent's live session.",
            Some(Unit::Seconds),
            agents().filter_map(|a| Some((agent(a), a.rtt_ms? / 1000.0))),
        )?;

        let forwards = || {
            agents().flat_map(|a| {
                a.forwards.iter().map(move |f: &ForwardState| {
                    let labels = [("agent", a.name.clone()), ("forward", f.name.clone())];
                    (labels, f)
                })
            })
        };
        let per_forward =
            |value: fn(&ForwardState) -> u64| forwards().map(move |(labels, f)| (labels, value(f)));
        let traffic = |value: fn(&TrafficCount) -> u64| {
            forwards().map(move |(labels, f)| (labels, value(&f.traffic)))
        };
        let gauge = |value: u64| value as f64;
        f.gauge(
            "open_visitors",
            "Visitor TCP connections open now.",
            None,
            traffic(|t| t.visitors_open).map(|(l, v)| (l, gauge(v))),
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
            per_forward(|f| f.flows_open).map(|(l, v)| (l, gauge(v))),
        )?;
        f.counter("flows", "UDP flows opened.", None, traffic(|t| t.flows))?;
        f.counter(
            "received",
            "Payload received from visitors, TCP and UDP.",
            Some(Unit::Bytes),
            traffic(|t| t.bytes_in + t.datagram_bytes_in),
        )?;
        f.counter(
            "sent",
            "Payload sent to visitors, TCP and UDP.",
            Some(Unit::Bytes),
            traffic(|t| t.bytes_out + t.datagram_bytes_out),
        )?;
        f.counter(
            "received_datagrams",
            "UDP datagrams received from visitors and sent on to the agent.",
            None,
            traffic(|t| t.datagrams_in),
        )?;
        f.counter(
            "sent_datagrams",
            "UDP datagrams sent to visitors.",
            None,
            traffic(|t| t.datagrams_out),
        )?;

        let reasons = |totals: &std::collections::BTreeMap<String, u64>| {
            totals
                .iter()
                .map(|(reason, &n)| ([("reason", reason_label(reason))], n))
                .collect::<Vec<_>>()
        };
        f.counter(
            "dropped_datagrams",
            "UDP datagrams dropped, by reason.",
            None,
            reasons(&status.dropped_datagrams),
        )?;
        f.counter(
            "refused_handshakes",
            "Connection attempts refused before a session, by reason.",
            None,
            reasons(&status.refused_handshakes),
        )?;
        f.counter(
            "refused_visitors",
            "Visitor connections and datagrams refused, by reason.",
            None,
            reasons(&status.refused_visitors),
        )
    }
}
