//! Asking a running binary what it is doing, as `tether-relay status` and `tether-agent status`
//! do: on its status socket, parsed from the JSON it answers.

use std::path::Path;
use std::time::Duration;

use tether_agent::status::AgentReport;
use tether_common::service::status_socket;
use tether_relay::status::RelayStatus;

use crate::within;

/// `path` as a command-line argument.
pub fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub async fn relay_status(socket: &Path) -> RelayStatus {
    let answer = status_socket::query(socket)
        .await
        .expect("the relay answers");
    serde_json::from_str(&answer).expect("the relay's status parses")
}

pub async fn agent_status(socket: &Path) -> AgentReport {
    let answer = status_socket::query(socket)
        .await
        .expect("the agent answers");
    serde_json::from_str(&answer).expect("the agent's status parses")
}

/// Asks until `done` holds of the answer: the counters of a splice are added just after the
/// bytes move, so a test that saw the bytes arrive may ask a moment too early.
pub async fn relay_status_once(socket: &Path, done: impl Fn(&RelayStatus) -> bool) -> RelayStatus {
    within("the relay's status to show the traffic", async {
        loop {
            let status = relay_status(socket).await;
            if done(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

pub async fn agent_status_once(socket: &Path, done: impl Fn(&AgentReport) -> bool) -> AgentReport {
    within("the agent's status to show the traffic", async {
        loop {
            let status = agent_status(socket).await;
            if done(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
