//! Reads the two facts a handler wants from a client certificate that rustls
//! has already verified: who holds it and until when it is valid.
//!
//! Only the DER structure up to the subject is walked (RFC 5280 §4.1); the
//! signature and extensions were checked by webpki during the handshake.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDateTime, Utc};

const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const EXPLICIT_VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Summary {
    /// The subject as an RFC 4514 string, such as `CN=ops-alice,O=Example`.
    pub subject: String,
    pub not_after: DateTime<Utc>,
}

/// `None` when the bytes are not a certificate this reader understands.
pub(super) fn summarize(der: &[u8]) -> Option<Summary> {
    let certificate = Reader(der).expect(SEQUENCE)?;
    let tbs = Reader(certificate).expect(SEQUENCE)?;
    let mut fields = Reader(tbs);
    let mut serial = fields.read()?;
    if serial.0 == EXPLICIT_VERSION {
        serial = fields.read()?;
    }
    if serial.0 != INTEGER {
        return None;
    }
    fields.expect(SEQUENCE)?; // signature algorithm
    fields.expect(SEQUENCE)?; // issuer
    let mut validity = Reader(fields.expect(SEQUENCE)?);
    validity.read()?; // not before
    let (tag, not_after) = validity.read()?;
    Some(Summary {
        not_after: time(tag, not_after)?,
        subject: name(fields.expect(SEQUENCE)?)?,
    })
}

/// One DER element at a time: (tag, content). Single-byte tags and lengths
/// up to four bytes, which is all a certificate uses.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn read(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            bytes.iter().fold(0, |len, b| (len << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return None;
        }
        let (content, after) = rest.split_at(len);
        self.0 = after;
        Some((tag, content))
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        let (found, content) = self.read()?;
        (found == tag).then_some(content)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn time(tag: u8, text: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(text).ok()?;
    let full = match tag {
        // Two-digit years: 50 to 99 are 19xx, the rest 20xx (RFC 5280 §4.1.2.5.1).
        UTC_TIME => {
            let year: u8 = text.get(..2)?.parse().ok()?;
            let century = if year >= 50 { "19" } else { "20" };
            format!("{century}{text}")
        }
        GENERALIZED_TIME => text.to_owned(),
        _ => return None,
    };
    let parsed = NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ").ok()?;
    Some(parsed.and_utc())
}

/// RDNs in reverse order, as RFC 4514 writes them; a multi-valued RDN's
/// attributes joined with `+`.
fn name(der: &[u8]) -> Option<String> {
    let mut rdns = Reader(der);
    let mut parts = Vec::new();
    while !rdns.is_empty() {
        let mut attributes = Reader(rdns.expect(SET)?);
        let mut values = Vec::new();
        while !attributes.is_empty() {
            let mut attribute = Reader(attributes.expect(SEQUENCE)?);
            let oid = oid_text(attribute.expect(OID)?);
            let (tag, value) = attribute.read()?;
            let value = match string(tag, value) {
                Some(text) => escape(&text),
                None => format!("#{}", hex::encode(value)),
            };
            values.push(format!("{}={value}", short_name(&oid).unwrap_or(&oid)));
        }
        parts.push(values.join("+"));
    }
    parts.reverse();
    Some(parts.join(","))
}

fn oid_text(der: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut arc: u64 = 0;
    for byte in der {
        arc = (arc << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (arc / 40).min(2);
                arcs.push(first);
                arc -= first * 40;
            }
            arcs.push(arc);
            arc = 0;
        }
    }
    let text: Vec<String> = arcs.iter().map(u64::to_string).collect();
    text.join(".")
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// The directory string types; `None` for anything else.
fn string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, NumericString, PrintableString, TeletexString,
        // IA5String, VisibleString
        0x0c | 0x12 | 0x13 | 0x14 | 0x16 | 0x1a => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        // BMPString: UTF-16BE
        0x1e if bytes.len().is_multiple_of(2) => {
            let units = bytes
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            let chars = char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER));
            Some(chars.collect())
        }
        // UniversalString: UTF-32BE
        0x1c if bytes.len().is_multiple_of(4) => {
            let chars = bytes.chunks_exact(4).map(|quad| {
                let code = u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]]);
                char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
            });
            Some(chars.collect())
        }
        _ => None,
    }
}

/// RFC 4514 escaping. Control characters become `\XX`, so a subject
/// written to a log can never start a new line.
fn escape(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_control() {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                let _infallible = write!(out, "\\{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, date_time_ymd};

    fn der(edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        edit(&mut params);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_and_the_end_of_validity() {
        let cert = der(|p| {
            p.distinguished_name
                .push(DnType::OrganizationName, "Example, Inc.");
            p.distinguished_name.push(DnType::CommonName, "ops-alice");
            p.not_after = date_time_ymd(2031, 7, 9);
        });

        let summary = summarize(&cert).expect("a certificate");

        assert_eq!(summary.subject, r"CN=ops-alice,O=Example\, Inc.");
        assert_eq!(summary.not_after.to_rfc3339(), "2031-07-09T00:00:00+00:00");
    }

    #[test]
    fn generalized_time_and_control_characters() {
        let cert = der(|p| {
            p.distinguished_name.push(DnType::CommonName, "evil\nline");
            p.not_after = date_time_ymd(2051, 1, 2);
        });

        let summary = summarize(&cert).expect("a certificate");

        assert_eq!(summary.subject, r"CN=evil\0Aline");
        assert_eq!(summary.not_after.to_rfc3339(), "2051-01-02T00:00:00+00:00");
    }

    #[test]
    fn anything_else_is_not_a_certificate() {
        let cert = der(|_| {});
        assert!(summarize(&cert[..cert.len() / 2]).is_none());
        assert!(summarize(b"\x30\x03\x02\x01\x01").is_none());
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn oids_are_written_in_dotted_form() {
        assert_eq!(oid_text(&[0x55, 0x04, 0x03]), "2.5.4.3");
        let email = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01];
        assert_eq!(oid_text(&email), "1.2.840.113549.1.9.1");
    }
}
