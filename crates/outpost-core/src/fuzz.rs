//! The bodies of outpost's fuzz targets (`fuzz/`, cargo fuzz), kept here so the normal test
//! suite replays the same checks on every input of the checked-in corpus (`fuzz/corpus/`,
//! including each input that once crashed) with stable Rust: `tests/fuzz_corpus.rs`.
//!
//! Each function takes raw bytes, panics only when an invariant breaks, and returns whether the
//! input was accepted (the corpus replay checks that `seed-*` inputs are and `reject-*` inputs
//! are not).

use std::collections::BTreeMap;

use outpost_api::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::render::{missing_references, render, template_hash};

/// The manifest parser (`outpost apply -f` / `delete -f` at the hub): any text gives objects or
/// errors, never a panic, an abort or a stack overflow. Accepted objects survive what the hub
/// does next: the store's JSON round trip, reference checks, the template hash, rendering.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(parsed) = parse_file("fuzz.yaml", text) else {
        return false;
    };
    assert_eq!(parsed.objects.len(), parsed.documents.len());
    let all: BTreeMap<ObjectId, Object> = parsed.objects.iter().map(|o| (o.id(), o.clone())).collect();
    for obj in &parsed.objects {
        let json = serde_json::to_string(obj).expect("an accepted object serializes");
        let back: Object = serde_json::from_str(&json).expect("an accepted object reads back");
        assert_eq!(&back, obj, "the JSON round trip changed {}", obj.id());
        let _ = missing_references(obj, &all);
        let _ = template_hash(obj);
        if let Some(spec) = render(obj, 1, &all) {
            let json = serde_json::to_string(&spec).expect("a rendered spec serializes");
            let _: WorkloadSpec = serde_json::from_str(&json).expect("a rendered spec reads back");
        }
    }
    true
}

/// Join tokens as `outpost agent --token` reads them: what parses encodes back to itself.
pub fn join_token(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(t) = JoinToken::parse(text) else { return false };
    assert_eq!(JoinToken::parse(&t.encode()), Ok(t));
    true
}

fn message<T: DeserializeOwned + Serialize>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    serde_json::to_vec(&v).expect("a deserialized message serializes");
    Some(v)
}

/// The JSON messages of docs/protocol.md, by `data[0] % 18` (see the match), body `data[1..]`.
/// Deserializing never panics or overflows the stack; what deserializes serializes again; the
/// request checks never panic.
pub fn protocol(data: &[u8]) -> bool {
    let Some((&which, body)) = data.split_first() else {
        return false;
    };
    let ok = |v: Option<()>| v.is_some();
    match which % 18 {
        // what the hub reads: operator routes
        0 => ok(message::<ApplyRequest>(body).map(drop)),
        1 => ok(message::<TokenRequest>(body).map(|t| drop(t.validate()))),
        2 => ok(message::<UndoRequest>(body).map(drop)),
        3 => ok(message::<ImageTag>(body).map(|t| drop(t.validate()))),
        // what the hub reads: node routes
        4 => ok(message::<JoinRequest>(body).map(drop)),
        5 => ok(message::<RenewRequest>(body).map(drop)),
        6 => ok(message::<StatusWithVitals>(body).map(drop)),
        7 => ok(message::<ErrorBatch>(body).map(drop)),
        8 => ok(message::<LogData>(body).map(drop)),
        // what agents and the CLI read from the hub
        9 => ok(message::<SyncAnswer>(body).map(drop)),
        10 => ok(message::<JoinResponse>(body).map(drop)),
        11 => ok(message::<RenewResponse>(body).map(drop)),
        12 => ok(message::<StatusAck>(body).map(drop)),
        13 => ok(message::<ApiError>(body).map(drop)),
        14 => ok(message::<ApplyResponse>(body).map(drop)),
        15 => ok(message::<Vec<NodeInfo>>(body).map(drop)),
        16 => ok(message::<Vec<WorkloadInfo>>(body).map(drop)),
        // a stored object as the hub reads it back (by kind)
        _ => ok(message::<Object>(body).map(drop)),
    }
}

/// An exec frame stream (docs/protocol.md §14) as the hub and agents read it, fed in two parts
/// split at `data[0]`: decoding never panics; the frames decoded encode to bytes that decode to
/// the same frames. True when the whole input is frames.
pub fn exec_frames(data: &[u8]) -> bool {
    use outpost_api::exec::{Frame, FrameDecoder};
    let Some((&split, body)) = data.split_first() else {
        return false;
    };
    let at = (split as usize).min(body.len());
    let mut d = FrameDecoder::default();
    let mut frames = Vec::new();
    for part in [&body[..at], &body[at..]] {
        d.push(part);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return false,
            }
        }
    }
    // What decodes, encodes again to frames that decode the same (an exit's JSON may be
    // spelled differently).
    let again: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
    let (back, rest) = outpost_api::exec::decode_all(&again).expect("encoded frames decode");
    assert_eq!((back, rest), (frames.clone(), 0), "frames survive encoding");
    d.pending() == 0 && !frames.is_empty()
}

/// The type `protocol` reads for a selector byte (for naming corpus files and in messages).
pub fn protocol_type(which: u8) -> &'static str {
    [
        "ApplyRequest",
        "TokenRequest",
        "UndoRequest",
        "ImageTag",
        "JoinRequest",
        "RenewRequest",
        "StatusWithVitals",
        "ErrorBatch",
        "LogData",
        "SyncAnswer",
        "JoinResponse",
        "RenewResponse",
        "StatusAck",
        "ApiError",
        "ApplyResponse",
        "Vec<NodeInfo>",
        "Vec<WorkloadInfo>",
        "Object",
    ][(which % 18) as usize]
}
