-- Migration 0007: flow control. Priorities, concurrency slots, rate limits, child runs,
-- cancellation, start and execution timeouts, delayed starts.

ALTER TABLE durable.runs
    ADD COLUMN priority             integer NOT NULL DEFAULT 0,
    ADD COLUMN parent_id            uuid,
    ADD COLUMN concurrency_key      text,
    ADD COLUMN concurrency_limit    integer,
    ADD COLUMN slot_while_suspended boolean NOT NULL DEFAULT false,
    ADD COLUMN holds_slot           boolean NOT NULL DEFAULT false,
    ADD COLUMN awaiting_slot        boolean NOT NULL DEFAULT false,
    ADD COLUMN rate_limit           text,
    ADD COLUMN rate_key             text,
    ADD COLUMN cancel_requested     boolean NOT NULL DEFAULT false,
    ADD COLUMN run_timeout          interval,
    ADD COLUMN deadline_at          timestamptz,
    ADD COLUMN expires_at           timestamptz;

ALTER TABLE durable.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE durable.runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('pending', 'running', 'suspended', 'paused',
                      'completed', 'failed', 'cancelled'));

ALTER TABLE durable.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE durable.journal ADD CONSTRAINT journal_kind_check
    CHECK (kind IN ('step', 'sleep', 'event', 'now', 'uuid', 'random', 'start', 'join'));

DROP INDEX durable.runs_claimable;
CREATE INDEX runs_claimable ON durable.runs (priority DESC, available_at)
    WHERE status IN ('pending', 'suspended', 'running');
CREATE INDEX runs_parent ON durable.runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_slot_holders ON durable.runs (concurrency_key) WHERE holds_slot;
CREATE INDEX runs_awaiting_slot ON durable.runs (concurrency_key, priority DESC, created_at)
    WHERE awaiting_slot;
CREATE INDEX runs_active_by_key ON durable.runs (concurrency_key, created_at)
    WHERE concurrency_key IS NOT NULL
      AND status IN ('pending', 'running', 'suspended', 'paused');

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

DROP FUNCTION durable.claim_due(text[], integer, text, interval);
DROP FUNCTION durable.claim_runs(text[], integer, text, interval);
DROP FUNCTION durable.next_due(text[]);
DROP FUNCTION durable.suspend_run(uuid, integer, timestamptz);
DROP FUNCTION durable.finish_runs(uuid[], integer[], text[], text[], text[]);
DROP FUNCTION durable.finish_run(uuid, integer, text, jsonb, jsonb);
-- The error a cancelled run ends with (RunHandle.result raises RunCancelled from it).
CREATE FUNCTION durable.cancelled_error(p_reason text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'RunCancelled', 'message', p_reason, 'module', 'durable');
$$;

-- Serialises the slot accounting of one concurrency key (durable.take_slot,
-- durable.hand_over_slots, the strategies of durable.create_runs).
CREATE FUNCTION durable.lock_slot_key(p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_key, 11));
$$;

