//! `tether-relay invite` and `tether-relay invites`: root's side of enrollment. `invite` hands
//! the running relay an invite over the status socket, prints the line to run at home, waits
//! for the agent to join and then lists it in relay.toml, keeping the file's comments and order
//! (see [`crate::invites`] for why this command, not the relay, writes the file).

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use tether_common::config::{HostPort, RelayConfig};
use tether_common::net::ports::PortSpec;
use tether_common::service::cli::{failure, usage_error};
use tether_common::service::report::{self, timestamp};
use tether_common::service::status_socket::{self, QueryError};
use tether_common::trust::identity::Fingerprint;
use tether_common::trust::invite::{JoinLine, Secret};
use tether_common::wire::protocol::{is_valid_name, MAX_NAME_LEN};
use tether_common::wire::text::printable;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::invites::{InviteInfo, InviteRequest, Said, Wrote, MAX_EXPIRES};

/// The longest line read from the relay.
const MAX_LINE: u64 = 1024 * 1024;

/// How long a request that does not wait for a join may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// `tether-relay invite NAME --ports ...`: see the module's docs.
pub fn invite(
    file: &Path,
    socket: &Path,
    name: &str,
    ports: &[String],
    expires: Duration,
    host: Option<String>,
) -> ExitCode {
    let fail = |message: String| {
        eprintln!("tether-relay invite: {message}");
        usage_error()
    };
    let Ok((config, identity)) = crate::cli::load(file, None) else {
        return usage_error();
    };
    if !is_valid_name(name) {
        return fail(format!(
            "{:?}: expected a name of 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'",
            printable(name)
        ));
    }
    if config.agents.iter().any(|a| a.name == name) {
        return fail(format!(
            "{} lists an agent named {name} already; choose another name",
            file.display()
        ));
    }
    let mut specs = Vec::new();
    for port in ports.iter().map(|p| p.trim()) {
        match port.parse::<PortSpec>() {
            Ok(spec) => specs.push(spec.to_string()),
            Err(_) => {
                return fail(format!(
                "--ports: {:?}: expected PORT/tcp, PORT/udp or FIRST-LAST/udp, such as 2222/tcp",
                printable(port)
            ))
            }
        }
    }
    if expires < Duration::from_secs(1) || expires > MAX_EXPIRES {
        return fail(format!(
            "--expires: an invite lasts from a second to {} days",
            MAX_EXPIRES.as_secs() / 86400
        ));
    }
    let (host, guessed) = match host {
        Some(host) => (host, false),
        None => default_host(config.listen),
    };
    let relay = match format!("{}:{}", bracketed(&host), config.listen.port()).parse::<HostPort>() {
        Ok(relay) => relay,
        Err(_) => {
            return fail(format!(
                "--host: {:?}: expected a name or an address",
                printable(&host)
            ))
        }
    };
    let line = JoinLine {
        relay,
        tcp_port: config
            .listen_tcp
            .map(|a| a.port())
            .filter(|p| *p != config.listen.port()),
        fingerprint: identity.fingerprint(),
        secret: Secret::generate(),
    };
    let request = InviteRequest {
        name: name.to_owned(),
        ports: specs,
        hash: line.secret.hash().to_string(),
        expires_in_secs: expires.as_secs(),
    };
    let waited = runtime().block_on(wait_for_join(file, socket, &request, &line, guessed));
    match waited {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tether-relay invite: {message}");
            failure()
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The address agents reach when the line names none: `listen`'s, if it is one address, else
/// the one this machine's traffic leaves by (a UDP socket connected to an outside address
/// sends nothing; the kernel picks its source), else the machine's name. Says whether it was
/// a guess.
fn default_host(listen: SocketAddr) -> (String, bool) {
    if !listen.ip().is_unspecified() {
        return (listen.ip().to_string(), false);
    }
    let outward = UdpSocket::bind("0.0.0.0:0").and_then(|socket| {
        socket.connect("192.0.2.1:9")?;
        socket.local_addr()
    });
    let host = match outward {
        Ok(address) if !address.ip().is_unspecified() => address.ip().to_string(),
        _ => fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into()),
    };
    (host, true)
}

async fn read_said(reader: &mut BufReader<UnixStream>) -> Result<Option<Said>, String> {
    let mut line = String::new();
    let n = reader
        .take(MAX_LINE)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the relay's answer: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(|_| {
        "the relay's answer is not one; is it the same version as this command?".into()
    })
}

fn socket_error(error: QueryError) -> String {
    match error {
        QueryError::NotRunning { .. } => format!("{error}; an invite needs the running relay"),
        _ => error.to_string(),
    }
}

