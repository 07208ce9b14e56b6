-- API clients: the shop backends that call the public API. Only a sha256 of
-- each key is stored; the key itself is shown once, when it is created.
-- A canary key is a trap: it is planted where a leak would expose it, and any
-- use of it is refused like a wrong key and raised as a critical event.
CREATE TABLE api_clients (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    key_hash   bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    canary     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
-- One live key per name; a revoked client may be issued again under its name.
CREATE UNIQUE INDEX api_clients_live_name ON api_clients (name) WHERE revoked_at IS NULL;

-- Operator tokens for the admin API, and time-bound break-glass tokens.
CREATE TABLE admin_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operator     text NOT NULL CHECK (operator ~ '^[a-z0-9][a-z0-9._@-]{0,62}$'),
    token_hash   bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    kind         text NOT NULL CHECK (kind IN ('operator', 'break_glass')),
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    uses         bigint NOT NULL DEFAULT 0,
    -- A break-glass token always ends by itself, and says why it exists.
    CHECK (kind <> 'break_glass' OR (expires_at IS NOT NULL AND reason IS NOT NULL))
);

-- Who created a session, so a shopper's browser token reads only its own.
ALTER TABLE checkout_sessions ADD COLUMN created_by text;

-- Security decisions, append-only: the database refuses to change or remove
-- a record, whatever the application does. Ids only: no secret, card data or
-- personal detail is ever written here.
CREATE TABLE audit_records (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    resource    text,
    outcome     text NOT NULL CHECK (outcome IN ('allowed', 'refused', 'done', 'failed')),
    severity    text NOT NULL DEFAULT 'info' CHECK (severity IN ('info', 'warning', 'critical')),
    reason      text,
    source_addr text
);

CREATE FUNCTION audit_records_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_records_append_only
    BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_are_append_only();
CREATE TRIGGER audit_records_no_truncate
    BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_are_append_only();
