use std::path::Path;
use std::time::Duration;

use super::*;
use crate::net::ports::{PortSpec, Proto};

const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
const FP2: &str = "SHA256:ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs";

fn agent(text: &str) -> Result<AgentConfig, String> {
    AgentConfig::from_toml(text, Path::new("/etc/tether/agent.toml")).map_err(|e| e.to_string())
}

fn relay(text: &str) -> Result<RelayConfig, String> {
    RelayConfig::from_toml(text, Path::new("/etc/tether/relay.toml")).map_err(|e| e.to_string())
}

fn agent_with_forward(forward: &str) -> String {
    format!(
        "relay = \"vps.example.com:4433\"\nrelay_fingerprint = \"{FP}\"\n[[forward]]\n{forward}\n"
    )
}

fn assert_agent_error(text: &str, expected: &str) {
    let err = agent(text).expect_err("config should be refused");
    assert_eq!(err, expected);
}

fn assert_relay_error(text: &str, expected: &str) {
    let err = relay(text).expect_err("config should be refused");
    assert_eq!(err, expected);
}

#[test]
fn design_example_agent_config_loads() {
    let config = agent(&format!(
        r#"
relay = "vps.example.com:4433"
relay_fingerprint = "{FP}"
key = "agent.key"
keepalive = "10s"
idle_timeout = "30s"

[[forward]]
name = "ssh"
proto = "tcp"
remote = 2222
local = "127.0.0.1:22"

[[forward]]
name = "mosh"
proto = "udp"
remote = "60000-60010"
local = "127.0.0.1:60000-60010"
"#
    ))
    .unwrap();
    assert_eq!(config.relay.to_string(), "vps.example.com:4433");
    assert_eq!(config.key, Path::new("/etc/tether/agent.key"));
    assert_eq!(config.keepalive, Some(Duration::from_secs(10)));
    assert_eq!(config.idle_timeout, Duration::from_secs(30));
    assert_eq!(config.forwards.len(), 2);
    assert_eq!(config.forwards[0].local_for(2222), Some(("127.0.0.1", 22)));
    assert_eq!(config.forwards[1].proto, Proto::Udp);
    assert_eq!(
        config.forwards[1].local_for(60004),
        Some(("127.0.0.1", 60004))
    );
    assert_eq!(config.forwards[1].flow_idle, DEFAULT_FLOW_IDLE);
}

#[test]
fn udp_forwards_take_a_flow_idle_time() {
    let config = agent(&agent_with_forward(
        "name = \"mosh\"\nproto = \"udp\"\nremote = 60001\nlocal = \"h:60001\"\nflow_idle = \"45s\"",
    ))
    .unwrap();
    assert_eq!(config.forwards[0].flow_idle, Duration::from_secs(45));
    let cases = [
        (
            "proto = \"udp\"\nflow_idle = \"0s\"",
            "forward[0].flow_idle: must be longer than zero",
        ),
        (
            "proto = \"udp\"\nflow_idle = \"2d\"",
            "forward[0].flow_idle: must be at most 24h, got \"2d\"",
        ),
        (
            "proto = \"udp\"\nflow_idle = \"soon\"",
            "forward[0].flow_idle: expected a duration like \"10s\", got \"soon\"",
        ),
        (
            "proto = \"tcp\"\nflow_idle = \"45s\"",
            "forward[0].flow_idle: only UDP forwards have flows",
        ),
    ];
    for (fields, expected) in cases {
        assert_agent_error(
            &agent_with_forward(&format!(
                "name = \"a\"\nremote = 1\nlocal = \"h:1\"\n{fields}"
            )),
            &format!("/etc/tether/agent.toml: {expected}"),
        );
    }
}

