//! Replays the fuzz targets' corpus (`fuzz/corpus/<target>/`) through their bodies on stable
//! Rust, so that every input the fuzzer kept, and every crash it once found, stays fixed.

use std::path::PathBuf;

use tether_common::fuzzing;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus at {}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let replayed = std::panic::catch_unwind(|| body(&data));
        assert!(replayed.is_ok(), "{target}: {} panicked", path.display());
        count += 1;
    }
    assert!(
        count > 0,
        "{target}: the corpus at {} is empty",
        dir.display()
    );
}

#[test]
fn control_frame_corpus() {
    replay("control_frame", fuzzing::control_frame);
}

#[test]
fn datagram_corpus() {
    replay("datagram", fuzzing::datagram);
}

#[test]
fn config_corpus() {
    replay("config", fuzzing::config);
}
