//! The Splunk HTTP Event Collector sink: a batch of HEC events per POST,
//! newline-separated, with `Authorization: Splunk <token>`. A 2xx answer
//! means Splunk took the whole batch; anything else is a failure and the
//! batch is sent again.

use std::time::Duration;

use anyhow::Context;
use reqwest::{
    Certificate, Client,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue},
    redirect::Policy,
};

use super::{HecTarget, format};
use crate::config::{ConfigError, malformed};

const CA: &str = "PAYMENTS_AUDIT_HEC_CA";
/// How much of Splunk's error text is kept in a failure.
const MAX_ERROR_TEXT: usize = 200;

pub(super) struct HecSink {
    target: HecTarget,
    timeout: Duration,
    client: Option<Client>,
}

/// Checks at start that a client can be built (the CA file reads and parses).
pub(super) fn check(target: &HecTarget) -> Result<(), ConfigError> {
    client(target, Duration::from_secs(10)).map(drop)
}

fn client(target: &HecTarget, timeout: Duration) -> Result<Client, ConfigError> {
    // Never follow a redirect: it would carry the token somewhere else.
    let mut builder = Client::builder()
        .use_rustls_tls()
        .redirect(Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(concat!("payments/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &target.ca {
        let shown = path.display();
        let pem = std::fs::read(path)
            .map_err(|e| malformed(CA, format!("cannot read {shown}: {}", e.kind())))?;
        let certs = Certificate::from_pem_bundle(&pem)
            .map_err(|_| malformed(CA, format!("{shown} is not valid PEM")))?;
        if certs.is_empty() {
            return Err(malformed(CA, format!("{shown} holds no certificate")));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| malformed("PAYMENTS_AUDIT_HEC_URL", e.without_url().to_string()))
}

impl HecSink {
    pub(super) fn new(target: HecTarget, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            client: None,
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// Builds the client (reading the CA file again); connections are the
    /// client's own business.
    pub(super) fn connect(&mut self) -> anyhow::Result<()> {
        let client = client(&self.target, self.timeout).context("build the HEC client")?;
        self.client = Some(client);
        Ok(())
    }

    pub(super) fn disconnect(&mut self) {
        self.client = None;
    }

    pub(super) async fn send(&self, records: &[format::ExportRecord]) -> anyhow::Result<()> {
        let client = self.client.as_ref().context("not connected")?;
        let host = format::hostname();
        let mut body = Vec::with_capacity(records.len() * 900);
        for record in records {
            if !body.is_empty() {
                body.push(b'\n');
            }
            serde_json::to_writer(&mut body, &format::hec_event(record, host))
                .context("encode HEC event")?;
        }
        let mut token = HeaderValue::try_from(format!("Splunk {}", self.target.token.expose()))
            .context("PAYMENTS_AUDIT_HEC_TOKEN is not a valid header value")?;
        token.set_sensitive(true);
        let response = client
            .post(self.target.url.clone())
            .header(AUTHORIZATION, token)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("HEC request failed: {}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = error_text(response).await;
        anyhow::bail!("HEC answered {status}{text}")
    }
}

/// Splunk's `{"text": "...", "code": n}`, cut short; never the body as a
/// whole, which an intermediary could fill with anything.
async fn error_text(response: reqwest::Response) -> String {
    let Ok(body) = response.bytes().await else {
        return String::new();
    };
    let text = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned));
    match text {
        Some(text) => {
            let text: String = text.chars().take(MAX_ERROR_TEXT).collect();
            format!(": {text}")
        }
        None => String::new(),
    }
}