#[test]
fn forwards_take_an_allow_from_list() {
    let config = agent(&agent_with_forward(
        "name = \"ssh\"\nproto = \"tcp\"\nremote = 2222\nlocal = \"h:22\"\n\
         allow_from = [\"203.0.113.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]",
    ))
    .unwrap();
    let blocks: Vec<String> = config.forwards[0]
        .allow_from
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        blocks,
        ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]
    );
    let cases = [
        (
            "allow_from = []".to_owned(),
            "forward[0].allow_from: an empty list would refuse every visitor; remove allow_from \
             to let everyone in"
                .to_owned(),
        ),
        (
            "allow_from = [\"203.0.113.0/24\", \"203.0.113.9/24\", \"dorm\"]".to_owned(),
            "forward[0].allow_from[1]: bits are set past the prefix; the block is \
             203.0.113.0/24, got \"203.0.113.9/24\"\n/etc/tether/agent.toml: \
             forward[0].allow_from[2]: expected an address or ADDRESS/PREFIX like \
             \"203.0.113.0/24\", got \"dorm\""
                .to_owned(),
        ),
        (
            format!("allow_from = [{}]", vec!["\"::1\""; 65].join(", ")),
            "forward[0].allow_from: at most 64 blocks, got 65".to_owned(),
        ),
    ];
    for (fields, expected) in cases {
        assert_agent_error(
            &agent_with_forward(&format!(
                "name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \"h:1\"\n{fields}"
            )),
            &format!("/etc/tether/agent.toml: {expected}"),
        );
    }
}

#[test]
fn agent_defaults() {
    let config = agent(&format!(
        "relay = \"[2001:db8::1]:4433\"\nrelay_fingerprint = \"{FP}\"\n"
    ))
    .unwrap();
    assert_eq!(config.relay.host, "2001:db8::1");
    assert_eq!(config.relay.to_string(), "[2001:db8::1]:4433");
    assert_eq!(config.key, Path::new("/etc/tether/agent.key"));
    assert_eq!(config.keepalive, Some(Duration::from_secs(5)));
    assert_eq!(config.idle_timeout, Duration::from_secs(30));
    assert!(config.forwards.is_empty());
    assert_eq!(
        config.status_socket,
        Path::new("/run/tether-agent/status.sock")
    );
    assert_eq!(config.metrics, None);
}

#[test]
fn keepalive_can_be_turned_off() {
    for off in ["off", "0s"] {
        let text =
            format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\nkeepalive = \"{off}\"\n");
        assert_eq!(agent(&text).unwrap().keepalive, None);
    }
}

#[test]
fn agent_local_errors_name_file_key_and_expectation() {
    let text = format!(
        "{}[[forward]]\nname = \"b\"\nproto = \"tcp\"\nremote = 23\nlocal = \"22\"\n",
        agent_with_forward("name = \"a\"\nproto = \"tcp\"\nremote = 22\nlocal = \"127.0.0.1:22\"")
    );
    assert_agent_error(
        &text,
        "/etc/tether/agent.toml: forward[1].local: expected HOST:PORT, got \"22\"",
    );
}

#[test]
fn agent_field_errors() {
    let cases = [
        ("name = \"\"\nproto = \"tcp\"\nremote = 1\nlocal = \"h:1\"", "forward[0].name: expected 1 to 64 letters, digits, '-', '_' or '.', got \"\""),
        ("name = \"a b\"\nproto = \"tcp\"\nremote = 1\nlocal = \"h:1\"", "forward[0].name: expected 1 to 64 letters, digits, '-', '_' or '.', got \"a b\""),
        ("name = \"a\"\nproto = \"sctp\"\nremote = 1\nlocal = \"h:1\"", "forward[0].proto: expected \"tcp\" or \"udp\", got \"sctp\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 0\nlocal = \"h:1\"", "forward[0].remote: expected a port like 2222 or a range like \"60000-60010\", got \"0\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 70000\nlocal = \"h:1\"", "forward[0].remote: expected a port like 2222 or a range like \"60000-60010\", got \"70000\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = \"10-5\"\nlocal = \"h:1\"", "forward[0].remote: expected a port like 2222 or a range like \"60000-60010\", got \"10-5\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = -1\nlocal = \"h:1\"", "forward[0].remote: expected a port like 2222 or a range like \"60000-60010\", got \"-1\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \"h:0\"", "forward[0].local: expected HOST:PORT, got \"h:0\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \"::1:22\"", "forward[0].local: expected HOST:PORT, got \"::1:22\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \"[zz]:22\"", "forward[0].local: expected HOST:PORT, got \"[zz]:22\""),
        ("name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \":22\"", "forward[0].local: expected HOST:PORT, got \":22\""),
        ("name = \"a\"\nproto = \"udp\"\nremote = \"60000-60010\"\nlocal = \"h:60000-60001\"", "forward[0].local: expected 11 local ports to match remote 60000-60010, got \"h:60000-60001\""),
        ("name = \"a\"\nproto = \"udp\"\nremote = \"60000-60010\"\nlocal = \"h:60000\"", "forward[0].local: expected 11 local ports to match remote 60000-60010, got \"h:60000\""),
    ];
    for (forward, expected) in cases {
        assert_agent_error(
            &agent_with_forward(forward),
            &format!("/etc/tether/agent.toml: {expected}"),
        );
    }
}

