//! The binary refuses to start on bad settings, names the setting, and never
//! prints a secret.

use std::process::{Command, Output};

const SECRETS: &[&str] = &[
    "sk_test_startup_secret",
    "whsec_startup_secret",
    "startup-admin-token-0123456789abcdef",
];

fn serve_with(env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_payments"))
        .arg("serve")
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run payments serve")
}

fn full_env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "DATABASE_URL",
            "postgres://postgres:db-password@127.0.0.1:1/none",
        ),
        ("STRIPE_SECRET_KEY", SECRETS[0]),
        ("STRIPE_WEBHOOK_SECRETS", SECRETS[1]),
        ("PAYMENTS_ADMIN_TOKEN", SECRETS[2]),
        ("PAYMENTS_PUBLIC_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_WEBHOOK_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_ADMIN_ADDR", "127.0.0.1:0"),
        ("PAYMENTS_REDIRECT_HOSTS", "shop.example"),
        (
            "PAYMENTS_KEK_FILE",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dev-kek.txt"),
        ),
    ]
}

fn assert_refused_naming(output: &Output, setting: &str) {
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(setting), "{stderr}");
    for secret in SECRETS.iter().chain(&["db-password"]) {
        assert!(!stderr.contains(secret), "secret printed: {stderr}");
    }
}

#[test]
fn each_missing_setting_is_named() {
    for name in [
        "DATABASE_URL",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRETS",
        "PAYMENTS_ADMIN_TOKEN",
        "PAYMENTS_REDIRECT_HOSTS",
    ] {
        let env: Vec<_> = full_env().into_iter().filter(|(k, _)| *k != name).collect();

        let output = serve_with(&env);

        assert_refused_naming(&output, name);
    }
}

#[test]
fn malformed_settings_are_named() {
    let cases = [
        ("STRIPE_WEBHOOK_SECRETS", "whsec_ok,not-a-secret"),
        ("PAYMENTS_WEBHOOK_TOLERANCE_SECS", "five"),
        ("PAYMENTS_PUBLIC_ADDR", "localhost"),
        ("STRIPE_API_BASE", "ftp://example"),
        ("STRIPE_SECRET_KEY", "pk_test_publishable"),
    ];
    for (name, value) in cases {
        let mut env = full_env();
        env.retain(|(k, _)| *k != name);
        env.push((name, value));

        let output = serve_with(&env);

        assert_refused_naming(&output, name);
    }
}

#[test]
fn an_unreachable_database_stops_the_start_without_printing_its_password() {
    let output = serve_with(&full_env());

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("migrations"), "{stderr}");
    assert!(!stderr.contains("db-password"), "{stderr}");
}
