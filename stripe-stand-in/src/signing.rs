//! Stripe webhook signing, written independently from the service's verifier so that
//! a shared misunderstanding of the scheme cannot make both sides agree on a wrong answer.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Returns the whole `Stripe-Signature` header value: `t=<timestamp>,v1=<hex hmac-sha256>`.
///
/// The HMAC key is the full secret string, `whsec_` prefix included, as Stripe's own
/// libraries use it; the signed message is `<timestamp>.<payload bytes>`.
pub fn sign_payload(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let signature = v1_signature(secret, timestamp, payload);
    format!("t={timestamp},v1={signature}")
}

/// Only the hex `v1` value, for tests that assemble unusual headers themselves.
pub fn v1_signature(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed once, outside this crate, with:
    // printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'whsec_test'
    const OPENSSL_HEX: &str = "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789";

    #[test]
    fn v1_matches_an_hmac_computed_by_openssl() {
        let v1 = v1_signature("whsec_test", 1_700_000_000, br#"{"a":1}"#);

        assert_eq!(v1, OPENSSL_HEX);
    }

    #[test]
    fn header_carries_timestamp_then_v1() {
        let header = sign_payload("whsec_test", 1_700_000_000, br#"{"a":1}"#);

        assert_eq!(header, format!("t=1700000000,v1={OPENSSL_HEX}"));
    }

    #[test]
    fn key_includes_the_whsec_prefix() {
        let with_prefix = v1_signature("whsec_test", 1_700_000_000, b"{}");
        let without_prefix = v1_signature("test", 1_700_000_000, b"{}");

        assert_ne!(with_prefix, without_prefix);
    }
}
