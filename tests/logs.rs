//! What the logs say, and what they never say: who connected and what they carried, and no
//! private key, even at debug level.

use std::time::Duration;

use tether_tests::*;

#[tokio::test]
async fn private_keys_stay_out_of_the_logs() {
    use tether_tests::lab::binary;
    use tether_tests::process::{Configs, Process};
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let port = configs.port;
        // Debug logs: everything tether itself says about sessions and visitors.
        let relay_args = ["run", "-v", "-c", configs.relay.to_str().unwrap()];
        let mut relay = Process::spawn(&binary("tether-relay"), &relay_args);
        relay.wait_for_line("relay listening").await;
        let agent_args = ["run", "-v", "-c", configs.agent.to_str().unwrap()];
        let mut agent = Process::spawn(&binary("tether-agent"), &agent_args);
        agent.wait_for_line("connected to relay").await;
        assert_eq!(round_trip(public(port), b"hi").await.unwrap(), b"hi");
        assert!(agent.signal_and_wait("TERM").await.success());
        assert!(relay.signal_and_wait("TERM").await.success());

        for (key, process) in [(&configs.relay_key, &relay), (&configs.agent_key, &agent)] {
            let pem = std::fs::read_to_string(key).unwrap();
            let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(!body.is_empty());
            let log = process.log.join("\n");
            assert!(log.contains("DEBUG"), "not a debug log:\n{log}");
            for line in body.iter().chain([&body.concat().as_str()]) {
                assert!(!log.contains(line), "{} leaked into the log", key.display());
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_relay_logs_who_connected_and_what_they_carried() {
    use tether_tests::process::Configs;
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let (mut relay, mut agent) = configs.run_both().await;
        let mut visitor = connect_from("127.0.0.9", configs.port).await;
        assert!(echoes(&mut visitor).await);
        let connected = relay.wait_for_line("visitor connected").await;
        assert!(
            connected.contains("INFO") && connected.contains("forward=echo"),
            "{connected}"
        );
        assert!(connected.contains("visitor=127.0.0.9:"), "{connected}");
        drop(visitor);
        let closed = relay.wait_for_line("visitor disconnected").await;
        assert!(closed.contains("visitor=127.0.0.9:"), "{closed}");
        // "ping" each way.
        assert!(closed.contains("bytes_in=4 bytes_out=4"), "{closed}");
        assert!(closed.contains("seconds="), "{closed}");
        assert!(agent.signal_and_wait("TERM").await.success());
        assert!(relay.signal_and_wait("TERM").await.success());
    })
    .await;
}
