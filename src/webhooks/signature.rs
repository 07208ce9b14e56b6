//! The `Stripe-Signature` header: parsing and verification over raw bytes.
//!
//! Stripe signs `"{t}.{body}"` with HMAC-SHA256, keyed by the endpoint secret,
//! and sends `t=...,v1=...`. During a secret rotation it sends one `v1` per
//! active secret, so the header can repeat `v1`: it is read as a list, never
//! into a map. Other schemes (`v0`, future ones) are ignored.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// A v1 signature is an HMAC-SHA256: 32 bytes.
pub type Signature = [u8; 32];

/// Why a delivery was refused. The code is what the forensic record and the
/// metrics carry; the message is what the caller sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    MissingHeader,
    MalformedHeader,
    NoMatchingSignature,
    TimestampTooOld,
    TimestampInFuture,
    Replayed,
}

impl Rejection {
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingHeader => "missing_signature",
            Self::MalformedHeader => "malformed_signature",
            Self::NoMatchingSignature => "signature_mismatch",
            Self::TimestampTooOld => "timestamp_too_old",
            Self::TimestampInFuture => "timestamp_in_future",
            Self::Replayed => "replayed",
        }
    }
}

/// A parsed header: exactly one timestamp and every well-formed v1 value.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub v1: Vec<Signature>,
}

impl SignatureHeader {
    /// Items are `key=value`, separated by commas, with spaces tolerated
    /// around both. A `v1` that is not 64 hex digits cannot match and is
    /// dropped; a header with no usable `v1` or not exactly one `t` is malformed.
    pub fn parse(raw: &str) -> Result<Self, Rejection> {
        let mut timestamp = None;
        let mut v1 = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(Rejection::MalformedHeader);
            };
            match key.trim() {
                "t" if timestamp.is_some() => return Err(Rejection::MalformedHeader),
                "t" => timestamp = Some(parse_timestamp(value.trim())?),
                "v1" => v1.extend(decode_signature(value.trim())),
                _ => {}
            }
        }
        match timestamp {
            Some(timestamp) if !v1.is_empty() => Ok(Self { timestamp, v1 }),
            _ => Err(Rejection::MalformedHeader),
        }
    }
}

fn parse_timestamp(value: &str) -> Result<i64, Rejection> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::MalformedHeader);
    }
    value.parse().map_err(|_| Rejection::MalformedHeader)
}

fn decode_signature(value: &str) -> Option<Signature> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).ok()?;
    Some(out)
}

/// The expected v1 signature of `payload` at `timestamp` under `secret`.
pub fn compute(secret: &Secret, timestamp: i64, payload: &[u8]) -> Signature {
    // Stripe keys the HMAC with the whole secret string, prefix included.
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// Checks the header against every configured secret and the time window.
/// Returns the signature that matched: with the timestamp it is the nonce
/// that makes a second identical delivery a replay.
pub fn verify(
    header: &SignatureHeader,
    payload: &[u8],
    secrets: &[Secret],
    now_unix: i64,
    tolerance: Duration,
) -> Result<Signature, Rejection> {
    let matched = matching_signature(header, payload, secrets)?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now_unix.saturating_sub(header.timestamp);
    if age > tolerance {
        return Err(Rejection::TimestampTooOld);
    }
    if -age > tolerance {
        return Err(Rejection::TimestampInFuture);
    }
    Ok(matched)
}

/// Every `v1` value is compared with every secret's expectation, each in
/// constant time, so timing does not tell an attacker how much of a forged
/// signature was right.
fn matching_signature(
    header: &SignatureHeader,
    payload: &[u8],
    secrets: &[Secret],
) -> Result<Signature, Rejection> {
    let expected: Vec<Signature> = secrets
        .iter()
        .map(|s| compute(s, header.timestamp, payload))
        .collect();
    for candidate in &header.v1 {
        if expected.iter().any(|e| bool::from(e.ct_eq(candidate))) {
            return Ok(*candidate);
        }
    }
    Err(Rejection::NoMatchingSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const WINDOW: Duration = Duration::from_secs(300);

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    fn header_for(secret_value: &str, t: i64, body: &[u8]) -> String {
        let sig = compute(&secret(secret_value), t, body);
        format!("t={t},v1={}", hex::encode(sig))
    }

    #[test]
    fn signature_is_hmac_of_timestamp_dot_body_with_the_whole_secret() {
        // Known answer, computed with: printf '%s' '1700000000.{"a":1}' |
        //   openssl dgst -sha256 -hmac 'whsec_test'
        let sig = compute(&secret("whsec_test"), NOW, br#"{"a":1}"#);
        assert_eq!(
            hex::encode(sig),
            "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn spaces_and_unknown_schemes_are_tolerated() {
        let body = b"{}";
        let good = hex::encode(compute(&secret("whsec_a"), NOW, body));
        let raw = format!(" t = {NOW} , v0 = abc , v1 = {good} ,");
        let header = SignatureHeader::parse(&raw).expect("parses");
        assert_eq!(header.v1.len(), 1);
        assert!(verify(&header, body, &[secret("whsec_a")], NOW, WINDOW).is_ok());
    }

    #[test]
    fn a_second_t_is_malformed() {
        let raw = format!("t={NOW},t={NOW},v1={}", "00".repeat(32));
        assert_eq!(
            SignatureHeader::parse(&raw),
            Err(Rejection::MalformedHeader)
        );
    }

    #[test]
    fn a_header_without_v1_is_malformed() {
        assert_eq!(
            SignatureHeader::parse(&format!("t={NOW},v0=abcd")),
            Err(Rejection::MalformedHeader)
        );
        assert_eq!(
            SignatureHeader::parse("garbage"),
            Err(Rejection::MalformedHeader)
        );
    }

    #[test]
    fn a_negative_or_signed_timestamp_is_malformed() {
        let sig = "00".repeat(32);
        for t in ["-5", "+5", "", "1e9"] {
            let raw = format!("t={t},v1={sig}");
            assert_eq!(
                SignatureHeader::parse(&raw),
                Err(Rejection::MalformedHeader),
                "{t}"
            );
        }
    }

    #[test]
    fn the_window_is_inclusive_at_its_edge() {
        let body = b"{}";
        let secrets = [secret("whsec_a")];
        for (t, expected) in [
            (NOW - 300, Ok(())),
            (NOW - 301, Err(Rejection::TimestampTooOld)),
            (NOW + 300, Ok(())),
            (NOW + 301, Err(Rejection::TimestampInFuture)),
        ] {
            let header = SignatureHeader::parse(&header_for("whsec_a", t, body)).unwrap();
            let result = verify(&header, body, &secrets, NOW, WINDOW).map(|_| ());
            assert_eq!(result, expected, "t = now {:+}", t - NOW);
        }
    }

    #[test]
    fn a_bad_signature_is_reported_before_the_timestamp() {
        // A forger learns nothing about the clock from a wrong signature.
        let body = b"{}";
        let header = SignatureHeader::parse(&header_for("whsec_wrong", NOW - 9999, body)).unwrap();
        let result = verify(&header, body, &[secret("whsec_a")], NOW, WINDOW);
        assert_eq!(result, Err(Rejection::NoMatchingSignature));
    }
}
