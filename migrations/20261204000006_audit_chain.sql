-- The audit trail, complete: context of each decision, a hash chain, and
-- export cursors.
--
-- Records are inserted inside the transaction of the decision they describe
-- (the outbox). A single chainer then gives committed records a dense,
-- gapless `chain_seq` and a hash over the previous hash and the record, in
-- commit order: chaining at insert time would serialise every decision on one
-- chain-head row. `chain_seq` is what exporters send and receivers use to
-- drop duplicates and notice gaps.
ALTER TABLE audit_records
    ADD COLUMN request_id  text,
    ADD COLUMN trace_id    text,
    ADD COLUMN purpose     text,
    ADD COLUMN consent_ref text,
    -- The inserting transaction: a record may be chained once every
    -- transaction that could still insert before it has finished.
    ADD COLUMN writer_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ADD COLUMN chain_seq   bigint UNIQUE,
    ADD COLUMN hash        bytea CHECK (hash IS NULL OR length(hash) = 32),
    ADD CONSTRAINT audit_chained_together CHECK ((chain_seq IS NULL) = (hash IS NULL));
CREATE INDEX audit_records_unchained ON audit_records (seq) WHERE chain_seq IS NULL;

-- Append-only, except that the chainer may seal a record once: set its
-- chain_seq and hash, and nothing else.
CREATE OR REPLACE FUNCTION audit_records_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.chain_seq IS NULL AND NEW.chain_seq IS NOT NULL
       AND (to_jsonb(OLD) - 'chain_seq' - 'hash') = (to_jsonb(NEW) - 'chain_seq' - 'hash') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit records are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- Where each SIEM sink has got to, in chain_seq.
CREATE TABLE audit_export_cursors (
    sink        text PRIMARY KEY,
    last_seq    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    last_error  text
);
