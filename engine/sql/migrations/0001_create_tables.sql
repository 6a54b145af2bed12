-- Migration 0001: the tables of schema durable, with their indexes and the journal's trigger.
--
-- This is the first and only migration: the history before the first release was squashed into
-- it. The functions are not here but in ../functions.sql, applied after the migrations (the one
-- function here is the trigger function the journal's table needs). A migration never changes
-- once applied: engine/_schema.py records its checksum and refuses a database where it differs.
-- A change to a table is a new migration, NNNN_verb_object.sql.
--
-- Map of the tables
-- -----------------
-- durable.runs        One row per run of a durable function: its input, its state machine
--                     (pending → running → suspended/paused → completed/failed/cancelled), the
--                     lease of the worker that holds it, and its result or error. `available_at`
--                     is the single "look at me again" time: when a pending run may start, when a
--                     suspended run's earliest timer fires, or when a running run's lease expires.
--                     Claiming walks one index over (priority, available_at). Flow control lives
--                     here too: the parent of a child run, the concurrency key whose slot the run
--                     holds or awaits (awaiting runs have no available_at: a freed slot is handed
--                     to them), its start rate limit, its cancel request, its start expiry and its
--                     execution deadline (fixed at its first claim).
-- durable.journal     The append-only history of each run, keyed by (run_id, position). One row per
--                     completed step, sleep (recording its fixed wake time), received event or
--                     timeout, now/uuid/random call, child started and child outcome joined. A
--                     trigger rejects UPDATE and DELETE.
-- durable.events      Every event sent with send_event, in send order per (name, key).
-- durable.waits       The event waits a run has registered and not yet satisfied, with the fixed
--                     deadline of each, and the children a run waits for (name 'durable.child').
--                     Deleted once the wait is journaled.
-- durable.rate_limits The declared rate limits: a budget of units per period.
-- durable.rate_grants The units granted per (limit, key) within the last period, and those
--                     reserved for a waiting holder at a future time: a sliding-window log,
--                     pruned as it is read.
-- durable.schedules   Cron schedules: the function, input, cron expression and time zone of each,
--                     its next tick (moved on by the worker that fires it) and its last run.
-- durable.schema_migrations  The migrations applied, each with the checksum of its text.
-- durable.schema_functions   The versions of functions.sql applied, each with its checksum.
--                     These two are not made here: engine/_schema.py creates them before it
--                     applies anything (queries.sql, bootstrap_migrations).
--
-- What changes these tables is in functions.sql: every transition the engine makes is one call
-- of one function there, and its header states the lock order they all follow.

CREATE SCHEMA IF NOT EXISTS durable;

CREATE TABLE durable.runs (
    id                uuid PRIMARY KEY,
    function          text NOT NULL,
    input             jsonb,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'suspended', 'paused',
                                        'completed', 'failed', 'cancelled')),
    idempotency_key   text UNIQUE,
    attempt           integer NOT NULL DEFAULT 0,
    available_at      timestamptz,
    lease_owner       text,
    wakeup            boolean NOT NULL DEFAULT false,
    event_cursor      bigint NOT NULL DEFAULT 0,
    trace_context     jsonb,
    result            jsonb,
    error             jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    priority          integer NOT NULL DEFAULT 0,
    parent_id         uuid,
    concurrency_key   text,
    concurrency_limit integer,
    slot_while_suspended boolean NOT NULL DEFAULT false,
    holds_slot        boolean NOT NULL DEFAULT false,
    awaiting_slot     boolean NOT NULL DEFAULT false,
    rate_limit        text,
    rate_key          text,
    cancel_requested  boolean NOT NULL DEFAULT false,
    run_timeout       interval,
    deadline_at       timestamptz,
    expires_at        timestamptz
);

CREATE INDEX runs_claimable ON durable.runs (priority DESC, available_at)
    WHERE status IN ('pending', 'suspended', 'running');
CREATE INDEX runs_parent ON durable.runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_slot_holders ON durable.runs (concurrency_key) WHERE holds_slot;
CREATE INDEX runs_awaiting_slot ON durable.runs (concurrency_key, priority DESC, created_at)
    WHERE awaiting_slot;
CREATE INDEX runs_active_by_key ON durable.runs (concurrency_key, created_at)
    WHERE concurrency_key IS NOT NULL
      AND status IN ('pending', 'running', 'suspended', 'paused');
CREATE INDEX runs_status_created ON durable.runs (status, created_at DESC);

CREATE TABLE durable.journal (
    run_id      uuid NOT NULL REFERENCES durable.runs (id),
    position    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('step', 'sleep', 'event', 'now', 'uuid', 'random',
                                          'start', 'join')),
    name        text NOT NULL,
    value       jsonb,
    error       jsonb,
    attempt     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, position)
);

CREATE FUNCTION durable.reject_journal_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'durable.journal is append-only: % of run % position % rejected',
        TG_OP, OLD.run_id, OLD.position
        USING ERRCODE = 'DU001',
              HINT = 'Journal rows are never changed; retention drops whole partitions.';
END
$$;

CREATE TRIGGER journal_append_only
    BEFORE UPDATE OR DELETE ON durable.journal
    FOR EACH ROW EXECUTE FUNCTION durable.reject_journal_change();

CREATE TABLE durable.events (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    key         text NOT NULL DEFAULT '',
    payload     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_name_key ON durable.events (name, key, id);

CREATE TABLE durable.waits (
    run_id      uuid NOT NULL REFERENCES durable.runs (id),
    position    text NOT NULL,
    name        text NOT NULL,
    key         text NOT NULL,
    timeout_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, position)
);

CREATE INDEX waits_name_key ON durable.waits (name, key);

CREATE TABLE durable.rate_limits (
    name        text PRIMARY KEY,
    budget      integer NOT NULL CHECK (budget > 0),
    period      interval NOT NULL CHECK (period > interval '0'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE durable.rate_grants (
    name        text NOT NULL,
    key         text NOT NULL,
    granted_at  timestamptz NOT NULL,
    weight      integer NOT NULL,
    holder      text NOT NULL,
    used        boolean NOT NULL
);

CREATE INDEX rate_grants_window ON durable.rate_grants (name, key, granted_at);
CREATE INDEX rate_grants_holder ON durable.rate_grants (name, key, holder) WHERE NOT used;

CREATE TABLE durable.schedules (
    name         text PRIMARY KEY,
    function     text NOT NULL,
    cron         text NOT NULL,
    timezone     text NOT NULL,
    input        jsonb,
    catch_up     text NOT NULL CHECK (catch_up IN ('latest', 'all')),
    next_tick    timestamptz NOT NULL,
    last_tick    timestamptz,
    last_run_id  uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
