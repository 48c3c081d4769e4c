//! A real mosh session through a ranged UDP forward: Debian's `mosh-server` beside the agent,
//! `mosh-client` in tmux as the visitor, a command typed into it and its output read back.

use std::time::Duration;

use tether_relay::Limits;
use tether_tests::mosh::{MoshServer, Tmux, LOCALE};
use tether_tests::udp::consecutive_udp_ports;
use tether_tests::*;

#[tokio::test]
async fn a_mosh_session_works_through_a_ranged_forward() {
    let test = "a_mosh_session_works_through_a_ranged_forward";
    if !tools::available(test, &["mosh-server", "mosh-client", "tmux"]) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        // Three public ports onto three local ones; mosh uses the middle pair.
        let (local, _) = consecutive_udp_ports(3);
        let (public, _) = consecutive_udp_ports(3);
        let forward = udp_forward("mosh", public, "127.0.0.1", local);
        let bench = Bench::serving(vec![forward], Limits::default(), |_| {}).await;

        let server = MoshServer::start(&[], local.start() + 1);
        let client = format!(
            "env LC_ALL={LOCALE} MOSH_KEY={} mosh-client 127.0.0.1 {}",
            server.key,
            public.start() + 1
        );
        let tmux = Tmux::start(&client);
        tmux.type_line("echo tether-$((6 * 7))");
        within(
            "the command's output on the mosh screen",
            tmux.wait_for("tether-42"),
        )
        .await;

        // It went through the tunnel: the relay and the agent carried the flow.
        let relay = bench.relay.udp.count();
        let agent = bench.agent.udp.count();
        assert!(relay.flows_opened >= 1, "relay: {relay:?}");
        assert!(agent.flows_opened >= 1, "agent: {agent:?}");
        drop(tmux);
        drop(server);
        bench.stop().await;
    })
    .await;
}