#[test]
fn agent_type_and_shape_errors() {
    assert_agent_error(
        &agent_with_forward("name = \"a\"\nproto = \"tcp\"\nremote = true\nlocal = \"h:1\""),
        "/etc/tether/agent.toml: forward[0].remote: invalid type: boolean `true`, expected a port like 2222 or a range like \"60000-60010\"",
    );
    assert_agent_error(
        &agent_with_forward("name = \"a\"\nproto = \"tcp\"\nremote = 1\nlocal = \"h:1\"\nlocol = 3"),
        "/etc/tether/agent.toml: forward[0].locol: unknown field `locol`, expected one of `name`, `proto`, `remote`, `local`, `flow_idle`, `allow_from`",
    );
    assert_agent_error(
        &agent_with_forward("name = \"a\"\nproto = \"tcp\"\nremote = 1"),
        "/etc/tether/agent.toml: forward[0]: missing field `local`",
    );
    assert_agent_error(
        &format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\nkeepalve = \"5s\"\n"),
        "/etc/tether/agent.toml: keepalve: unknown field `keepalve`, expected one of `relay`, `relay_fingerprint`, `transport`, `relay_tcp`, `proxy`, `key`, `keepalive`, `idle_timeout`, `resume_window`, `status_socket`, `metrics`, `forward`",
    );
    assert_agent_error(
        "relay = \"h:1\"\n",
        "/etc/tether/agent.toml: missing field `relay_fingerprint`",
    );
    assert_agent_error(
        "relay = \"h:1\nx",
        "/etc/tether/agent.toml: line 1: invalid basic string",
    );
    assert_agent_error(
        "relay = 5\n",
        "/etc/tether/agent.toml: relay: invalid type: integer `5`, expected a string",
    );
}

#[test]
fn agent_top_level_errors_are_all_reported() {
    let text = "relay = \"vps.example.com\"\nrelay_fingerprint = \"SHA256:abc\"\nkeepalive = \"10 parsecs\"\nidle_timeout = \"0s\"\nkey = \"\"\n";
    assert_agent_error(
        text,
        "/etc/tether/agent.toml: relay: expected HOST:PORT, got \"vps.example.com\"\n\
         /etc/tether/agent.toml: relay_fingerprint: expected SHA256: followed by 43 base64 characters, got \"SHA256:abc\"\n\
         /etc/tether/agent.toml: key: expected a file path, got \"\"\n\
         /etc/tether/agent.toml: keepalive: expected a duration like \"10s\", got \"10 parsecs\"\n\
         /etc/tether/agent.toml: idle_timeout: must be longer than zero",
    );
}

#[test]
fn agent_timing_limits() {
    let base = format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\n");
    assert_agent_error(
        &format!("{base}keepalive = \"30s\"\n"),
        "/etc/tether/agent.toml: keepalive: must be shorter than idle_timeout (30s), got 30s",
    );
    assert_agent_error(
        &format!("{base}idle_timeout = \"25h\"\n"),
        "/etc/tether/agent.toml: idle_timeout: must be at most 24h, got \"25h\"",
    );
    assert!(agent(&format!(
        "{base}keepalive = \"1h\"\nidle_timeout = \"24h\"\n"
    ))
    .is_ok());
}

