//! Checks the conformance vectors in `vectors/` against this
//! implementation and against the specification:
//!
//! - each vector decodes (`Framing::decode_body`) to an envelope whose body
//!   is the one the manifest names, and re-encodes to the same bytes;
//! - each also decodes, to the same bytes again, with descriptors compiled
//!   from `proto/` (no generated code involved);
//! - together they cover every `Envelope` body variant, and every member of
//!   every other oneof of the specification (each Value kind, each
//!   ControlRequest action, accepted and rejected SubmitReply);
//! - the manifest and the directory list the same files.
//!
//! The vectors are written by `src/bin/write-vectors.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;

use bytes::Bytes;
use casa_node_protocol::Framing;
use casa_node_protocol::pb::envelope::Body;
use protox::prost::Message as _;
use protox::prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value as DynValue};
use serde::Deserialize;

/// One manifest entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    file: String,
    message: String,
    body: String,
    description: String,
}

/// The `body` oneof's field names, in field number order. Checked against
/// `envelope.proto` by `body_field_list_matches_the_specification`, so a
/// variant added to the specification fails the tests until it is listed
/// here and given a vector.
const BODY_FIELDS: [&str; 28] = [
    "hello",
    "welcome",
    "error",
    "command_request",
    "command_response",
    "control_request",
    "control_response",
    "ping_request",
    "ping_response",
    "log_record",
    "submit_request",
    "submit_reply",
    "response_delivery",
    "status_request",
    "status_reply",
    "cancel_request",
    "cancel_reply",
    "log_subscription",
    "stop_request",
    "debugging_mode_request",
    "track_request",
    "track_reply",
    "log_level_request",
    "ack",
    "id_lease_request",
    "id_lease",
    "claim_request",
    "claim_reply",
];

