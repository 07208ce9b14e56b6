//! Counters of security decisions, served in the Prometheus text format on
//! the admin listener's `/metrics`.
//!
//! A process-wide map of counters is enough for the handful of series this
//! service has; an OpenTelemetry exporter can read the same counters.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
};

type Series = (String, String);

fn counters() -> &'static Mutex<BTreeMap<Series, u64>> {
    static COUNTERS: OnceLock<Mutex<BTreeMap<Series, u64>>> = OnceLock::new();
    COUNTERS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Counts one security decision: `action` such as `api_key.refused`,
/// `outcome` such as `refused`.
pub fn count_decision(action: &str, outcome: &str) {
    let mut map = counters()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *map.entry((action.to_owned(), outcome.to_owned()))
        .or_insert(0) += 1;
}

/// The current value of one series, for tests and the admin API.
pub fn decision_count(action: &str, outcome: &str) -> u64 {
    let map = counters()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    map.get(&(action.to_owned(), outcome.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// All counters in the Prometheus text exposition format.
pub fn render() -> String {
    let map = counters()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut out = String::from(
        "# HELP payments_security_decisions_total Security decisions by action and outcome.\n\
         # TYPE payments_security_decisions_total counter\n",
    );
    for ((action, outcome), value) in map.iter() {
        out.push_str(&format!(
            "payments_security_decisions_total{{action=\"{}\",outcome=\"{}\"}} {value}\n",
            escape(action),
            escape(outcome)
        ));
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_as_prometheus_series() {
        count_decision("test.rendered", "refused");
        count_decision("test.rendered", "refused");
        assert_eq!(decision_count("test.rendered", "refused"), 2);
        let text = render();
        assert!(text.contains(
            "payments_security_decisions_total{action=\"test.rendered\",outcome=\"refused\"} 2"
        ));
    }
}
