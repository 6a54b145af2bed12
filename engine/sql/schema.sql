-- durable: the complete current schema.
--
-- Map of the tables
-- -----------------
-- durable.runs        One row per run of a durable function: its input, its state machine
--                     (pending → running → suspended/paused → completed/failed), the lease of the
--                     worker that holds it, and its result or error. `available_at` is the single
--                     "look at me again" time: when a pending run may start, when a suspended run's
--                     earliest timer fires, or when a running run's lease expires. Claiming is one
--                     index scan over it.
-- durable.journal     The append-only history of each run, keyed by (run_id, position). One row per
--                     completed step, sleep (recording its fixed wake time), received event or
--                     timeout, and now/uuid/random call. A trigger rejects UPDATE and DELETE.
-- durable.events      Every event sent with send_event, in send order per (name, key).
-- durable.waits       The event waits a run has registered and not yet satisfied, with the fixed
--                     deadline of each. Deleted once the wait is journaled.
-- durable.schema_migrations  Which numbered migrations have been applied.
--
-- Every transition the engine makes is one function call below (claim, append, await_event,
-- suspend, complete, send_event), so each is one round trip. Lock order everywhere: the event
-- advisory lock for (name, key), then the runs row, then journal/waits rows. Every function reads
-- time from durable.clock(), so a test can move the database's time.

CREATE SCHEMA IF NOT EXISTS durable;

CREATE TABLE durable.runs (
    id                uuid PRIMARY KEY,
    function          text NOT NULL,
    input             jsonb,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'suspended', 'paused',
                                        'completed', 'failed')),
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
    finished_at       timestamptz
);

CREATE INDEX runs_claimable ON durable.runs (available_at)
    WHERE status IN ('pending', 'suspended', 'running');
CREATE INDEX runs_status_created ON durable.runs (status, created_at DESC);

CREATE TABLE durable.journal (
    run_id      uuid NOT NULL REFERENCES durable.runs (id),
    position    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('step', 'sleep', 'event', 'now', 'uuid', 'random')),
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

-- The database's clock, as every function below reads it. Tests move it with
-- `SET durable.fake_now = '<timestamptz>'` (a session setting; unset or empty: the real clock).
-- Declared STABLE so that a claim compares against one reading per statement.
CREATE FUNCTION durable.clock() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('durable.fake_now', true), '')::timestamptz,
                    clock_timestamp());
$$;

-- Serialises send_event and await_event for one (name, key), so that an event is either seen by
-- the waiter's lookup or sees the waiter's registration: never neither.
CREATE FUNCTION durable.lock_event_key(p_name text, p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_name || chr(31) || p_key, 7));
$$;