/// The oneof field name of a body variant.
fn body_field(body: &Body) -> &'static str {
    match body {
        Body::Hello(_) => "hello",
        Body::Welcome(_) => "welcome",
        Body::Error(_) => "error",
        Body::CommandRequest(_) => "command_request",
        Body::CommandResponse(_) => "command_response",
        Body::ControlRequest(_) => "control_request",
        Body::ControlResponse(_) => "control_response",
        Body::PingRequest(_) => "ping_request",
        Body::PingResponse(_) => "ping_response",
        Body::LogRecord(_) => "log_record",
        Body::SubmitRequest(_) => "submit_request",
        Body::SubmitReply(_) => "submit_reply",
        Body::ResponseDelivery(_) => "response_delivery",
        Body::StatusRequest(_) => "status_request",
        Body::StatusReply(_) => "status_reply",
        Body::CancelRequest(_) => "cancel_request",
        Body::CancelReply(_) => "cancel_reply",
        Body::LogSubscription(_) => "log_subscription",
        Body::StopRequest(_) => "stop_request",
        Body::DebuggingModeRequest(_) => "debugging_mode_request",
        Body::TrackRequest(_) => "track_request",
        Body::TrackReply(_) => "track_reply",
        Body::LogLevelRequest(_) => "log_level_request",
        Body::Ack(_) => "ack",
        Body::IdLeaseRequest(_) => "id_lease_request",
        Body::IdLease(_) => "id_lease",
        Body::ClaimRequest(_) => "claim_request",
        Body::ClaimReply(_) => "claim_reply",
    }
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn manifest() -> Vec<Entry> {
    let path = vectors_dir().join("manifest.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_vector(entry: &Entry) -> Vec<u8> {
    let path = vectors_dir().join(&entry.file);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The descriptors of `proto/casa/node/v1/*.proto`, compiled now.
fn descriptor_pool() -> DescriptorPool {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    protox::Compiler::new([root])
        .and_then(|mut c| {
            c.include_imports(true).open_files([
                "casa/node/v1/value.proto",
                "casa/node/v1/node.proto",
                "casa/node/v1/driver.proto",
                "casa/node/v1/envelope.proto",
            ])?;
            Ok(c.descriptor_pool())
        })
        .expect("proto/ compiles")
}

/// Every vector decodes to the body variant the manifest names, and
/// re-encodes to exactly its bytes.
#[test]
fn every_vector_decodes_to_its_body_and_reencodes_identically() {
    let framing = Framing::default();
    for entry in manifest() {
        assert_eq!(entry.message, "casa.node.v1.Envelope", "{}", entry.file);
        assert!(
            !entry.description.trim().is_empty(),
            "{}: no description",
            entry.file
        );
        let bytes = read_vector(&entry);
        let envelope = framing
            .decode_body(Bytes::from(bytes.clone()))
            .unwrap_or_else(|e| panic!("{}: {e}", entry.file));
        let body = envelope.body.as_ref().expect("decode_body refuses no body");
        assert_eq!(body_field(body), entry.body, "{}", entry.file);
        assert_eq!(
            framing.encode_body(&envelope).unwrap(),
            bytes,
            "{}: re-encoding changed the bytes",
            entry.file
        );
    }
}

/// `BODY_FIELDS` is the `body` oneof of `envelope.proto`, field for field.
#[test]
fn body_field_list_matches_the_specification() {
    let pool = descriptor_pool();
    let envelope = pool.get_message_by_name("casa.node.v1.Envelope").unwrap();
    let body = envelope.oneofs().find(|o| o.name() == "body").unwrap();
    let in_proto: Vec<String> = body.fields().map(|f| f.name().to_owned()).collect();
    assert_eq!(in_proto, BODY_FIELDS);
}

/// The manifest has a vector of every body variant.
#[test]
fn the_vectors_cover_every_body_variant() {
    let covered: BTreeSet<String> = manifest().into_iter().map(|e| e.body).collect();
    let all: BTreeSet<String> = BODY_FIELDS.iter().map(|s| s.to_string()).collect();
    let missing: Vec<_> = all.difference(&covered).collect();
    let unknown: Vec<_> = covered.difference(&all).collect();
    assert!(missing.is_empty(), "no vector for {missing:?}");
    assert!(
        unknown.is_empty(),
        "manifest names unknown bodies {unknown:?}"
    );
}

/// Records, for every message in `message` and below, which member of each
/// of its oneofs is set, as "Message.oneof" -> {field, ...}.
fn collect_oneofs(message: &DynamicMessage, seen: &mut BTreeMap<String, BTreeSet<String>>) {
    let descriptor = message.descriptor();
    for oneof in descriptor.oneofs() {
        let key = format!("{}.{}", descriptor.full_name(), oneof.name());
        let set = seen.entry(key).or_default();
        for field in oneof.fields() {
            if message.has_field(&field) {
                set.insert(field.name().to_owned());
            }
        }
    }
    for (_, value) in message.fields() {
        collect_value(value, seen);
    }
}

fn collect_value(value: &DynValue, seen: &mut BTreeMap<String, BTreeSet<String>>) {
    match value {
        DynValue::Message(m) => collect_oneofs(m, seen),
        DynValue::List(items) => items.iter().for_each(|v| collect_value(v, seen)),
        _ => {}
    }
}

/// Decoded from the `.proto` files alone (reflection, no generated code),
/// every vector is an Envelope with exactly the manifest's body field set
/// and no unknown fields, and re-encodes to the same bytes; and the vectors
/// between them set every member of every oneof in the specification: each
/// Value kind, each ControlRequest action, accepted and rejected.
#[test]
fn the_vectors_agree_with_the_proto_files_and_cover_every_oneof_member() {
    let pool = descriptor_pool();
    let envelope = pool.get_message_by_name("casa.node.v1.Envelope").unwrap();
    let mut seen = BTreeMap::new();
    for entry in manifest() {
        let bytes = read_vector(&entry);
        let message = DynamicMessage::decode(envelope.clone(), bytes.as_slice())
            .unwrap_or_else(|e| panic!("{}: {e}", entry.file));
        assert!(
            message.has_field_by_name(&entry.body),
            "{}: {} not set",
            entry.file,
            entry.body
        );
        assert_eq!(
            message.encode_to_vec(),
            bytes,
            "{}: reflection re-encodes differently (unknown or misplaced fields?)",
            entry.file
        );
        collect_oneofs(&message, &mut seen);
    }

    let mut missing = Vec::new();
    for message in pool.all_messages() {
        for oneof in message.oneofs() {
            if oneof.is_synthetic() {
                continue; // proto3 `optional`
            }
            let key = format!("{}.{}", message.full_name(), oneof.name());
            let set = seen.get(&key);
            for field in oneof.fields() {
                if !set.is_some_and(|s| s.contains(field.name())) {
                    missing.push(format!("{key}: {}", field.name()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "no vector sets {missing:#?}");
}

/// The manifest lists every file in `vectors/` (but itself) once, and
/// every file it lists is there.
#[test]
fn manifest_and_directory_list_the_same_files() {
    let listed: Vec<String> = manifest().into_iter().map(|e| e.file).collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "a file is listed twice");
    let present: BTreeSet<String> = fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "manifest.json")
        .collect();
    assert_eq!(present, unique);
}