#[test]
fn agent_forwards_must_not_clash() {
    let text = format!(
        "{}[[forward]]\nname = \"ssh\"\nproto = \"tcp\"\nremote = 23\nlocal = \"h:1\"\n\
         [[forward]]\nname = \"c\"\nproto = \"tcp\"\nremote = \"20-30\"\nlocal = \"h:20-30\"\n\
         [[forward]]\nname = \"d\"\nproto = \"udp\"\nremote = 22\nlocal = \"h:1\"\n",
        agent_with_forward("name = \"ssh\"\nproto = \"tcp\"\nremote = 22\nlocal = \"h:22\"")
    );
    assert_agent_error(
        &text,
        "/etc/tether/agent.toml: forward[1].name: \"ssh\" is already the name of another forward\n\
         /etc/tether/agent.toml: forward[2].remote: 20-30/tcp overlaps forward \"ssh\" (22/tcp)",
    );
}

#[test]
fn design_example_relay_config_loads() {
    let config = relay(&format!(
        r#"
listen = "0.0.0.0:4433"
key = "relay.key"
public_bind = "0.0.0.0"
tcp_keepalive = "30s"

[[agent]]
name = "dorm"
fingerprint = "{FP}"
ports = ["2222/tcp", "60000-60010/udp"]
"#
    ))
    .unwrap();
    assert_eq!(config.listen, "0.0.0.0:4433".parse().unwrap());
    assert_eq!(config.key, Path::new("/etc/tether/relay.key"));
    assert_eq!(config.public_bind, Some("0.0.0.0".parse().unwrap()));
    assert_eq!(config.tcp_keepalive, Some(Duration::from_secs(30)));
    assert_eq!(config.agents[0].name, "dorm");
    assert_eq!(config.agents[0].fingerprint.to_string(), FP);
    assert_eq!(config.agents[0].ports.len(), 2);
}

#[test]
fn resume_window_takes_a_duration_or_off_on_both_ends() {
    for (text, expected) in [("\"90s\"", 90), ("\"off\"", 0), ("\"0s\"", 0)] {
        let config = relay(&format!("listen = \"[::]:1\"\nresume_window = {text}\n")).unwrap();
        assert_eq!(config.resume_window, Duration::from_secs(expected));
        let config = AgentConfig::from_toml(
            &format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\nresume_window = {text}\n"),
            Path::new("/etc/tether/agent.toml"),
        )
        .unwrap();
        assert_eq!(config.resume_window, Duration::from_secs(expected));
    }
    let error = relay("listen = \"[::]:1\"\nresume_window = \"a while\"\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "/etc/tether/relay.toml: resume_window: expected a duration like \"10s\", got \"a while\""
    );
}

#[test]
fn relay_defaults() {
    let config = relay("listen = \"[::]:4433\"\n").unwrap();
    assert_eq!(config.key, Path::new("/etc/tether/relay.key"));
    assert_eq!(config.public_bind, None);
    assert_eq!(config.tcp_keepalive, Some(Duration::from_secs(30)));
    assert!(config.agents.is_empty());
    assert_eq!(
        config.status_socket,
        Path::new("/run/tether-relay/status.sock")
    );
    assert_eq!(config.metrics, None);
    assert_eq!(config.resume_window, Duration::from_secs(300));
    assert_eq!(
        relay("listen = \"[::]:1\"\ntcp_keepalive = \"off\"\n")
            .unwrap()
            .tcp_keepalive,
        None
    );
}