async fn wait_for_join(
    file: &Path,
    socket: &Path,
    request: &InviteRequest,
    line: &JoinLine,
    guessed: bool,
) -> Result<(), String> {
    let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
    let mut relay = status_socket::open(socket, &format!("invite {text}"))
        .await
        .map_err(socket_error)?;
    let id = match tokio::time::timeout(ANSWER_TIMEOUT, read_said(&mut relay)).await {
        Err(_) => {
            return Err(format!(
                "{}: no answer within {ANSWER_TIMEOUT:?}",
                socket.display()
            ))
        }
        Ok(Ok(Some(Said::Invited { id }))) => id,
        Ok(Ok(Some(Said::Error { message }))) => return Err(printable(&message)),
        Ok(Ok(_)) => return Err("the relay did not take the invite".into()),
        Ok(Err(message)) => return Err(message),
    };
    let until = SystemTime::now() + Duration::from_secs(request.expires_in_secs);
    println!(
        "Invite {id} for {} (may open {}), until {}.",
        request.name,
        request.ports.join(", "),
        timestamp(until)
    );
    println!();
    println!("On the home machine, run:");
    println!();
    println!("  sudo tether-agent join '{line}'");
    println!();
    if guessed {
        println!(
            "The line names {}, this machine's address; if home reaches the relay by another name,",
            line.relay.host
        );
        println!("press Ctrl-C and run again with --host NAME.");
    }
    println!("Waiting for the agent to join; leave this running (Ctrl-C withdraws the invite).");
    loop {
        match read_said(&mut relay).await? {
            Some(Said::Joined {
                fingerprint,
                address,
            }) => {
                let fingerprint: Fingerprint = fingerprint
                    .parse()
                    .map_err(|_| "the relay named no key".to_string())?;
                let wrote = match add_agent(file, &request.name, fingerprint, &request.ports) {
                    Ok(()) => Wrote::Written,
                    Err(message) => Wrote::Failed { message },
                };
                let answer = serde_json::to_string(&wrote).map_err(|e| e.to_string())?;
                relay
                    .get_mut()
                    .write_all(format!("{answer}\n").as_bytes())
                    .await
                    .map_err(|e| format!("the relay went away: {e}"))?;
                if let Wrote::Failed { message } = wrote {
                    return Err(message);
                }
                return match read_said(&mut relay).await? {
                    Some(Said::Listed) => {
                        println!(
                            "{} joined from {}, key {fingerprint}; {} lists it now.",
                            request.name,
                            printable(&address),
                            file.display()
                        );
                        Ok(())
                    }
                    Some(Said::Error { message }) => Err(printable(&message)),
                    _ => Err("the relay did not say whether it lists the agent".into()),
                };
            }
            Some(Said::Expired) => return Err("the invite expired; no agent joined".into()),
            Some(Said::Revoked) => return Err("the invite was revoked".into()),
            Some(Said::Error { message }) => return Err(printable(&message)),
            Some(Said::Invited { .. } | Said::Listed) => {}
            None => {
                return Err(
                    "the relay stopped, and the invite with it; run invite again once it is up"
                        .into(),
                )
            }
        }
    }
}

/// `tether-relay invites [--revoke ID]`.
pub fn invites(socket: &Path, revoke: Option<&str>, json: bool) -> ExitCode {
    let request = match revoke {
        Some(id) => format!("revoke {id}"),
        None => "invites".into(),
    };
    let asked = runtime().block_on(async {
        let mut relay = status_socket::open(socket, &request)
            .await
            .map_err(socket_error)?;
        let mut line = String::new();
        let mut limited = (&mut relay).take(MAX_LINE);
        let read = limited.read_line(&mut line);
        tokio::time::timeout(ANSWER_TIMEOUT, read)
            .await
            .map_err(|_| format!("{}: no answer within {ANSWER_TIMEOUT:?}", socket.display()))?
            .map_err(|e| format!("reading the relay's answer: {e}"))?;
        Ok::<_, String>(line)
    });
    let line = match asked {
        Ok(line) => line,
        Err(message) => {
            eprintln!("tether-relay invites: {message}");
            return failure();
        }
    };
    if let Some(id) = revoke {
        return match serde_json::from_str::<Said>(&line) {
            Ok(Said::Revoked) => {
                println!("Revoked invite {}.", printable(id));
                ExitCode::SUCCESS
            }
            Ok(Said::Error { message }) => {
                eprintln!("tether-relay invites: {}", printable(&message));
                failure()
            }
            _ => {
                eprintln!("tether-relay invites: the relay's answer is not one");
                failure()
            }
        };
    }
    if json {
        print!("{line}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<Vec<InviteInfo>>(&line) {
        Ok(list) if list.is_empty() => {
            println!("No invite is pending.");
            ExitCode::SUCCESS
        }
        Ok(list) => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.name.clone(),
                        i.ports.join(","),
                        i.expires.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                report::table(&["ID", "AGENT", "PORTS", "EXPIRES"], &rows)
            );
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!(
                "tether-relay invites: the relay's answer is not one; is it the same version?"
            );
            failure()
        }
    }
}

