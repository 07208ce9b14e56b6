-- Checkout sessions this service created, and the payment state that Stripe's
-- events move them through.
CREATE TABLE checkout_sessions (
    id                  text PRIMARY KEY,          -- Stripe's cs_ id
    status              text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'awaiting_payment', 'paid', 'payment_failed', 'expired')),
    payment_status      text,                      -- Stripe's own field, as last seen
    url                 text,
    amount_total        bigint,                    -- minor units of currency
    currency            text,
    client_reference_id text,
    livemode            boolean NOT NULL,
    expires_at          timestamptz NOT NULL,
    -- The `created` of the newest event applied, so a late event cannot undo a newer one.
    last_event_created  timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per client Idempotency-Key on the public API. The row is taken before
-- Stripe is called, so two concurrent requests cannot both reach Stripe.
CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY,
    fingerprint     bytea NOT NULL,                -- sha256 of method, path, canonical body
    state           text NOT NULL CHECK (state IN ('in_progress', 'completed')),
    -- While in progress, the owner holds the key until then; a crashed owner's
    -- key is taken over after it passes.
    locked_until    timestamptz NOT NULL,
    response_status smallint,
    response_body   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    CHECK ((state = 'completed') = (response_status IS NOT NULL AND response_body IS NOT NULL))
);

-- Verified Stripe events, stored before Stripe gets its 2xx.
CREATE TABLE webhook_events (
    id           text PRIMARY KEY,                 -- Stripe's evt_ id: duplicates stop here
    type         text NOT NULL,
    api_version  text,
    livemode     boolean NOT NULL,
    account      text,                             -- Connect account, when sent on its behalf
    created      timestamptz NOT NULL,             -- when Stripe created the event
    payload      bytea NOT NULL,                   -- the exact bytes that were signed
    status       text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processed', 'ignored', 'dead_lettered')),
    detail       text,                             -- why it was ignored or what it changed
    attempts     integer NOT NULL DEFAULT 0,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);
CREATE INDEX webhook_events_pending ON webhook_events (received_at) WHERE status = 'pending';

-- Signatures already accepted, so the same signed delivery cannot be played
-- twice. Rows older than the timestamp window are useless (such a delivery is
-- refused as too old) and are swept.
CREATE TABLE webhook_nonces (
    signature   bytea PRIMARY KEY,                 -- the v1 HMAC that matched
    signed_at   timestamptz NOT NULL,              -- the delivery's t=
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_nonces_signed_at ON webhook_nonces (signed_at);

-- Authentic input that could not be stored as an event or applied to payment state.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    text REFERENCES webhook_events (id),  -- null when the bytes never parsed as an event
    event_type  text,
    reason      text NOT NULL
        CHECK (reason IN ('malformed_payload', 'not_an_event', 'apply_failed')),
    detail      text NOT NULL,
    -- The raw bytes of a delivery that never became an event. An event that
    -- failed to apply keeps its bytes in webhook_events only.
    payload     bytea,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CHECK (event_id IS NOT NULL OR payload IS NOT NULL),
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE INDEX dead_letters_open ON dead_letters (created_at) WHERE status = 'open';
-- At most one open entry per stored event.
CREATE UNIQUE INDEX dead_letters_one_open_per_event ON dead_letters (event_id)
    WHERE status = 'open' AND event_id IS NOT NULL;

-- Every replay of a dead letter and what came of it.
CREATE TABLE dead_letter_attempts (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dead_letter_id bigint NOT NULL REFERENCES dead_letters (id),
    attempted_at   timestamptz NOT NULL DEFAULT now(),
    outcome        text NOT NULL CHECK (outcome IN ('resolved', 'failed')),
    detail         text NOT NULL
);
CREATE INDEX dead_letter_attempts_by_entry ON dead_letter_attempts (dead_letter_id, id);

-- Deliveries refused at the door (bad signature, stale timestamp, replay), kept
-- for forensics only. They never enter the event store and cannot be replayed.
-- Bounded: the body is cut to a prefix and old rows are pruned past a row cap.
CREATE TABLE rejected_deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,
    source_addr   text,
    signature_hdr text,                            -- cut to 512 bytes
    body_len      integer NOT NULL,
    body_prefix   bytea NOT NULL                   -- cut to 1 KiB
);