#[test]
fn relay_errors_name_file_key_and_expectation() {
    let text = format!(
        "listen = \"vps:4433\"\npublic_bind = \"everywhere\"\ntcp_keepalive = \"soon\"\n\
         [[agent]]\nname = \"dorm\"\nfingerprint = \"{FP}\"\nports = [\"2222\", \"22/tcp\", \"5-1/udp\"]\n\
         [[agent]]\nname = \"dorm\"\nfingerprint = \"{FP2}\"\nports = []\n\
         [[agent]]\nname = \"other\"\nfingerprint = \"{FP}\"\nports = []\n\
         [[agent]]\nname = \"x\"\nfingerprint = \"nope\"\nports = []\n"
    );
    assert_relay_error(
        &text,
        "/etc/tether/relay.toml: listen: expected IP:PORT, got \"vps:4433\"\n\
         /etc/tether/relay.toml: public_bind: expected an IP address, got \"everywhere\"\n\
         /etc/tether/relay.toml: tcp_keepalive: expected a duration like \"10s\", got \"soon\"\n\
         /etc/tether/relay.toml: agent[0].ports[0]: expected PORT/PROTO or FIRST-LAST/PROTO like \"2222/tcp\", got \"2222\"\n\
         /etc/tether/relay.toml: agent[0].ports[2]: expected PORT/PROTO or FIRST-LAST/PROTO like \"2222/tcp\", got \"5-1/udp\"\n\
         /etc/tether/relay.toml: agent[1].name: \"dorm\" is already the name of another agent\n\
         /etc/tether/relay.toml: agent[2].fingerprint: already the fingerprint of agent \"dorm\"\n\
         /etc/tether/relay.toml: agent[3].fingerprint: expected SHA256: followed by 43 base64 characters, got \"nope\"",
    );
    assert_relay_error(
        "listen = \"0.0.0.0:1\"\n[[agent]]\nname = \"a\"\nfingerprint = \"x\"\n",
        "/etc/tether/relay.toml: agent[0]: missing field `ports`",
    );
    assert_relay_error(
        "listen = \"0.0.0.0:1\"\nlisten_addr = 1\n",
        "/etc/tether/relay.toml: listen_addr: unknown field `listen_addr`, expected one of `listen`, `listen_tcp`, `key`, `public_bind`, `tcp_keepalive`, `resume_window`, `status_socket`, `metrics`, `agent`",
    );
}

#[test]
fn unreadable_file_is_named() {
    let err = AgentConfig::load(Path::new("/nonexistent/tether/agent.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/nonexistent/tether/agent.toml: cannot read: No such file or directory (os error 2)"
    );
}

#[test]
fn allowlist_covers_ranges_across_entries() {
    let spec = |s: &str| s.parse::<PortSpec>().unwrap();
    let entry = AgentEntry {
        name: "a".into(),
        fingerprint: FP.parse().unwrap(),
        ports: vec![
            spec("2222/tcp"),
            spec("60000-60005/udp"),
            spec("60006-60010/udp"),
        ],
    };
    assert!(entry.allows(spec("2222/tcp")));
    assert!(!entry.allows(spec("2222/udp")));
    assert!(!entry.allows(spec("2221-2222/tcp")));
    assert!(entry.allows(spec("60000-60010/udp")));
    assert!(entry.allows(spec("60004-60007/udp")));
    assert!(!entry.allows(spec("60000-60011/udp")));
    let everything = AgentEntry {
        ports: vec![spec("1-65535/tcp")],
        ..entry
    };
    assert!(everything.allows(spec("65535/tcp")));
    assert!(everything.allows(spec("1-65535/tcp")));
}

#[test]
fn deploy_examples_load_once_their_fingerprints_are_filled_in() {
    let relay_text = include_str!("../../../../deploy/relay.toml")
        .replace("SHA256:REPLACE-WITH-tether-agent-fingerprint", FP);
    let config = relay(&relay_text).unwrap();
    assert_eq!(config.agents[0].ports.len(), 2);
    let agent_text = include_str!("../../../../deploy/agent.toml")
        .replace("SHA256:REPLACE-WITH-tether-relay-fingerprint", FP);
    let config = agent(&agent_text).unwrap();
    assert_eq!(config.forwards[0].local_for(2222), Some(("127.0.0.1", 22)));
    assert_eq!(
        config.forwards[1].local_for(60001),
        Some(("127.0.0.1", 60001))
    );
}

#[test]
fn metrics_listen_on_loopback_unless_an_address_is_given() {
    let metrics = |value: &str| relay(&format!("listen = \"[::]:1\"\nmetrics = {value}\n"));
    let loopback: std::net::SocketAddr = "127.0.0.1:9560".parse().unwrap();
    assert_eq!(metrics("9560").unwrap().metrics, Some(loopback));
    assert_eq!(metrics("\"9560\"").unwrap().metrics, Some(loopback));
    assert_eq!(
        metrics("\"[::]:9560\"").unwrap().metrics,
        Some("[::]:9560".parse().unwrap())
    );
    let expected = "/etc/tether/relay.toml: metrics: expected PORT or \"IP:PORT\" like \"127.0.0.1:9560\", got";
    for (value, got) in [
        ("0", "0"),
        ("70000", "\"70000\""),
        ("\"localhost:9560\"", "\"localhost:9560\""),
        ("true", "true"),
    ] {
        assert_eq!(metrics(value).unwrap_err(), format!("{expected} {got}"));
    }
}

#[test]
fn a_relative_status_socket_is_in_the_config_folder() {
    let text =
        format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\nstatus_socket = \"agent.sock\"\n");
    let config = agent(&text).unwrap();
    assert_eq!(config.status_socket, Path::new("/etc/tether/agent.sock"));
    assert_agent_error(
        &format!("relay = \"h:1\"\nrelay_fingerprint = \"{FP}\"\nstatus_socket = \"\"\n"),
        "/etc/tether/agent.toml: status_socket: expected a file path, got \"\"",
    );
}

