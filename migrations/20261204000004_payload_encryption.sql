-- Stored payloads are encrypted at rest (envelope encryption, src/crypto) and
-- purged after a retention period, while the rows and their metadata stay.
--
-- Nothing had shipped to production before this migration, so no stored
-- plaintext needs encrypting. A development database may still hold rows
-- from earlier builds: their plaintext payloads are purged below rather than
-- kept unencrypted, and such rows read as purged from now on.

-- Data keys, each wrapped (AES-256-GCM: nonce, key, tag) by the
-- key-encryption key named by kek_id. The KEK itself is never stored here.
CREATE TABLE data_keys (
    id           uuid PRIMARY KEY,
    kek_id       text NOT NULL CHECK (char_length(kek_id) BETWEEN 1 AND 64),
    wrapped      bytea NOT NULL CHECK (length(wrapped) = 12 + 32 + 16),
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz                       -- last moved under another KEK
);

-- Each payload column holds format byte, nonce, ciphertext and tag, sealed
-- under the data key beside it, with the row's identity as associated data.
-- Ciphertext does not compress, so Postgres is told not to try (EXTERNAL:
-- out of line when large, never compressed). A row is purged by nulling the
-- payload and its key and recording when.
ALTER TABLE webhook_events
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN payload_key_id uuid REFERENCES data_keys (id),
    ADD COLUMN payload_purged_at timestamptz;
UPDATE webhook_events SET payload = NULL, payload_purged_at = now();
ALTER TABLE webhook_events
    ALTER COLUMN payload SET STORAGE EXTERNAL,
    -- A build that wrote plaintext (no key) is refused here during a rolling
    -- deploy, and Stripe retries the delivery against a newer replica.
    ADD CONSTRAINT webhook_events_payload_sealed
        CHECK ((payload IS NULL) = (payload_key_id IS NULL)),
    ADD CONSTRAINT webhook_events_payload_purged
        CHECK ((payload IS NULL) = (payload_purged_at IS NOT NULL));
-- What the retention sweep scans: events that still hold a payload, oldest first.
CREATE INDEX webhook_events_payload_held ON webhook_events (received_at)
    WHERE payload IS NOT NULL;

-- An apply_failed entry never held a payload (its event does); a purged
-- entry no longer does. Only an entry that never had one is inconsistent.
ALTER TABLE dead_letters
    ADD COLUMN payload_key_id uuid REFERENCES data_keys (id),
    ADD COLUMN payload_purged_at timestamptz;
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_check;
UPDATE dead_letters SET payload = NULL, payload_purged_at = now() WHERE payload IS NOT NULL;
ALTER TABLE dead_letters
    ALTER COLUMN payload SET STORAGE EXTERNAL,
    ADD CONSTRAINT dead_letters_event_or_payload
        CHECK (event_id IS NOT NULL OR payload IS NOT NULL OR payload_purged_at IS NOT NULL),
    ADD CONSTRAINT dead_letters_payload_sealed
        CHECK ((payload IS NULL) = (payload_key_id IS NULL)),
    ADD CONSTRAINT dead_letters_payload_purged
        CHECK (payload_purged_at IS NULL OR payload IS NULL);

-- Forensic prefixes are sealed too, and purged (nulled) after the retention.
ALTER TABLE rejected_deliveries
    ALTER COLUMN body_prefix DROP NOT NULL,
    ADD COLUMN body_key_id uuid REFERENCES data_keys (id);
UPDATE rejected_deliveries SET body_prefix = NULL;
ALTER TABLE rejected_deliveries
    ALTER COLUMN body_prefix SET STORAGE EXTERNAL,
    ADD CONSTRAINT rejected_deliveries_body_sealed
        CHECK ((body_prefix IS NULL) = (body_key_id IS NULL));
