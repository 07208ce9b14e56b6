-- Operators can discard a dead letter with a reason. Nothing is deleted: the
-- row, its payload and its replay history stay for the audit trail.
ALTER TABLE dead_letters
    ADD COLUMN discarded_at   timestamptz,
    ADD COLUMN discard_reason text;
-- The foundation's constraints were unnamed; these are the names Postgres gave them.
ALTER TABLE dead_letters
    DROP CONSTRAINT dead_letters_status_check,
    DROP CONSTRAINT dead_letters_check1;
ALTER TABLE dead_letters
    ADD CONSTRAINT dead_letters_status_check
        CHECK (status IN ('open', 'resolved', 'discarded')),
    ADD CONSTRAINT dead_letters_resolved_when
        CHECK ((status = 'resolved') = (resolved_at IS NOT NULL)),
    ADD CONSTRAINT dead_letters_discarded_when
        CHECK ((status = 'discarded') = (discarded_at IS NOT NULL)),
    ADD CONSTRAINT dead_letters_discarded_why
        CHECK ((discarded_at IS NULL) = (discard_reason IS NULL)),
    ADD CONSTRAINT dead_letters_discard_reason_length
        CHECK (char_length(discard_reason) BETWEEN 1 AND 500);

-- A bulk replay: the filter an operator gave, and its progress, kept in the
-- database so any process can read it and another runner can finish it.
CREATE TABLE replay_jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status              text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'completed')),
    -- 'background': any service replica runs it. 'inline': the process that
    -- created it (the CLI) runs it; the service adopts it only if that process
    -- never claimed it or stopped sending heartbeats.
    runner              text NOT NULL CHECK (runner IN ('background', 'inline')),
    -- The filter as given; null means not filtered on. All null means every
    -- open entry, which the caller had to ask for explicitly.
    filter_reason       text
        CHECK (filter_reason IN ('malformed_payload', 'not_an_event', 'apply_failed')),
    filter_event_type   text CHECK (char_length(filter_event_type) BETWEEN 1 AND 255),
    filter_created_from timestamptz,               -- inclusive
    filter_created_to   timestamptz,               -- exclusive
    total               bigint NOT NULL CHECK (total >= 0),
    processed           bigint NOT NULL DEFAULT 0,
    resolved            bigint NOT NULL DEFAULT 0 CHECK (resolved >= 0),
    failed              bigint NOT NULL DEFAULT 0 CHECK (failed >= 0),
    skipped             bigint NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    -- Bumped by every claim. A runner writes progress only while the number
    -- is still the one its claim returned, so a runner that was presumed dead
    -- and taken over cannot write over its successor.
    claims              integer NOT NULL DEFAULT 0 CHECK (claims >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    heartbeat_at        timestamptz,
    finished_at         timestamptz,
    CHECK (filter_created_from < filter_created_to),
    CHECK (processed = resolved + failed + skipped),
    CHECK (processed <= total),
    CHECK ((status = 'completed') = (finished_at IS NOT NULL)),
    CHECK (status <> 'completed' OR processed = total),
    CHECK (status <> 'running' OR (started_at IS NOT NULL AND heartbeat_at IS NOT NULL))
);
-- What a runner looks for: jobs not yet completed, oldest first.
CREATE INDEX replay_jobs_unfinished ON replay_jobs (id) WHERE status <> 'completed';

-- The dead letters a job covers, fixed when the job is created, and what
-- replaying each came to. Items are processed in dead letter id order.
CREATE TABLE replay_job_items (
    job_id         bigint NOT NULL REFERENCES replay_jobs (id),
    dead_letter_id bigint NOT NULL REFERENCES dead_letters (id),
    outcome        text CHECK (outcome IN ('resolved', 'failed', 'skipped')),
    detail         text,
    processed_at   timestamptz,
    PRIMARY KEY (job_id, dead_letter_id),
    CHECK ((outcome IS NULL) = (processed_at IS NULL)),
    CHECK ((outcome IS NULL) = (detail IS NULL))
);
-- Where a runner resumes: the first item without an outcome.
CREATE INDEX replay_job_items_pending ON replay_job_items (job_id, dead_letter_id)
    WHERE outcome IS NULL;
-- Which jobs covered an entry.
CREATE INDEX replay_job_items_by_entry ON replay_job_items (dead_letter_id);