#[test]
fn the_tcp_path_keys_have_defaults_and_name_what_is_wrong() {
    let base = format!("relay = \"vps.example.com:4433\"\nrelay_fingerprint = \"{FP}\"\n");
    let config = agent(&base).unwrap();
    assert_eq!(config.transport, Transport::Auto);
    assert_eq!(config.relay_tcp, config.relay, "the relay's host and port");
    assert_eq!(config.proxy, None);

    let config = agent(&format!(
        "{base}transport = \"tcp\"\nrelay_tcp = \"vps.example.com:443\"\nproxy = \"http://proxy.example:3128\"\n"
    ))
    .unwrap();
    assert_eq!(config.transport, Transport::Tcp);
    assert_eq!(config.relay_tcp.port, 443);
    assert_eq!(
        config.proxy.unwrap().to_string(),
        "http://proxy.example:3128"
    );

    assert_agent_error(
        &format!("{base}transport = \"udp\"\n"),
        "/etc/tether/agent.toml: transport: expected \"auto\", \"quic\" or \"tcp\", got \"udp\"",
    );
    assert_agent_error(
        &format!("{base}relay_tcp = \"vps.example.com\"\n"),
        "/etc/tether/agent.toml: relay_tcp: expected HOST:PORT, got \"vps.example.com\"",
    );
    assert_agent_error(
        &format!("{base}proxy = \"socks5://proxy.example:1080\"\n"),
        "/etc/tether/agent.toml: proxy: only http:// proxies (HTTP CONNECT) are supported, got socks5://",
    );
    assert_agent_error(
        &format!("{base}transport = \"quic\"\nproxy = \"http://proxy.example:3128\"\n"),
        "/etc/tether/agent.toml: proxy: is for the TCP path, which transport = \"quic\" never takes",
    );

    let relay_base = "listen = \"0.0.0.0:4433\"\n";
    assert_eq!(relay(relay_base).unwrap().listen_tcp, None, "absent: off");
    let off = relay(&format!("{relay_base}listen_tcp = \"off\"\n")).unwrap();
    assert_eq!(off.listen_tcp, None);
    let on = relay(&format!("{relay_base}listen_tcp = \"0.0.0.0:443\"\n")).unwrap();
    assert_eq!(on.listen_tcp, Some("0.0.0.0:443".parse().unwrap()));
    assert_relay_error(
        &format!("{relay_base}listen_tcp = \"443\"\n"),
        "/etc/tether/relay.toml: listen_tcp: expected IP:PORT or \"off\", got \"443\"",
    );
}

#[test]
fn the_default_status_socket_is_systemds_folder_or_the_users_runtime_folder() {
    use std::ffi::OsString;
    let system = "/run/tether-relay/status.sock";
    let user = Some(OsString::from("/run/user/1000"));
    // Root, and a service without a login session (systemd's DynamicUser), use the unit's folder.
    assert_eq!(
        status_socket_for(system, true, user.clone()),
        Path::new(system)
    );
    assert_eq!(status_socket_for(system, false, None), Path::new(system));
    assert_eq!(
        status_socket_for(system, false, user),
        Path::new("/run/user/1000/tether-relay/status.sock")
    );
    assert_eq!(
        status_socket_for(system, false, Some(OsString::from("relative"))),
        Path::new(system)
    );
}
