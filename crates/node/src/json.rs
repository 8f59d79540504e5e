//! Response records as JSON, for `casa-node submit` and other scripts.
//! Values map to their natural JSON form where one exists (None → null,
//! numbers, strings, lists and tuples → arrays, dicts with str keys →
//! objects); anything JSON cannot hold exactly (bytes, complex, nan and
//! inf, ints past 2**53, dicts with other keys, arrays, pickles) becomes
//! the Python repr of the value as a string.

use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{CommandMode, CommandResponse, CommandStatus, FailureKind, Value};
use serde_json::{Map, Value as Json, json};

/// The seed's name for a mode (rule 9).
pub fn mode_name(mode: CommandMode) -> &'static str {
    match mode {
        CommandMode::Eval => "eval",
        CommandMode::Exec => "exec",
        CommandMode::Push => "push",
        CommandMode::Auto | CommandMode::Unspecified => "auto",
    }
}

/// The seed's name for a status (rule 10).
pub fn status_name(status: CommandStatus) -> &'static str {
    match status {
        CommandStatus::HoldingQueue => "holding queue",
        CommandStatus::RequestSent => "request sent",
        CommandStatus::ResponseReceived => "response received",
        CommandStatus::Timeout => "timeout",
        CommandStatus::Cancelled => "cancelled",
        CommandStatus::Unspecified => "unknown",
    }
}

/// A value as JSON (see the module documentation).
pub fn value(v: &Value) -> Json {
    const EXACT: i64 = 1 << 53;
    match &v.kind {
        Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::IntValue(i)) if (-EXACT..=EXACT).contains(i) => json!(i),
        Some(Kind::DoubleValue(d)) if d.is_finite() => json!(d),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(l)) | Some(Kind::TupleValue(l)) => {
            Json::Array(l.items.iter().map(value).collect())
        }
        Some(Kind::DictValue(d)) => {
            let mut map = Map::new();
            for entry in &d.entries {
                match (&entry.key, &entry.value) {
                    (
                        Some(Value {
                            kind: Some(Kind::StringValue(key)),
                        }),
                        Some(item),
                    ) => {
                        map.insert(key.clone(), value(item));
                    }
                    _ => return Json::String(v.to_string()),
                }
            }
            Json::Object(map)
        }
        _ => Json::String(v.to_string()),
    }
}

/// A response record (rule 9) as a JSON object with the seed's keys.
pub fn response(r: &CommandResponse) -> Json {
    let parameters: Map<String, Json> = r
        .parameters
        .iter()
        .map(|p| (p.name.clone(), p.value.as_ref().map_or(Json::Null, value)))
        .collect();
    json!({
        "command": r.command,
        "id": r.id,
        "mode": mode_name(r.mode()),
        "parameters": parameters,
        "ret": r.ret.as_ref().map_or(Json::Null, value),
        "server": r.server,
        "status": status_name(r.status()),
        "successful": r.successful,
        "traceback": r.traceback,
        "command_start_time": r.command_start_time,
        "command_stop_time": r.command_stop_time,
        "failure": failure_name(r.failure()),
        "worker_signal": r.worker_signal,
        "worker_exit_code": r.worker_exit_code,
    })
}

/// A failure kind's name in records (rule 7), null for none: the proto
/// name without its prefix, in lower case ("worker_died"), as the Python
/// client derives it from the same descriptor.
pub fn failure_name(kind: FailureKind) -> Option<String> {
    (kind != FailureKind::None).then(|| {
        let name = kind.as_str_name();
        name.strip_prefix("FAILURE_KIND_")
            .unwrap_or(name)
            .to_ascii_lowercase()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_take_their_natural_json_form_or_their_repr() {
        let v = Value::dict([
            (Value::from("a"), Value::from(3)),
            (
                Value::from("b"),
                Value::tuple([Value::from(1.5), Value::none()]),
            ),
        ]);
        assert_eq!(value(&v), json!({"a": 3, "b": [1.5, null]}));
        assert_eq!(value(&Value::from(f64::NAN)), json!("nan"));
        assert_eq!(value(&Value::bytes(b"x".to_vec())), json!("b'x'"));
        assert_eq!(value(&Value::from(u64::MAX)), json!("18446744073709551615"));
        assert_eq!(
            value(&Value::dict([(Value::from(1), Value::from(2))])),
            json!("{1: 2}")
        );
    }
}
