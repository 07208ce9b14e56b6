//! Webhook events built from the shared fixture files, with the ids a test needs.

use anyhow::{Context, bail};
use serde_json::Value;

/// Fields of a fixture event to replace; `None` keeps the fixture's value.
#[derive(Debug, Default, Clone)]
pub struct EventOverrides {
    /// Replaces the top-level `id` (the Stripe event id).
    pub event_id: Option<String>,
    /// Replaces `data.object.id`.
    pub object_id: Option<String>,
    /// Replaces the top-level `created` (unix seconds).
    pub created: Option<i64>,
    /// Set in `data.object.metadata`, as the object's creator put them there.
    pub metadata: Vec<(String, String)>,
}

/// Applies `overrides` to a parsed fixture event and returns the compact JSON bytes.
///
/// These bytes are what gets signed and sent, so callers must not re-serialize them.
pub fn event_from_fixture(fixture: &Value, overrides: &EventOverrides) -> anyhow::Result<Vec<u8>> {
    let mut event = fixture.clone();
    let Some(top) = event.as_object_mut() else {
        bail!("the fixture event is not a JSON object");
    };
    if let Some(id) = &overrides.event_id {
        top.insert("id".into(), Value::from(id.as_str()));
    }
    if let Some(created) = overrides.created {
        top.insert("created".into(), Value::from(created));
    }
    if let Some(object_id) = &overrides.object_id {
        set_object_id(&mut event, object_id)?;
    }
    if !overrides.metadata.is_empty() {
        set_metadata(&mut event, &overrides.metadata)?;
    }
    serde_json::to_vec(&event).context("serialize the event")
}

fn set_metadata(event: &mut Value, entries: &[(String, String)]) -> anyhow::Result<()> {
    let object = event
        .pointer_mut("/data/object")
        .and_then(Value::as_object_mut)
        .context("the fixture event has no data.object to set metadata on")?;
    let metadata = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if !metadata.is_object() {
        *metadata = Value::Object(Default::default());
    }
    for (key, value) in entries {
        metadata[key.as_str()] = Value::from(value.as_str());
    }
    Ok(())
}

fn set_object_id(event: &mut Value, object_id: &str) -> anyhow::Result<()> {
    let object = event
        .pointer_mut("/data/object")
        .and_then(Value::as_object_mut)
        .context("the fixture event has no data.object to set the id of")?;
    object.insert("id".into(), Value::from(object_id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> Value {
        json!({"id": "evt_1", "created": 1, "type": "x", "data": {"object": {"id": "cs_1", "n": 2}}})
    }

    #[test]
    fn overrides_only_the_named_fields() {
        let overrides = EventOverrides {
            event_id: Some("evt_2".into()),
            object_id: Some("cs_2".into()),
            created: Some(1_700_000_000),
            ..Default::default()
        };

        let bytes = event_from_fixture(&fixture(), &overrides).expect("event builds");

        let event: Value = serde_json::from_slice(&bytes).expect("output is JSON");
        let expected = json!({"id": "evt_2", "created": 1_700_000_000, "type": "x",
            "data": {"object": {"id": "cs_2", "n": 2}}});
        assert_eq!(event, expected);
    }

    #[test]
    fn no_overrides_keeps_the_fixture() {
        let bytes = event_from_fixture(&fixture(), &EventOverrides::default()).expect("builds");

        let event: Value = serde_json::from_slice(&bytes).expect("output is JSON");
        assert_eq!(event, fixture());
    }

    #[test]
    fn object_id_without_data_object_is_an_error() {
        let overrides = EventOverrides {
            object_id: Some("cs_2".into()),
            ..Default::default()
        };

        let result = event_from_fixture(&json!({"id": "evt_1"}), &overrides);

        assert!(result.is_err());
    }
}
