//! Frames captured from the official JS client (`@automerge/automerge-repo` 2.5.6 through a
//! recording proxy, see tests/js/interop.mjs --capture) decode, and the server's answers
//! re-encode to frames the JS client accepted.

use std::path::PathBuf;

use fieldsync::protocol::{codec, Message};

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/js-frames");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cbor"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_captured_frame_decodes_to_the_type_in_its_name() {
    let all = fixtures();
    assert!(all.len() >= 10, "fixtures missing: {}", all.len());
    for (name, bytes) in all {
        let msg = codec::decode(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ty = msg.type_name();
        assert!(name.contains(&format!("-{ty}")), "{name} decoded as {ty}");
        // Re-encoding keeps every field (the server writes the same shape back).
        assert_eq!(
            codec::decode(&codec::encode(&msg), 1 << 20).unwrap(),
            msg,
            "{name}"
        );
    }
}

#[test]
fn the_js_join_has_an_undefined_storage_id() {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/js-frames/01-client-join.cbor"),
    )
    .unwrap();
    assert!(
        bytes.windows(10).any(|w| w == b"storageId\xf7"),
        "fixture has CBOR undefined"
    );
    let Message::Join(join) = codec::decode(&bytes, 1 << 20).unwrap() else {
        panic!("not a join")
    };
    assert_eq!(join.sender_id.as_str(), "js-officer-a");
    assert_eq!(join.peer_metadata.storage_id, None);
    assert!(join.peer_metadata.is_ephemeral);
    assert_eq!(join.supported_protocol_versions, vec!["1".to_string()]);
}

#[test]
fn numbers_the_js_encoder_wrote_as_float64_decode_as_integers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/js-frames");
    let heads = std::fs::read(dir.join("90-client-remote-heads-changed-float.cbor")).unwrap();
    assert!(heads.contains(&0xfb), "cbor-x wrote a float64");
    let Message::RemoteHeadsChanged(m) = codec::decode(&heads, 1 << 20).unwrap() else {
        panic!()
    };
    assert_eq!(m.new_heads[0].2, 1_790_000_000_123);
    let eph = std::fs::read(dir.join("91-client-ephemeral-float.cbor")).unwrap();
    let Message::Ephemeral(e) = codec::decode(&eph, 1 << 20).unwrap() else {
        panic!()
    };
    assert_eq!(e.count, 1 << 33);
}

#[test]
fn a_captured_sync_carries_a_real_automerge_sync_message() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/js-frames");
    let Message::Sync(m) = codec::decode(
        &std::fs::read(dir.join("05-client-sync.cbor")).unwrap(),
        1 << 20,
    )
    .unwrap() else {
        panic!()
    };
    let sync = automerge::sync::Message::decode(&m.data).unwrap();
    assert!(!sync.heads.is_empty());
}