-- A run row locked FOR SHARE proves the caller still holds the claim `p_attempt`: a claim by
-- another worker updates the row, so it waits for this transaction and bumps the attempt after it.
CREATE FUNCTION durable.hold_claim(p_run uuid, p_attempt integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM durable.runs
     WHERE id = p_run AND attempt = p_attempt AND status = 'running'
       FOR SHARE;
    RETURN FOUND;
END
$$;

CREATE FUNCTION durable.start_run(
    p_id uuid, p_function text, p_input jsonb, p_idempotency_key text, p_trace jsonb
) RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO durable.runs (id, function, input, idempotency_key, trace_context,
                              available_at, event_cursor)
    VALUES (p_id, p_function, p_input, p_idempotency_key, p_trace, durable.clock(),
            (SELECT coalesce(max(e.id), 0) FROM durable.events e))
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        PERFORM pg_notify('durable_work', p_function);
        RETURN QUERY SELECT p_id, true;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT r.id, false FROM durable.runs r
         WHERE r.id = p_id
            OR (p_idempotency_key IS NOT NULL AND r.idempotency_key = p_idempotency_key)
         LIMIT 1;
END
$$;

-- Starts many runs in one statement (App.start_many). Returns one row per given run, in order:
-- its id (an existing run's when the id or idempotency key is taken) and whether it was created.
-- Idempotency keys must be distinct within one call (App.start_many checks). JSON values arrive
-- as text[] here and in append_entries/finish_runs: an array parameter of JSON lists would be
-- read by the driver as a multidimensional array.
CREATE FUNCTION durable.start_runs(
    p_ids uuid[], p_functions text[], p_inputs text[], p_keys text[], p_traces text[]
) RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_cursor bigint := (SELECT coalesce(max(e.id), 0) FROM durable.events e);
BEGIN
    RETURN QUERY
    WITH given AS (
        SELECT g.id, g.function, g.input, g.key, g.trace, g.n
          FROM unnest(p_ids, p_functions, p_inputs, p_keys, p_traces)
               WITH ORDINALITY AS g (id, function, input, key, trace, n)
    ), inserted AS (
        INSERT INTO durable.runs (id, function, input, idempotency_key, trace_context,
                                  available_at, event_cursor)
        SELECT g.id, g.function, g.input::jsonb, g.key, g.trace::jsonb, durable.clock(), v_cursor
          FROM given g ORDER BY g.n
        ON CONFLICT DO NOTHING
        RETURNING id
    )
    SELECT coalesce(i.id, existing.id), i.id IS NOT NULL
      FROM given g
      LEFT JOIN inserted i ON i.id = g.id
      LEFT JOIN LATERAL (
          SELECT r.id FROM durable.runs r
           WHERE i.id IS NULL
             AND (r.id = g.id OR (g.key IS NOT NULL AND r.idempotency_key = g.key))
           LIMIT 1
      ) existing ON true
     ORDER BY g.n;
    PERFORM pg_notify('durable_work', '');
END
$$;

CREATE FUNCTION durable.claim_runs(
    p_functions text[], p_limit integer, p_worker text, p_lease interval
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz)
LANGUAGE sql AS $$
    WITH candidates AS (
        SELECT r.id FROM durable.runs r
         WHERE r.status IN ('pending', 'suspended', 'running')
           AND r.available_at <= durable.clock()
           AND r.function = ANY (p_functions)
         ORDER BY r.available_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE durable.runs r
       SET status = 'running', attempt = r.attempt + 1, lease_owner = p_worker,
           available_at = durable.clock() + p_lease, wakeup = false,
           started_at = coalesce(r.started_at, durable.clock()), updated_at = durable.clock()
      FROM candidates c
     WHERE r.id = c.id
    RETURNING r.id, r.function, r.input, r.attempt, r.trace_context, durable.clock();
$$;

CREATE FUNCTION durable.next_due(p_functions text[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(r.available_at) FROM durable.runs r
     WHERE r.status IN ('pending', 'suspended', 'running')
       AND r.function = ANY (p_functions);
$$;

-- Claims due runs and reports, in the same round trip, when the next one falls due: the claimed
-- runs' rows, then one row with a NULL id carrying the database's now and the next due time
-- (durable.next_due, counted after this claim). A worker calls this on every wake-up.
CREATE FUNCTION durable.claim_due(
    p_functions text[], p_limit integer, p_worker text, p_lease interval
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz, next_due timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
        SELECT c.id, c.function, c.input, c.attempt, c.trace_context, c.db_now,
               NULL::timestamptz
          FROM durable.claim_runs(p_functions, p_limit, p_worker, p_lease) c;
    RETURN QUERY
        SELECT NULL::uuid, NULL::text, NULL::jsonb, NULL::integer, NULL::jsonb, durable.clock(),
               durable.next_due(p_functions);
END
$$;

CREATE FUNCTION durable.renew_leases(
    p_runs uuid[], p_attempts integer[], p_worker text, p_lease interval
) RETURNS SETOF uuid
LANGUAGE sql AS $$
    WITH held AS (
        SELECT r.id FROM durable.runs r
          JOIN unnest(p_runs, p_attempts) AS h (id, attempt)
            ON r.id = h.id AND r.attempt = h.attempt
         WHERE r.status = 'running' AND r.lease_owner = p_worker
         ORDER BY r.id
           FOR UPDATE
    )
    UPDATE durable.runs r
       SET available_at = durable.clock() + p_lease, updated_at = durable.clock()
      FROM held
     WHERE r.id = held.id
    RETURNING r.id;
$$;

-- append_entry and finish_run are kept for workers of the previous release during a rolling
-- deploy; this release writes through append_entries and finish_runs (group commit).
CREATE FUNCTION durable.append_entry(
    p_run uuid, p_attempt integer, p_position text, p_kind text, p_name text,
    p_value jsonb, p_error jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT durable.hold_claim(p_run, p_attempt) THEN
        RETURN false;
    END IF;
    INSERT INTO durable.journal (run_id, position, kind, name, value, error, attempt)
    VALUES (p_run, p_position, p_kind, p_name, p_value, p_error, p_attempt);
    RETURN true;
END
$$;

-- Appends the journal entries of many runs in one statement (group commit: engine._group_commit
-- collects the appends that arrive while the previous statement commits). One row per entry, in
-- order: 'written', 'fenced' (the caller no longer holds the claim) or 'conflict' (the position
-- already holds an entry). Run rows are locked FOR SHARE in id order, like every multi-row lock.
CREATE FUNCTION durable.append_entries(
    p_runs uuid[], p_attempts integer[], p_positions text[], p_kinds text[], p_names text[],
    p_values text[], p_errors text[]
) RETURNS TABLE (outcome text)
LANGUAGE sql AS $$
    WITH given AS (
        SELECT g.* FROM unnest(p_runs, p_attempts, p_positions, p_kinds, p_names, p_values,
                               p_errors)
               WITH ORDINALITY AS g (run_id, attempt, position, kind, name, value, error, n)
    ), held AS (
        SELECT r.id, r.attempt FROM durable.runs r
         WHERE r.id = ANY (p_runs) AND r.status = 'running'
         ORDER BY r.id
           FOR SHARE
    ), inserted AS (
        INSERT INTO durable.journal (run_id, position, kind, name, value, error, attempt)
        SELECT g.run_id, g.position, g.kind, g.name, g.value::jsonb, g.error::jsonb, g.attempt
          FROM given g JOIN held h ON h.id = g.run_id AND h.attempt = g.attempt
         ORDER BY g.n
        ON CONFLICT DO NOTHING
        RETURNING run_id, position
    )
    SELECT CASE
               WHEN i.run_id IS NOT NULL THEN 'written'
               WHEN h.id IS NULL THEN 'fenced'
               ELSE 'conflict'
           END
      FROM given g
      LEFT JOIN held h ON h.id = g.run_id AND h.attempt = g.attempt
      LEFT JOIN inserted i ON i.run_id = g.run_id AND i.position = g.position
     ORDER BY g.n;
$$;

-- Journals a sleep whose wake time is fixed here, once, on the database's clock. Returns NULL
-- when the caller no longer holds the claim.
CREATE FUNCTION durable.append_sleep(
    p_run uuid, p_attempt integer, p_position text, p_name text,
    p_wake_at timestamptz, p_duration interval
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_wake timestamptz := coalesce(p_wake_at, durable.clock() + p_duration);
BEGIN
    IF NOT durable.hold_claim(p_run, p_attempt) THEN
        RETURN NULL;
    END IF;
    INSERT INTO durable.journal (run_id, position, kind, name, value, attempt)
    VALUES (p_run, p_position, 'sleep', p_name,
            jsonb_build_object('wake_at', v_wake), p_attempt);
    RETURN v_wake;
END
$$;

-- Looks for the next event for this run on (name, key). Outcomes:
--   'event'   an event was found and journaled at p_position; payload returned
--   'timeout' the wait's deadline (fixed at its first registration) has passed; journaled
--   'waiting' registered in durable.waits; timeout_at is the fixed deadline (NULL = none)
--   'fenced'  the caller no longer holds the claim; nothing written
-- The next event is the oldest one on (name, key) sent after the run started and after every
-- event this run already received on (name, key).
CREATE FUNCTION durable.await_event(
    p_run uuid, p_attempt integer, p_position text, p_name text, p_key text,
    p_timeout interval
) RETURNS TABLE (outcome text, payload jsonb, timeout_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_after bigint;
    v_event durable.events%ROWTYPE;
    v_deadline timestamptz;
BEGIN
    PERFORM durable.lock_event_key(p_name, p_key);
    IF NOT durable.hold_claim(p_run, p_attempt) THEN
        RETURN QUERY SELECT 'fenced'::text, NULL::jsonb, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT greatest(r.event_cursor,
                    (SELECT max((j.value ->> 'event_id')::bigint) FROM durable.journal j
                      WHERE j.run_id = p_run AND j.kind = 'event' AND j.name = p_name
                        AND j.value ->> 'key' = p_key))
      INTO v_after FROM durable.runs r WHERE r.id = p_run;
    SELECT * INTO v_event FROM durable.events e
     WHERE e.name = p_name AND e.key = p_key AND e.id > v_after
     ORDER BY e.id LIMIT 1;
    IF FOUND THEN
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt)
        VALUES (p_run, p_position, 'event', p_name,
                jsonb_build_object('event_id', v_event.id, 'key', p_key,
                                   'payload', v_event.payload),
                p_attempt);
        DELETE FROM durable.waits w WHERE w.run_id = p_run AND w.position = p_position;
        RETURN QUERY SELECT 'event'::text, v_event.payload, NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO durable.waits (run_id, position, name, key, timeout_at)
    VALUES (p_run, p_position, p_name, p_key, durable.clock() + p_timeout)
    ON CONFLICT DO NOTHING;
    SELECT w.timeout_at INTO v_deadline FROM durable.waits w
     WHERE w.run_id = p_run AND w.position = p_position;
    IF v_deadline IS NOT NULL AND v_deadline <= durable.clock() THEN
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt)
        VALUES (p_run, p_position, 'event', p_name,
                jsonb_build_object('timeout', true, 'key', p_key), p_attempt);
        DELETE FROM durable.waits w WHERE w.run_id = p_run AND w.position = p_position;
        RETURN QUERY SELECT 'timeout'::text, NULL::jsonb, v_deadline;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'waiting'::text, NULL::jsonb, v_deadline;
END
$$;

CREATE FUNCTION durable.send_event(p_name text, p_key text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM durable.lock_event_key(p_name, p_key);
    INSERT INTO durable.events (name, key, payload) VALUES (p_name, p_key, p_payload)
    RETURNING id INTO v_id;
    WITH waiting AS (
        SELECT r.id FROM durable.runs r
         WHERE r.id IN (SELECT w.run_id FROM durable.waits w
                         WHERE w.name = p_name AND w.key = p_key)
         ORDER BY r.id
           FOR UPDATE
    )
    UPDATE durable.runs r
       SET wakeup = true,
           available_at = CASE WHEN r.status = 'suspended' THEN durable.clock() ELSE r.available_at END,
           updated_at = durable.clock()
      FROM waiting
     WHERE r.id = waiting.id;
    IF FOUND THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN v_id;
END
$$;

-- Suspends a running run until p_available_at (NULL: until an event wakes it). An event that
-- arrived while the run was still running (wakeup) makes it available at once.
CREATE FUNCTION durable.suspend_run(p_run uuid, p_attempt integer, p_available_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_woken boolean;
BEGIN
    UPDATE durable.runs r
       SET status = 'suspended', lease_owner = NULL, updated_at = durable.clock(),
           available_at = CASE WHEN r.wakeup THEN durable.clock() ELSE p_available_at END
     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running'
    RETURNING r.wakeup INTO v_woken;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_woken THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN true;
END
$$;

-- Ends a running run in a final or paused state. p_status is 'completed', 'failed' or 'paused'.
CREATE FUNCTION durable.finish_run(
    p_run uuid, p_attempt integer, p_status text, p_result jsonb, p_error jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE durable.runs r
       SET status = p_status, result = p_result, error = p_error, lease_owner = NULL,
           available_at = NULL, updated_at = durable.clock(),
           finished_at = CASE WHEN p_status = 'paused' THEN NULL ELSE durable.clock() END
     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_status <> 'paused' THEN
        DELETE FROM durable.waits w WHERE w.run_id = p_run;
    END IF;
    PERFORM pg_notify('durable_done', p_run::text);
    RETURN true;
END
$$;

-- Ends many runs in one statement (group commit of completions: engine._group_commit). One row
-- per given run, in order: whether it was ended (false when the claim was gone). Run rows are
-- locked in id order.
CREATE FUNCTION durable.finish_runs(
    p_runs uuid[], p_attempts integer[], p_statuses text[], p_results text[], p_errors text[]
) RETURNS TABLE (finished boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_done uuid[];
    v_ended uuid[];
    v_id uuid;
BEGIN
    WITH given AS (
        SELECT g.* FROM unnest(p_runs, p_attempts, p_statuses, p_results, p_errors)
               AS g (run_id, attempt, status, result, error)
    ), locked AS (
        SELECT r.id FROM durable.runs r
          JOIN given g ON g.run_id = r.id AND g.attempt = r.attempt
         WHERE r.status = 'running'
         ORDER BY r.id
           FOR UPDATE OF r
    ), finished AS (
        UPDATE durable.runs r
           SET status = g.status, result = g.result::jsonb, error = g.error::jsonb, lease_owner = NULL,
               available_at = NULL, updated_at = durable.clock(),
               finished_at = CASE WHEN g.status = 'paused' THEN NULL ELSE durable.clock() END
          FROM given g JOIN locked l ON l.id = g.run_id
         WHERE r.id = g.run_id
        RETURNING r.id, g.status
    )
    SELECT coalesce(array_agg(f.id), '{}'),
           coalesce(array_agg(f.id) FILTER (WHERE f.status <> 'paused'), '{}')
      INTO v_done, v_ended
      FROM finished f;
    DELETE FROM durable.waits w WHERE w.run_id = ANY (v_ended);
    FOREACH v_id IN ARRAY v_done LOOP
        PERFORM pg_notify('durable_done', v_id::text);
    END LOOP;
    RETURN QUERY
        SELECT g.run_id = ANY (v_done)
          FROM unnest(p_runs) WITH ORDINALITY AS g (run_id, n)
         ORDER BY g.n;
END
$$;

-- Gives a running run back to the queue at once (graceful shutdown of its worker).
CREATE FUNCTION durable.release_run(p_run uuid, p_attempt integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE durable.runs r
       SET status = 'pending', lease_owner = NULL, available_at = durable.clock(), updated_at = durable.clock()
     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running';
    IF FOUND THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN FOUND;
END
$$;

-- An operator resumes a paused run (after deploying code that matches its journal).
CREATE FUNCTION durable.resume_run(p_run uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE durable.runs r
       SET status = 'pending', error = NULL, available_at = durable.clock(), updated_at = durable.clock()
     WHERE r.id = p_run AND r.status = 'paused';
    IF FOUND THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN FOUND;
END
$$;
