//! Short-lived tokens the shop signs for its shoppers' browsers (JWTs).
//!
//! Checked against the configured issuer, audience and public keys (a JWKS),
//! with an allowlist of asymmetric algorithms, expiry and not-before with a
//! small clock skew, and a maximum lifetime so a "short-lived" token really is.

use std::{collections::HashSet, str::FromStr, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use super::{Actor, Refusal};
use crate::config::{ConfigError, Source, malformed, number, required, value};

#[derive(Clone)]
pub struct BrowserTokens {
    issuer: String,
    audience: String,
    algorithms: Vec<Algorithm>,
    keys: JwkSet,
    leeway: Duration,
    max_lifetime: Duration,
}

impl std::fmt::Debug for BrowserTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserTokens")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .field("keys", &self.keys.keys.len())
            .finish()
    }
}

const ISSUER: &str = "PAYMENTS_BROWSER_TOKEN_ISSUER";
const AUDIENCE: &str = "PAYMENTS_BROWSER_TOKEN_AUDIENCE";
const JWKS: &str = "PAYMENTS_BROWSER_TOKEN_JWKS";
const ALGORITHMS: &str = "PAYMENTS_BROWSER_TOKEN_ALGORITHMS";

/// Browser tokens are off unless an issuer is configured; then the audience
/// and keys are required too.
pub fn from_source(src: &dyn Source) -> Result<Option<BrowserTokens>, ConfigError> {
    let Some(issuer) = value(src, ISSUER)? else {
        return Ok(None);
    };
    let audience = required(src, AUDIENCE)?;
    let keys: JwkSet = serde_json::from_str(&required(src, JWKS)?)
        .map_err(|e| malformed(JWKS, format!("not a JWKS document: {e}")))?;
    if keys.keys.is_empty() || keys.keys.iter().any(|k| k.common.key_id.is_none()) {
        return Err(malformed(JWKS, "needs at least one key, each with a kid"));
    }
    let algorithms = algorithms(value(src, ALGORITHMS)?.as_deref().unwrap_or("ES256,EdDSA"))?;
    let leeway = number(src, "PAYMENTS_BROWSER_TOKEN_LEEWAY_SECS", 30, 0..=300)?;
    let max_lifetime = number(
        src,
        "PAYMENTS_BROWSER_TOKEN_MAX_LIFETIME_SECS",
        900,
        30..=86_400,
    )?;
    Ok(Some(BrowserTokens {
        issuer,
        audience,
        algorithms,
        keys,
        leeway: Duration::from_secs(leeway),
        max_lifetime: Duration::from_secs(max_lifetime),
    }))
}

/// Only asymmetric algorithms: the service must be able to check a token
/// without holding anything that could mint one.
fn algorithms(raw: &str) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let alg = Algorithm::from_str(name)
            .map_err(|_| malformed(ALGORITHMS, format!("unknown algorithm {name}")))?;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(malformed(ALGORITHMS, "HMAC algorithms are not accepted"));
        }
        out.push(alg);
    }
    if out.is_empty() {
        return Err(malformed(ALGORITHMS, "name at least one algorithm"));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: Option<u64>,
}

/// Checks a browser token. Any failure is the same refusal to the caller;
/// the reason goes to the audit record only.
pub fn authenticate(config: Option<&BrowserTokens>, token: &str) -> Result<Actor, Refusal> {
    let config = config.ok_or(Refusal::Denied("browser tokens are not enabled"))?;
    // `alg: none` and unknown algorithms fail to parse here.
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Refusal::Denied("malformed token"))?;
    if !config.algorithms.contains(&header.alg) {
        return Err(Refusal::Denied("token algorithm not allowed"));
    }
    let kid = header.kid.ok_or(Refusal::Denied("token has no kid"))?;
    let jwk = config
        .keys
        .find(&kid)
        .ok_or(Refusal::Denied("unknown token key"))?;
    // A key that names its algorithm is used with that one only.
    if jwk
        .common
        .key_algorithm
        .is_some_and(|a| a.to_string() != format!("{:?}", header.alg))
    {
        return Err(Refusal::Denied("token algorithm does not match its key"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| Refusal::Denied("unusable token key"))?;
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation(config, header.alg))
        .map_err(|_| Refusal::Denied("invalid token"))?
        .claims;
    check_lifetime(config, &claims)?;
    if claims.sub.is_empty() || claims.sub.len() > 255 {
        return Err(Refusal::Denied("token subject unusable"));
    }
    Ok(Actor::Browser {
        subject: claims.sub,
    })
}

fn validation(config: &BrowserTokens, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.leeway = config.leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.required_spec_claims = HashSet::from(["exp", "iss", "aud", "sub"].map(String::from));
    validation
}

fn check_lifetime(config: &BrowserTokens, claims: &Claims) -> Result<(), Refusal> {
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
    let start = claims.iat.unwrap_or(now).min(now + config.leeway.as_secs());
    if claims.exp.saturating_sub(start) > config.max_lifetime.as_secs() + config.leeway.as_secs() {
        return Err(Refusal::Denied("token lives longer than allowed"));
    }
    Ok(())
}
