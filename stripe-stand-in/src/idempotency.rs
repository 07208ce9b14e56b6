//! Stripe's idempotency rules for create requests: a key replays the first answer
//! for the same parameters and refuses different ones.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::reply::JsonReply;

/// A digest of the form pairs, sorted so that field order does not matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint([u8; 32]);

pub(crate) fn fingerprint(pairs: &[(String, String)]) -> Fingerprint {
    let mut sorted: Vec<_> = pairs.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for (key, value) in sorted {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        for part in [key, value] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    Fingerprint(hasher.finalize().into())
}

#[derive(Debug)]
pub(crate) enum Lookup {
    /// The key is new: run the request.
    Fresh,
    /// The key answered these parameters before: send the same answer.
    Replay(JsonReply),
    /// The key was used with other parameters.
    Mismatch,
}

#[derive(Debug, Default)]
pub(crate) struct IdempotencyStore {
    answers: HashMap<String, (Fingerprint, JsonReply)>,
}

impl IdempotencyStore {
    pub fn lookup(&self, key: &str, fingerprint: Fingerprint) -> Lookup {
        match self.answers.get(key) {
            None => Lookup::Fresh,
            Some((stored, reply)) if *stored == fingerprint => Lookup::Replay(reply.as_replay()),
            Some(_) => Lookup::Mismatch,
        }
    }

    pub fn remember(&mut self, key: String, fingerprint: Fingerprint, reply: JsonReply) {
        self.answers.insert(key, (fingerprint, reply));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn field_order_does_not_change_the_fingerprint() {
        let one = fingerprint(&pairs(&[("a", "1"), ("b", "2")]));
        let other = fingerprint(&pairs(&[("b", "2"), ("a", "1")]));

        assert_eq!(one, other);
    }

    #[test]
    fn moving_bytes_between_key_and_value_changes_it() {
        let one = fingerprint(&pairs(&[("ab", "c")]));
        let other = fingerprint(&pairs(&[("a", "bc")]));

        assert_ne!(one, other);
    }
}