/// Lists an agent in the relay config `file`, as a block pasted at its end would: the file's
/// comments, order and mode are kept, and it is replaced in one step (a new file renamed over
/// it) once the new text loads.
pub fn add_agent(
    file: &Path,
    name: &str,
    fingerprint: Fingerprint,
    ports: &[String],
) -> Result<(), String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", file.display());
    let text = fs::read_to_string(file).map_err(|e| at(&e))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| at(&e))?;
    let first = !doc.contains_key("agent");
    let trailing = doc.trailing().as_str().unwrap_or_default().to_owned();
    let item = doc.entry("agent").or_insert(toml_edit::Item::ArrayOfTables(
        toml_edit::ArrayOfTables::new(),
    ));
    if item.as_array_of_tables_mut().is_none() {
        return Err(at(&"agent: expected [[agent]] blocks"));
    }
    let mut block = toml_edit::Table::new();
    block.insert("name", toml_edit::value(name));
    block.insert("fingerprint", toml_edit::value(fingerprint.to_string()));
    let ports: toml_edit::Array = ports.iter().map(String::as_str).collect();
    block.insert("ports", toml_edit::value(ports));
    let mut prefix = format!(
        "\n# joined with an invite, {}\n",
        timestamp(SystemTime::now())
    );
    if first {
        // The comments at the end of the file (init's example of a block) stay above it.
        prefix = format!("{trailing}{prefix}");
        doc.set_trailing("");
    }
    block.decor_mut().set_prefix(prefix);
    if let Some(agents) = doc
        .get_mut("agent")
        .and_then(|i| i.as_array_of_tables_mut())
    {
        agents.push(block);
    }
    let name_of = file
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let new = file.with_file_name(format!(".{name_of}.tether-new"));
    let meta = fs::metadata(file).map_err(|e| at(&e))?;
    let write = || {
        fs::write(&new, doc.to_string())?;
        fs::set_permissions(&new, meta.permissions())?;
        std::os::unix::fs::chown(&new, Some(meta.uid()), Some(meta.gid()))
    };
    if let Err(error) = write() {
        let _ = fs::remove_file(&new);
        return Err(format!("{}: {error}", new.display()));
    }
    if let Err(error) = RelayConfig::load(&new) {
        let _ = fs::remove_file(&new);
        return Err(format!(
            "{} would not load with the agent added; fix it first:\n{error}",
            file.display()
        ));
    }
    fs::rename(&new, file).map_err(|e| at(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TEMPLATE: &str =
        "# tether relay\nlisten = \"0.0.0.0:4433\"   # UDP\nkey = \"relay.key\"\n\
                            \n# One block per agent.\n# [[agent]]\n# name = \"dorm\"\n";

    fn key(n: u8) -> Fingerprint {
        Fingerprint::of_spki(&[n])
    }

    #[test]
    fn an_agent_is_added_with_the_files_comments_order_and_mode_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        fs::write(&file, TEMPLATE).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let ports = ["2222/tcp".to_string(), "60000-60010/udp".to_string()];
        add_agent(&file, "dorm", key(1), &ports).unwrap();
        add_agent(&file, "lab", key(2), &ports[..1]).unwrap();
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.starts_with(TEMPLATE), "{text}");
        let dorm = text.find("name = \"dorm\"\n").unwrap();
        assert!(text.find("name = \"lab\"").unwrap() > dorm);
        assert!(text.contains(&format!(
            "[[agent]]\nname = \"dorm\"\nfingerprint = \"{}\"\nports = [\"2222/tcp\", \"60000-60010/udp\"]\n",
            key(1)
        )));
        let config = RelayConfig::load(&file).unwrap();
        let names: Vec<_> = config.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["dorm", "lab"]);
        assert_eq!(config.agents[0].fingerprint, key(1));
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no file left beside it"
        );
    }

    #[test]
    fn a_file_that_would_not_load_is_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        // A key the relay does not know: an edit that a reload would refuse.
        let broken = format!("{TEMPLATE}lisen = 1\n");
        fs::write(&file, &broken).unwrap();
        let error = add_agent(&file, "dorm", key(1), &["2222/tcp".into()]).unwrap_err();
        assert!(error.contains("would not load"), "{error}");
        assert!(error.contains("lisen"), "{error}");
        assert_eq!(fs::read_to_string(&file).unwrap(), broken);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
