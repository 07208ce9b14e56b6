//! Counters of security decisions, and gauges such as the audit export lag,
//! served in the Prometheus text format on the admin listener's `/metrics`.
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

/// A gauge series: metric name, label name, label value.
type GaugeSeries = (&'static str, &'static str, String);

struct Gauges {
    help: BTreeMap<&'static str, &'static str>,
    values: BTreeMap<GaugeSeries, f64>,
}

fn gauges() -> &'static Mutex<Gauges> {
    static GAUGES: OnceLock<Mutex<Gauges>> = OnceLock::new();
    GAUGES.get_or_init(|| {
        Mutex::new(Gauges {
            help: BTreeMap::new(),
            values: BTreeMap::new(),
        })
    })
}

/// Sets a gauge with one label, such as
/// `payments_audit_export_lag_records{sink="syslog"}`.
pub fn set_gauge(name: &'static str, help: &'static str, label: (&'static str, &str), value: f64) {
    let mut gauges = gauges()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    gauges.help.insert(name, help);
    gauges
        .values
        .insert((name, label.0, label.1.to_owned()), value);
}

/// The current value of one gauge series, for tests and the admin API.
pub fn gauge(name: &str, label_value: &str) -> Option<f64> {
    let gauges = gauges()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    gauges
        .values
        .iter()
        .find(|((n, _, v), _)| *n == name && v == label_value)
        .map(|(_, value)| *value)
}

fn render_gauges(out: &mut String) {
    let gauges = gauges()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (name, help) in &gauges.help {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        let series = gauges.values.iter().filter(|((n, _, _), _)| n == name);
        for ((_, label, value), reading) in series {
            out.push_str(&format!(
                "{name}{{{label}=\"{}\"}} {reading}\n",
                escape(value)
            ));
        }
    }
}

/// All counters and gauges in the Prometheus text exposition format.
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
    drop(map);
    render_gauges(&mut out);
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
    fn gauges_render_with_their_label() {
        set_gauge("test_lag_records", "A test gauge.", ("sink", "t\"1"), 3.0);
        set_gauge("test_lag_records", "A test gauge.", ("sink", "t\"1"), 0.5);
        assert_eq!(gauge("test_lag_records", "t\"1"), Some(0.5));
        let text = render();
        assert!(text.contains("# TYPE test_lag_records gauge\n"));
        let series = "test_lag_records{sink=\"t\\\"1\"} 0.5\n";
        assert!(text.contains(series), "{text}");
    }

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