-- Gives run p_run (row locked by the caller) one of the p_limit slots of its key, if one is free.
CREATE FUNCTION durable.take_slot(p_run uuid, p_key text, p_limit integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM durable.lock_slot_key(p_key);
    IF (SELECT count(*) FROM durable.runs r WHERE r.concurrency_key = p_key AND r.holds_slot)
       >= p_limit THEN
        RETURN false;
    END IF;
    UPDATE durable.runs r SET holds_slot = true, awaiting_slot = false WHERE r.id = p_run;
    RETURN true;
END
$$;

-- Hands the free slots of each key to the runs awaiting one: highest priority first, then the
-- oldest. Called by every transition that frees a slot, in the same transaction, so a run never
-- awaits a slot that is free. A run locked by a claim meanwhile is left to that claim, which
-- takes the slot itself.
CREATE FUNCTION durable.hand_over_slots(p_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_key text;
    v_next record;
    v_admitted boolean := false;
BEGIN
    FOR v_key IN SELECT DISTINCT k.key FROM unnest(p_keys) AS k (key)
                  WHERE k.key IS NOT NULL ORDER BY k.key LOOP
        PERFORM durable.lock_slot_key(v_key);
        LOOP
            SELECT r.id, r.concurrency_limit INTO v_next FROM durable.runs r
             WHERE r.concurrency_key = v_key AND r.awaiting_slot
             ORDER BY r.priority DESC, r.created_at, r.id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
            EXIT WHEN NOT FOUND;
            EXIT WHEN (SELECT count(*) FROM durable.runs r
                        WHERE r.concurrency_key = v_key AND r.holds_slot)
                      >= v_next.concurrency_limit;
            UPDATE durable.runs r
               SET holds_slot = true, awaiting_slot = false, available_at = durable.clock(),
                   updated_at = durable.clock()
             WHERE r.id = v_next.id;
            v_admitted := true;
        END LOOP;
    END LOOP;
    IF v_admitted THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
END
$$;

-- Wakes the parents of runs that just ended: a running parent finds out before it suspends
-- (wakeup), a suspended one waiting for any of them is due at once. Parents are locked first and
-- checked after, so a wait registered just before the lock is seen.
CREATE FUNCTION durable.wake_parents(p_children uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_parents uuid[];
BEGIN
    SELECT array_agg(p.id) INTO v_parents FROM (
        SELECT r.id FROM durable.runs r
         WHERE r.id IN (SELECT c.parent_id FROM durable.runs c WHERE c.id = ANY (p_children))
           AND r.status IN ('running', 'suspended')
         ORDER BY r.id
           FOR UPDATE
    ) p;
    IF v_parents IS NULL THEN
        RETURN;
    END IF;
    UPDATE durable.runs r
       SET wakeup = true, available_at = durable.clock(), updated_at = durable.clock()
     WHERE r.id = ANY (v_parents) AND r.status = 'suspended'
       AND EXISTS (SELECT 1 FROM durable.waits w
                    WHERE w.run_id = r.id AND w.name = 'durable.child'
                      AND w.key = ANY (p_children::text[]));
    IF FOUND THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    UPDATE durable.runs r SET wakeup = true
     WHERE r.id = ANY (v_parents) AND r.status = 'running';
END
$$;

-- Ends a run that no worker is executing (cancelled while pending, suspended or paused; expired
-- before its start; past its deadline when claimed): frees its slot, drops its waits, wakes a
-- waiting parent. The caller holds the run's row lock.
CREATE FUNCTION durable.end_run(p_run uuid, p_status text, p_error jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_key text;
BEGIN
    SELECT r.concurrency_key INTO v_key FROM durable.runs r WHERE r.id = p_run AND r.holds_slot;
    UPDATE durable.runs r
       SET status = p_status, lease_owner = NULL, available_at = NULL,
           error = CASE WHEN r.cancel_requested THEN coalesce(r.error, p_error) ELSE p_error END,
           holds_slot = false, awaiting_slot = false, cancel_requested = false,
           updated_at = durable.clock(), finished_at = durable.clock()
     WHERE r.id = p_run;
    DELETE FROM durable.waits w WHERE w.run_id = p_run;
    PERFORM durable.hand_over_slots(ARRAY[v_key]);
    PERFORM durable.wake_parents(ARRAY[p_run]);
    PERFORM pg_notify('durable_done', p_run::text);
END
$$;

-- The runs given to durable.create_runs, one row per JSON object, in order (n). A run starts at
-- available_at, else after delay seconds, else now; it expires start_timeout seconds after that.
CREATE FUNCTION durable.given_runs(p_runs jsonb, p_now timestamptz)
RETURNS TABLE (n bigint, id uuid, function text, input jsonb, idempotency_key text,
               trace_context jsonb, priority integer, available_at timestamptz,
               expires_at timestamptz, run_timeout interval, parent_id uuid,
               concurrency_key text, concurrency_limit integer, strategy text,
               slot_while_suspended boolean, rate_limit text, rate_key text)
LANGUAGE sql STABLE AS $$
    SELECT e.n, (e.doc ->> 'id')::uuid, e.doc ->> 'function', e.doc -> 'input',
           e.doc ->> 'idempotency_key', e.doc -> 'trace_context',
           coalesce((e.doc ->> 'priority')::integer, 0), s.at,
           s.at + make_interval(secs => (e.doc ->> 'start_timeout')::double precision),
           make_interval(secs => (e.doc ->> 'run_timeout')::double precision),
           (e.doc ->> 'parent_id')::uuid, e.doc ->> 'concurrency_key',
           (e.doc ->> 'concurrency_limit')::integer, e.doc ->> 'concurrency_strategy',
           coalesce((e.doc ->> 'slot_while_suspended')::boolean, false),
           e.doc ->> 'rate_limit', coalesce(e.doc ->> 'rate_key', '')
      FROM jsonb_array_elements(p_runs) WITH ORDINALITY AS e (doc, n),
           LATERAL (SELECT coalesce(
                               (e.doc ->> 'available_at')::timestamptz,
                               p_now + make_interval(secs => (e.doc ->> 'delay')::double precision),
                               p_now) AS at) s;
$$;

-- Starts runs (App.start, App.start_many, Context.start): one JSON object per run with its id,
-- function, input, idempotency_key, trace_context and options (priority, available_at, delay,
-- start_timeout and run_timeout in seconds, parent_id, concurrency_key, concurrency_limit,
-- concurrency_strategy, slot_while_suspended, rate_limit, rate_key; absent ones take their
-- defaults). Returns one row per given run, in order: its id (an existing run's when the id or
-- idempotency key is taken) and whether it was created. The strategies act on the active runs of the same concurrency key:
-- 'cancel_newest' cancels the new run when its key is already at its limit;
-- 'cancel_in_progress' cancels the oldest runs of the key so that the newest stay within it.
CREATE FUNCTION durable.create_runs(p_runs jsonb) RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_cursor bigint := (SELECT coalesce(max(e.id), 0) FROM durable.events e);
    v_now timestamptz := durable.clock();
    v_ids uuid[];
    v_new record;
    v_old uuid;
BEGIN
    WITH inserted AS (
        INSERT INTO durable.runs (id, function, input, idempotency_key, trace_context,
                                  available_at, event_cursor, priority, expires_at, run_timeout,
                                  parent_id, concurrency_key, concurrency_limit,
                                  slot_while_suspended, rate_limit, rate_key)
        SELECT g.id, g.function, g.input, g.idempotency_key, g.trace_context, g.available_at,
               v_cursor, g.priority, g.expires_at, g.run_timeout, g.parent_id,
               g.concurrency_key, g.concurrency_limit, g.slot_while_suspended, g.rate_limit,
               g.rate_key
          FROM durable.given_runs(p_runs, v_now) g ORDER BY g.n
        ON CONFLICT DO NOTHING
        RETURNING durable.runs.id
    )
    SELECT coalesce(array_agg(i.id), '{}') INTO v_ids FROM inserted i;
    FOR v_new IN SELECT g.id, g.concurrency_key AS key, g.concurrency_limit AS lim, g.strategy
                   FROM durable.given_runs(p_runs, v_now) g
                  WHERE p_runs @? '$[*].concurrency_strategy'
                    AND g.strategy IN ('cancel_newest', 'cancel_in_progress')
                    AND g.id = ANY (v_ids)
                  ORDER BY g.n LOOP
        PERFORM durable.lock_slot_key(v_new.key);
        IF v_new.strategy = 'cancel_newest' THEN
            IF (SELECT count(*) FROM durable.runs r
                 WHERE r.concurrency_key = v_new.key AND r.id <> v_new.id
                   AND r.status IN ('pending', 'running', 'suspended', 'paused')) >= v_new.lim THEN
                PERFORM durable.end_run(v_new.id, 'cancelled', durable.cancelled_error(
                    'cancel-newest: concurrency key ' || v_new.key || ' already has '
                    || v_new.lim || ' active run(s)'));
            END IF;
        ELSE
            FOR v_old IN SELECT r.id FROM durable.runs r
                          WHERE r.concurrency_key = v_new.key AND r.id <> v_new.id
                            AND r.status IN ('pending', 'running', 'suspended', 'paused')
                          ORDER BY r.created_at DESC, r.id DESC
                         OFFSET v_new.lim - 1 LOOP
                PERFORM durable.cancel_run(v_old, 'cancel-in-progress: run ' || v_new.id
                                                  || ' replaced it');
            END LOOP;
        END IF;
    END LOOP;
    RETURN QUERY
    SELECT coalesce(i.id, existing.id), i.id IS NOT NULL
      FROM durable.given_runs(p_runs, v_now) g
      LEFT JOIN unnest(v_ids) AS i (id) ON i.id = g.id
      LEFT JOIN LATERAL (
          SELECT r.id FROM durable.runs r
           WHERE i.id IS NULL
             AND (r.id = g.id OR (g.idempotency_key IS NOT NULL
                                  AND r.idempotency_key = g.idempotency_key))
           LIMIT 1
      ) existing ON true
     ORDER BY g.n;
    PERFORM pg_notify('durable_work', '');
END
$$;

-- Cancels a run and its unfinished descendants. A run no worker is executing ends as cancelled
-- at once; a running one is marked (cancel_requested, with the reason in error until it ends)
-- and its worker is told on channel
-- durable_cancel: it cancels the run's tasks and ends it as cancelled (a claim of a marked run
-- ends it too, should its worker have died). Returns 'cancelled', 'requested', 'finished' (it
-- had already ended) or 'not_found'.
CREATE FUNCTION durable.cancel_run(p_run uuid, p_reason text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_ids uuid[];
    v_id uuid;
BEGIN
    SELECT r.status INTO v_status FROM durable.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RETURN 'finished';
    END IF;
    WITH RECURSIVE tree (id) AS (
        SELECT p_run
        UNION
        SELECT c.id FROM durable.runs c JOIN tree t ON c.parent_id = t.id
    )
    SELECT array_agg(l.id) INTO v_ids FROM (
        SELECT r.id FROM durable.runs r
         WHERE r.id IN (SELECT t.id FROM tree t)
           AND r.status NOT IN ('completed', 'failed', 'cancelled')
         ORDER BY r.id
           FOR UPDATE
    ) l;
    FOREACH v_id IN ARRAY coalesce(v_ids, '{}') LOOP
        SELECT r.status INTO v_status FROM durable.runs r WHERE r.id = v_id;
        IF v_status = 'running' THEN
            UPDATE durable.runs r
               SET cancel_requested = true, updated_at = durable.clock(),
                   error = durable.cancelled_error(
                       CASE WHEN v_id = p_run THEN p_reason
                            ELSE 'its parent run was cancelled (' || p_reason || ')' END)
             WHERE r.id = v_id;
            PERFORM pg_notify('durable_cancel', v_id::text);
        ELSIF v_status NOT IN ('completed', 'failed', 'cancelled') THEN
            PERFORM durable.end_run(v_id, 'cancelled', durable.cancelled_error(
                CASE WHEN v_id = p_run THEN p_reason
                     ELSE 'its parent run was cancelled (' || p_reason || ')' END));
        END IF;
    END LOOP;
    SELECT r.status INTO v_status FROM durable.runs r WHERE r.id = p_run;
    RETURN CASE WHEN v_status = 'cancelled' THEN 'cancelled'
                WHEN v_status = 'running' THEN 'requested'
                ELSE 'finished' END;
END
$$;

-- Declares (or redeclares) a rate limit: at most p_budget units granted in any window of length
-- p_period, per key.
CREATE FUNCTION durable.define_rate_limit(p_name text, p_budget integer, p_period interval)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO durable.rate_limits (name, budget, period) VALUES (p_name, p_budget, p_period)
    ON CONFLICT (name) DO UPDATE
       SET budget = excluded.budget, period = excluded.period, updated_at = now();
$$;

-- Takes p_weight units of rate limit p_name for p_key on behalf of p_holder: a sliding-window
-- log. Units are granted at the earliest time t, no earlier than now (the database's clock, read
-- under the key's lock) nor than the latest grant, at which the units granted in
-- (t - period, t] plus p_weight stay within the budget. Granting at the latest grant or later
-- means every window that holds t was checked, so no window of one period ever holds more than
-- the budget. When t is now, NULL is returned: go. Otherwise the units are reserved for p_holder
-- at t and t is returned: the holder waits until then and asks again, and its reservation is
-- then handed to it (NULL) instead of a second grant. Waiters are so served in turn, each woken
-- once.
CREATE FUNCTION durable.take_rate(
    p_name text, p_key text, p_weight integer, p_holder text
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_limit durable.rate_limits%ROWTYPE;
    v_now timestamptz;
    v_used bigint;
    v_at timestamptz;
    v_grant record;
BEGIN
    SELECT * INTO v_limit FROM durable.rate_limits l WHERE l.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rate limit % is not declared', p_name
            USING ERRCODE = 'DU002',
                  HINT = 'Declare it with app.rate_limit(name, limit, period).';
    END IF;
    IF p_weight > v_limit.budget THEN
        RAISE EXCEPTION 'weight % exceeds the budget % of rate limit %',
            p_weight, v_limit.budget, p_name
            USING ERRCODE = 'DU003';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_name || chr(31) || p_key, 13));
    v_now := durable.clock();
    SELECT g.granted_at INTO v_at FROM durable.rate_grants g
     WHERE g.name = p_name AND g.key = p_key AND g.holder = p_holder AND NOT g.used;
    IF FOUND THEN
        IF v_at > v_now THEN
            RETURN v_at;
        END IF;
        UPDATE durable.rate_grants g SET used = true
         WHERE g.name = p_name AND g.key = p_key AND g.holder = p_holder AND NOT g.used;
        RETURN NULL;
    END IF;
    DELETE FROM durable.rate_grants g
     WHERE g.name = p_name AND g.key = p_key AND g.granted_at <= v_now - v_limit.period;
    SELECT coalesce(sum(g.weight), 0), max(g.granted_at) INTO v_used, v_at
      FROM durable.rate_grants g WHERE g.name = p_name AND g.key = p_key;
    v_at := greatest(v_now, v_at);
    IF v_used + p_weight > v_limit.budget THEN
        FOR v_grant IN SELECT g.granted_at, g.weight FROM durable.rate_grants g
                        WHERE g.name = p_name AND g.key = p_key
                        ORDER BY g.granted_at LOOP
            v_used := v_used - v_grant.weight;
            IF v_used + p_weight <= v_limit.budget THEN
                v_at := greatest(v_at, v_grant.granted_at + v_limit.period);
                EXIT;
            END IF;
        END LOOP;
    END IF;
    INSERT INTO durable.rate_grants (name, key, granted_at, weight, holder, used)
    VALUES (p_name, p_key, v_at, p_weight, p_holder, v_at <= v_now);
    RETURN CASE WHEN v_at <= v_now THEN NULL ELSE v_at END;
END
$$;

-- Claims up to p_limit due runs of p_functions: the highest priority first, then the earliest
-- due. Each priority present is visited through the index (a loose scan), so runs that are not
-- due are never read. Along the way a claim ends runs that were cancelled while their worker was
-- gone, that expired before starting or that passed their deadline; parks a run whose
-- concurrency key is at its limit until a slot is handed to it; and delays a run whose start
-- rate limit has no budget left.
CREATE FUNCTION durable.claim_runs(
    p_functions text[], p_limit integer, p_worker text, p_lease interval
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz, deadline_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := durable.clock();
    v_priority integer;
    v_take uuid[] := '{}';
    v_wanted integer;
    v_seen integer;
    v_run record;
    v_retry timestamptz;
BEGIN
    SELECT max(r.priority) INTO v_priority FROM durable.runs r
     WHERE r.status IN ('pending', 'suspended', 'running');
    WHILE v_priority IS NOT NULL AND cardinality(v_take) < p_limit LOOP
        LOOP
            v_wanted := p_limit - cardinality(v_take);
            v_seen := 0;
            FOR v_run IN
                SELECT r.id, r.concurrency_key, r.concurrency_limit, r.holds_slot, r.rate_limit,
                       r.rate_key, r.started_at, r.expires_at, r.deadline_at, r.cancel_requested
                  FROM durable.runs r
                 WHERE r.status IN ('pending', 'suspended', 'running')
                   AND r.priority = v_priority AND r.available_at <= v_now
                   AND r.function = ANY (p_functions) AND NOT r.id = ANY (v_take)
                 ORDER BY r.available_at
                 LIMIT v_wanted
                   FOR UPDATE SKIP LOCKED
            LOOP
                v_seen := v_seen + 1;
                IF v_run.cancel_requested THEN
                    PERFORM durable.end_run(v_run.id, 'cancelled',
                                            durable.cancelled_error('cancelled'));
                ELSIF v_run.started_at IS NULL AND v_run.expires_at <= v_now THEN
                    PERFORM durable.end_run(v_run.id, 'failed', jsonb_build_object(
                        'type', 'RunExpired', 'module', 'durable', 'message',
                        'the run did not start before ' || v_run.expires_at
                        || ' (its start timeout)'));
                ELSIF v_run.deadline_at <= v_now THEN
                    PERFORM durable.end_run(v_run.id, 'failed', jsonb_build_object(
                        'type', 'RunTimedOut', 'module', 'durable', 'message',
                        'the run did not finish before its deadline ' || v_run.deadline_at
                        || ' (its execution timeout)'));
                ELSIF v_run.concurrency_key IS NOT NULL AND NOT v_run.holds_slot
                      AND NOT durable.take_slot(v_run.id, v_run.concurrency_key,
                                                v_run.concurrency_limit) THEN
                    UPDATE durable.runs r
                       SET awaiting_slot = true, available_at = NULL, updated_at = v_now
                     WHERE r.id = v_run.id;
                ELSE
                    v_retry := NULL;
                    IF v_run.rate_limit IS NOT NULL AND v_run.started_at IS NULL THEN
                        v_retry := durable.take_rate(v_run.rate_limit, v_run.rate_key, 1,
                                                     'start ' || v_run.id);
                    END IF;
                    IF v_retry IS NULL THEN
                        v_take := v_take || v_run.id;
                    ELSE
                        UPDATE durable.runs r SET available_at = v_retry, updated_at = v_now
                         WHERE r.id = v_run.id;
                    END IF;
                END IF;
            END LOOP;
            EXIT WHEN v_seen < v_wanted OR cardinality(v_take) >= p_limit;
        END LOOP;
        SELECT max(r.priority) INTO v_priority FROM durable.runs r
         WHERE r.status IN ('pending', 'suspended', 'running') AND r.priority < v_priority;
    END LOOP;
    RETURN QUERY
    UPDATE durable.runs r
       SET status = 'running', attempt = r.attempt + 1, lease_owner = p_worker,
           available_at = v_now + p_lease, wakeup = false,
           started_at = coalesce(r.started_at, v_now),
           deadline_at = coalesce(r.deadline_at, v_now + r.run_timeout), updated_at = v_now
     WHERE r.id = ANY (v_take)
    RETURNING r.id, r.function, r.input, r.attempt, r.trace_context, v_now, r.deadline_at;
END
$$;

-- The earliest time a run of p_functions becomes claimable: per priority present, the first
-- entry of the claim index that is of one of p_functions.
CREATE FUNCTION durable.next_due(p_functions text[]) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_priority integer;
    v_due timestamptz;
    v_next timestamptz;
BEGIN
    SELECT max(r.priority) INTO v_priority FROM durable.runs r
     WHERE r.status IN ('pending', 'suspended', 'running');
    WHILE v_priority IS NOT NULL LOOP
        SELECT r.available_at INTO v_next FROM durable.runs r
         WHERE r.status IN ('pending', 'suspended', 'running') AND r.priority = v_priority
           AND r.available_at IS NOT NULL AND r.function = ANY (p_functions)
         ORDER BY r.available_at
         LIMIT 1;
        IF v_next IS NOT NULL AND (v_due IS NULL OR v_next < v_due) THEN
            v_due := v_next;
        END IF;
        v_next := NULL;
        SELECT max(r.priority) INTO v_priority FROM durable.runs r
         WHERE r.status IN ('pending', 'suspended', 'running') AND r.priority < v_priority;
    END LOOP;
    RETURN v_due;
END
$$;

-- Claims due runs and reports, in the same round trip, when the next one falls due: the claimed
-- runs' rows, then one row with a NULL id carrying the database's now and the next due time
-- (durable.next_due, counted after this claim). A worker calls this on every wake-up.
CREATE FUNCTION durable.claim_due(
    p_functions text[], p_limit integer, p_worker text, p_lease interval
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz, next_due timestamptz, deadline_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
        SELECT c.id, c.function, c.input, c.attempt, c.trace_context, c.db_now,
               NULL::timestamptz, c.deadline_at
          FROM durable.claim_runs(p_functions, p_limit, p_worker, p_lease) c;
    RETURN QUERY
        SELECT NULL::uuid, NULL::text, NULL::jsonb, NULL::integer, NULL::jsonb, durable.clock(),
               durable.next_due(p_functions), NULL::timestamptz;
END
$$;

-- Extends the leases a worker holds; returns the runs still held and whether each has been
-- asked to cancel (the fallback should the durable_cancel notification be missed).
CREATE FUNCTION durable.renew_claims(
    p_runs uuid[], p_attempts integer[], p_worker text, p_lease interval
) RETURNS TABLE (id uuid, cancel_requested boolean)
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
    RETURNING r.id, r.cancel_requested;
$$;

-- Suspends a running run until p_available_at (NULL: until an event or a child wakes it), or
-- until its deadline if that comes first. An event that arrived while the run was still running
-- (wakeup) makes it available at once. Its concurrency slot is freed unless the run keeps it
-- while suspended. A run asked to cancel ends as cancelled instead.
CREATE FUNCTION durable.suspend_run(p_run uuid, p_attempt integer, p_available_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    SELECT r.wakeup, r.cancel_requested, r.holds_slot, r.slot_while_suspended,
           r.concurrency_key, r.deadline_at
      INTO v_run FROM durable.runs r
     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_run.cancel_requested THEN
        PERFORM durable.end_run(p_run, 'cancelled', durable.cancelled_error('cancelled'));
        RETURN true;
    END IF;
    UPDATE durable.runs r
       SET status = 'suspended', lease_owner = NULL, updated_at = durable.clock(),
           available_at = CASE WHEN v_run.wakeup THEN durable.clock()
                               ELSE least(p_available_at, v_run.deadline_at) END,
           holds_slot = v_run.holds_slot AND v_run.slot_while_suspended
     WHERE r.id = p_run;
    IF v_run.holds_slot AND NOT v_run.slot_while_suspended THEN
        PERFORM durable.hand_over_slots(ARRAY[v_run.concurrency_key]);
    END IF;
    IF v_run.wakeup THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN true;
END
$$;

-- Ends many runs in one statement (group commit of completions: engine._group_commit). One row
-- per given run, in order: whether it was ended (false when the claim was gone). p_statuses are
-- 'completed', 'failed', 'cancelled' or 'paused'. Run rows are locked in id order. Ended runs
-- free their concurrency slots and wake their waiting parents.
CREATE FUNCTION durable.finish_runs(
    p_runs uuid[], p_attempts integer[], p_statuses text[], p_results text[], p_errors text[]
) RETURNS TABLE (finished boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_done uuid[];
    v_ended uuid[];
    v_keys text[];
    v_id uuid;
BEGIN
    WITH given AS (
        SELECT g.* FROM unnest(p_runs, p_attempts, p_statuses, p_results, p_errors)
               AS g (run_id, attempt, status, result, error)
    ), locked AS (
        SELECT r.id, r.holds_slot, r.concurrency_key FROM durable.runs r
          JOIN given g ON g.run_id = r.id AND g.attempt = r.attempt
         WHERE r.status = 'running'
         ORDER BY r.id
           FOR UPDATE OF r
    ), finished AS (
        UPDATE durable.runs r
           SET status = g.status, result = g.result::jsonb,
               error = CASE WHEN g.status = 'cancelled' AND r.cancel_requested
                            THEN coalesce(r.error, g.error::jsonb) ELSE g.error::jsonb END,
               lease_owner = NULL, available_at = NULL, updated_at = durable.clock(),
               holds_slot = false, awaiting_slot = false, cancel_requested = false,
               finished_at = CASE WHEN g.status = 'paused' THEN NULL ELSE durable.clock() END
          FROM given g JOIN locked l ON l.id = g.run_id
         WHERE r.id = g.run_id
        RETURNING r.id, g.status, l.holds_slot AS held, l.concurrency_key AS key
    )
    SELECT coalesce(array_agg(f.id), '{}'),
           coalesce(array_agg(f.id) FILTER (WHERE f.status <> 'paused'), '{}'),
           coalesce(array_agg(f.key) FILTER (WHERE f.held), '{}')
      INTO v_done, v_ended, v_keys
      FROM finished f;
    DELETE FROM durable.waits w WHERE w.run_id = ANY (v_ended);
    IF cardinality(v_keys) > 0 THEN
        PERFORM durable.hand_over_slots(v_keys);
    END IF;
    PERFORM durable.wake_parents(v_ended);
    FOREACH v_id IN ARRAY v_done LOOP
        PERFORM pg_notify('durable_done', v_id::text);
    END LOOP;
    RETURN QUERY
        SELECT g.run_id = ANY (v_done)
          FROM unnest(p_runs) WITH ORDINALITY AS g (run_id, n)
         ORDER BY g.n;
END
$$;

-- Starts a child run of p_run at journal position p_position and journals it ('start': the
-- child's id), in one transaction. The child's id is derived from the parent and the position,
-- so a parent re-executed after a crash finds the same child instead of starting another.
-- Returns 'written', or 'fenced' when the caller no longer holds the claim.
CREATE FUNCTION durable.start_child(
    p_run uuid, p_attempt integer, p_position text, p_child jsonb
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT durable.hold_claim(p_run, p_attempt) THEN
        RETURN 'fenced';
    END IF;
    PERFORM durable.create_runs(jsonb_build_array(p_child));
    INSERT INTO durable.journal (run_id, position, kind, name, value, attempt)
    VALUES (p_run, p_position, 'start', p_child ->> 'function',
            jsonb_build_object('run_id', p_child ->> 'id'), p_attempt);
    RETURN 'written';
END
$$;

-- Waits for child p_child of p_run. Outcomes: 'done' (the child has ended; its status, result
-- and error are journaled at p_position as 'join' and returned), 'waiting' (registered in
-- durable.waits as 'durable.child'; the child's end wakes the parent) or 'fenced'.
CREATE FUNCTION durable.await_child(
    p_run uuid, p_attempt integer, p_position text, p_name text, p_child uuid
) RETURNS TABLE (outcome text, status text, result jsonb, error jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_child record;
BEGIN
    IF NOT durable.hold_claim(p_run, p_attempt) THEN
        RETURN QUERY SELECT 'fenced'::text, NULL::text, NULL::jsonb, NULL::jsonb;
        RETURN;
    END IF;
    SELECT c.status, c.result, c.error INTO v_child FROM durable.runs c WHERE c.id = p_child;
    IF v_child.status IN ('completed', 'failed', 'cancelled') THEN
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt)
        VALUES (p_run, p_position, 'join', p_name,
                jsonb_build_object('run_id', p_child, 'status', v_child.status,
                                   'result', v_child.result, 'error', v_child.error),
                p_attempt);
        DELETE FROM durable.waits w WHERE w.run_id = p_run AND w.position = p_position;
        RETURN QUERY SELECT 'done'::text, v_child.status, v_child.result, v_child.error;
        RETURN;
    END IF;
    INSERT INTO durable.waits (run_id, position, name, key, timeout_at)
    VALUES (p_run, p_position, 'durable.child', p_child::text, NULL)
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT 'waiting'::text, v_child.status, NULL::jsonb, NULL::jsonb;
END
$$;
