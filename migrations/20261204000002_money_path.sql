-- Idempotency keys are scoped to the calling client and the route, expire,
-- and remember the headers of the answer they replay. The owner token lets a
-- request release or complete only a key it still holds.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys
    ADD COLUMN client text NOT NULL DEFAULT 'public',
    ADD COLUMN route text NOT NULL DEFAULT 'POST /v1/checkout/sessions',
    ADD COLUMN owner uuid,
    ADD COLUMN expires_at timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    ADD COLUMN response_headers jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE idempotency_keys ALTER COLUMN client DROP DEFAULT, ALTER COLUMN route DROP DEFAULT;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (client, route, key);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Payment state beyond the session's own status: the PaymentIntent that links
-- charges and disputes to the session, refunds, disputes, and the currency's
-- exponent so minor units are shown correctly.
ALTER TABLE checkout_sessions
    ADD COLUMN reference text,                     -- our payments_ref, sent to Stripe as metadata
    ADD COLUMN payment_intent_id text,
    ADD COLUMN currency_exponent smallint CHECK (currency_exponent BETWEEN 0 AND 4),
    ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    ADD COLUMN fully_refunded boolean NOT NULL DEFAULT false,
    ADD COLUMN dispute_id text,
    ADD COLUMN dispute_status text,
    ADD COLUMN dispute_amount bigint,
    ADD COLUMN dispute_event_created timestamptz;
CREATE UNIQUE INDEX checkout_sessions_reference ON checkout_sessions (reference);
CREATE UNIQUE INDEX checkout_sessions_payment_intent ON checkout_sessions (payment_intent_id);

-- The worker retries with backoff: an event waits until next_attempt_at.
ALTER TABLE webhook_events
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error text,
    ADD COLUMN processed_by text;
DROP INDEX webhook_events_pending;
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at) WHERE status = 'pending';
