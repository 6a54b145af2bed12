-- durable: every function of schema durable but the journal's trigger functions, which its table
-- needs and which live with the tables in the migrations.
--
-- version: 14
--
-- How this file is applied. engine/_schema.py runs it after the migrations, under their advisory
-- lock, and records the version above with the file's checksum (durable.schema_functions):
--   - a database with a lower version (or none): every durable function that is not a trigger
--     function is dropped and this file is run, in the transaction that records it, so a function
--     taken out of this file disappears from the database too;
--   - the same version and checksum: nothing to do;
--   - the same version, another checksum: refused (this file changed without raising its version);
--   - a higher version: left alone, with a warning (older code during a rolling deploy must not
--     downgrade the functions newer workers call).
-- So: raise the version with every change to this file. Each function is defined exactly once
-- (CREATE FUNCTION, never OR REPLACE), and each is called by a query of queries.sql or by a
-- function that is (tests/integration/test_migrations.py checks both). SQL-language functions are
-- checked when created, so they come after the functions they call; plpgsql ones are not.
--
-- Every transition the engine makes is one call of a function below (claim, append, await_event,
-- suspend, complete, send_event), so each is one round trip. Lock order everywhere: the event
-- advisory lock for (name, key), then the runs row, then journal/waits rows. Every function reads
-- time from durable.clock(), so a test can move the database's time. A function that runs its
-- own statements on a hot path (an append, a claim) is plpgsql, not SQL: PostgreSQL before 18
-- plans a SQL function's statements again on every call (0.3 to 0.7 ms for an UPDATE of the
-- partitioned runs), a plpgsql function's once per session. SQL functions here are inlined
-- into their callers' statements, or called rarely.

-- The clock and the locks every transition shares
-- -----------------------------------------------

-- The database's clock, as every function below reads it. Tests move it with
-- `SET durable.fake_now = '<timestamptz>'` (a session setting; unset or empty: the real clock).
-- Declared STABLE so that a claim compares against one reading per statement. plpgsql: a SQL
-- function reading clock_timestamp() is never inlined, and PostgreSQL before 18 parses and plans
-- it again on every call.
CREATE FUNCTION durable.clock() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(nullif(current_setting('durable.fake_now', true), '')::timestamptz,
                    clock_timestamp());
END
$$;

-- Serialises send_event and await_event for one (name, key), so that an event is either seen by
-- the waiter's lookup or sees the waiter's registration: never neither.
CREATE FUNCTION durable.lock_event_key(p_name text, p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_name || chr(31) || p_key, 7));
$$;

-- A run row locked FOR SHARE proves the caller still holds the claim `p_attempt`: a claim by
-- another worker updates the row, so it waits for this transaction and bumps the attempt after it.
-- Returns the run's segment, where its journal entries go; NULL when the claim is gone.
CREATE FUNCTION durable.held_segment(p_run uuid, p_attempt integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_segment integer;
BEGIN
    SELECT r.segment INTO v_segment FROM durable.runs r
     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running'
       FOR SHARE;
    RETURN v_segment;
END
$$;

-- Serialises the slot accounting of one concurrency key (durable.take_slot,
-- durable.hand_over_slots, the strategies of durable.create_runs).
CREATE FUNCTION durable.lock_slot_key(p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_key, 11));
$$;

-- The error a cancelled run ends with (RunHandle.result raises RunCancelled from it).
CREATE FUNCTION durable.cancelled_error(p_reason text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'RunCancelled', 'message', p_reason, 'module', 'durable');
$$;

-- Concurrency slots, and what happens when a run ends
-- ---------------------------------------------------

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
    PERFORM durable.announce_ends(ARRAY[p_run]);
END
$$;

-- Tells whoever awaits them that p_runs ended (or paused): one notification per run on
-- durable_done, sent only while durable.result_waiters or durable.watchers holds a process seen
-- in the last minute (a NOTIFY wakes every listening backend at commit, every worker's own
-- included). A waiter recorded after this looked reads the run again within RESULT_GRACE
-- (durable/_connection.py) rather than the usual second: the end is read, not heard.
CREATE FUNCTION durable.announce_ends(p_runs uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM durable.result_waiters w WHERE w.seen > now() - interval '1 minute')
       OR EXISTS (SELECT 1 FROM durable.watchers w WHERE w.seen > now() - interval '1 minute')
    THEN
        PERFORM pg_notify('durable_done', r::text) FROM unnest(p_runs) AS r;
    END IF;
END
$$;

-- Rate limits
-- -----------

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

-- Segments
-- --------

-- Takes ACCESS EXCLUSIVE locks on the three partitioned tables, which a new partition and a
-- dropped one need, without ever waiting in their queue: a waiting request would hold up every
-- statement of the engine behind it, and could lose a deadlock to one of them, or win it and
-- fail the engine's transaction. So it tries NOWAIT every 10 ms, p_tries times, and then
-- raises lock_not_available (retention tries again at its next pass).
CREATE FUNCTION durable.lock_partitioned_tables(p_tries integer DEFAULT 200) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..p_tries LOOP
        BEGIN
            LOCK TABLE durable.runs, durable.journal, durable.events
                IN ACCESS EXCLUSIVE MODE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.01);
        END;
    END LOOP;
    RAISE EXCEPTION 'the tables durable.runs, durable.journal and durable.events stayed busy'
        USING ERRCODE = 'lock_not_available';
END
$$;

-- Opens a segment of retention class p_retention (NULL: for ever) and closes the class's open
-- one: a row of durable.segments and a partition of each of runs, journal and events. Returns
-- its id. Under a lock of its own, so that two callers make two segments, not one twice.
CREATE FUNCTION durable.add_segment(p_retention interval) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_id integer;
    v_table text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('durable.segments', 13));
    PERFORM durable.lock_partitioned_tables();
    SELECT coalesce(max(s.id), 0) + 1 INTO v_id FROM durable.segments s;
    FOREACH v_table IN ARRAY ARRAY['runs', 'journal', 'events'] LOOP
        EXECUTE format('CREATE TABLE durable.%I PARTITION OF durable.%I FOR VALUES IN (%s)',
                       v_table || '_' || v_id, v_table, v_id);
    END LOOP;
    UPDATE durable.segments s SET closed_at = durable.clock()
     WHERE s.retention IS NOT DISTINCT FROM p_retention AND s.closed_at IS NULL;
    INSERT INTO durable.segments (id, retention, opened_at)
    VALUES (v_id, p_retention, durable.clock());
    RETURN v_id;
END
$$;

-- The open segment of each retention class that has one: where its new runs go.
CREATE FUNCTION durable.open_segments() RETURNS TABLE (retention interval, id integer)
LANGUAGE sql STABLE AS $$
    SELECT s.retention, max(s.id) FROM durable.segments s
     WHERE s.closed_at IS NULL
     GROUP BY s.retention;
$$;

-- The open segment of retention class p_retention, opened when the class has none yet.
CREATE FUNCTION durable.open_segment(p_retention interval) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_id integer;
BEGIN
    SELECT o.id INTO v_id FROM durable.open_segments() o
     WHERE o.retention IS NOT DISTINCT FROM p_retention;
    IF v_id IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('durable.segments', 13));
        SELECT o.id INTO v_id FROM durable.open_segments() o
         WHERE o.retention IS NOT DISTINCT FROM p_retention;
        IF v_id IS NULL THEN
            v_id := durable.add_segment(p_retention);
        END IF;
    END IF;
    RETURN v_id;
END
$$;

-- Starting and cancelling runs
-- ----------------------------

-- The runs given to durable.create_runs, one row per JSON object, in order (n), each option as
-- given (NULL when absent; durable.new_run gives the defaults and the times), durations as
-- intervals of seconds (see durable.new_run). A fresh run's id is a random UUID its caller has
-- just made, which no other start can name.
CREATE FUNCTION durable.given_runs(p_runs jsonb)
RETURNS TABLE (n bigint, id uuid, function text, input jsonb, idempotency_key text,
               trace_context jsonb, priority integer, available_at timestamptz,
               delay interval, start_timeout interval, run_timeout interval, parent_id uuid,
               concurrency_key text, concurrency_limit integer, strategy text,
               slot_while_suspended boolean, rate_limit text, rate_key text, tags jsonb,
               queue text, retention interval, fresh boolean)
LANGUAGE sql STABLE AS $$
    SELECT e.n, (e.doc ->> 'id')::uuid, e.doc ->> 'function', e.doc -> 'input',
           e.doc ->> 'idempotency_key', e.doc -> 'trace_context',
           (e.doc ->> 'priority')::integer, (e.doc ->> 'available_at')::timestamptz,
           make_interval(secs => (e.doc ->> 'delay')::double precision),
           make_interval(secs => (e.doc ->> 'start_timeout')::double precision),
           make_interval(secs => (e.doc ->> 'run_timeout')::double precision),
           (e.doc ->> 'parent_id')::uuid, e.doc ->> 'concurrency_key',
           (e.doc ->> 'concurrency_limit')::integer, e.doc ->> 'concurrency_strategy',
           (e.doc ->> 'slot_while_suspended')::boolean, e.doc ->> 'rate_limit',
           e.doc ->> 'rate_key', e.doc -> 'tags', e.doc ->> 'queue',
           make_interval(secs => (e.doc ->> 'retention')::double precision),
           coalesce((e.doc ->> 'fresh')::boolean, false)
      FROM jsonb_array_elements(p_runs) WITH ORDINALITY AS e (doc, n);
$$;

-- The row durable.create_runs (through durable.new_runs) and the one-statement start
-- (queries.sql, start_run) insert for one run, one definition for both, from its options as
-- given (NULL: the default), in segment p_segment (the open one of its retention class,
-- durable.open_segments; NULL when the class has none open). It starts at p_available_at,
-- else p_delay after p_now, else at p_now, and expires p_start_timeout after that, with the
-- event cursor of now (an event counts for a run when sent after it started). Both callers
-- give durations as intervals of seconds, make_interval(secs => ...): an interval of days
-- would add calendar days, 23 or 25 hours across a daylight-saving change of the session's
-- zone. Given p_worker, a run due at once with no concurrency key or rate limit is claimed
-- by that worker as durable.claim_runs would leave it (the two set the same columns), for
-- p_lease, at the version p_versions gives its function among p_functions, and pinned to it
-- when the function is one of p_pinned. The parameters' types are version 12's: a process of
-- that version, whose prepared start_run names them, keeps starting runs in a rolling deploy.
-- queries.sql's start_run_claimed writes the claimed row out flat for an eager start (the
-- choice between the two rows costs a tenth of a start): change it with this function;
-- tests/integration/test_one_statement_start.py holds the two to the same row.
CREATE FUNCTION durable.new_run(
    p_id uuid, p_function text, p_input jsonb, p_idempotency_key text, p_trace_context jsonb,
    p_priority integer, p_available_at timestamptz, p_delay interval, p_start_timeout interval,
    p_run_timeout interval, p_parent_id uuid, p_concurrency_key text,
    p_concurrency_limit integer, p_slot_while_suspended boolean, p_rate_limit text,
    p_rate_key text, p_tags jsonb, p_queue text, p_segment integer, p_now timestamptz,
    p_worker text, p_lease interval, p_functions text[], p_versions text[], p_pinned text[]
) RETURNS TABLE (id uuid, function text, input jsonb, idempotency_key text,
                 trace_context jsonb, available_at timestamptz, event_cursor bigint,
                 priority integer, expires_at timestamptz, run_timeout interval,
                 parent_id uuid, concurrency_key text, concurrency_limit integer,
                 slot_while_suspended boolean, rate_limit text, rate_key text, tags jsonb,
                 queue text, segment integer, status text, attempt integer, lease_owner text,
                 versions text[], pinned boolean, started_at timestamptz,
                 deadline_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT p_id, p_function, p_input, p_idempotency_key, p_trace_context,
           CASE WHEN c.claimed THEN p_now + p_lease ELSE t.at END,
           (SELECT coalesce(max(e.id), 0) FROM durable.events e), coalesce(p_priority, 0),
           t.expires_at, p_run_timeout, p_parent_id, p_concurrency_key,
           p_concurrency_limit, coalesce(p_slot_while_suspended, false), p_rate_limit,
           coalesce(p_rate_key, ''), coalesce(p_tags, '{}'), p_queue, p_segment,
           CASE WHEN c.claimed THEN 'running' ELSE 'pending' END,
           CASE WHEN c.claimed THEN 1 ELSE 0 END,
           CASE WHEN c.claimed THEN p_worker END,
           CASE WHEN c.claimed
                THEN ARRAY[coalesce(p_versions[array_position(p_functions, p_function)], '')]
                ELSE '{}' END,
           c.claimed AND p_function = ANY (coalesce(p_pinned, '{}')),
           CASE WHEN c.claimed THEN p_now END,
           CASE WHEN c.claimed THEN p_now + p_run_timeout END
      FROM (SELECT s.at, s.at + p_start_timeout AS expires_at
              FROM (SELECT coalesce(p_available_at, p_now + p_delay, p_now) AS at) s) t,
           LATERAL (SELECT p_worker IS NOT NULL AND p_function = ANY (p_functions)
                           AND p_concurrency_key IS NULL AND p_rate_limit IS NULL
                           AND t.at <= p_now
                           AND (t.expires_at IS NULL OR t.expires_at > p_now) AS claimed) c;
$$;

-- durable.new_run for each of the runs given to durable.create_runs (durable.given_runs), in the
-- open segment of its retention class, with their n and fresh. (The segments are read once for
-- all runs here, not once per run as a lookup inside durable.new_run would be.)
CREATE FUNCTION durable.new_runs(
    p_runs jsonb, p_now timestamptz, p_worker text, p_lease interval, p_functions text[],
    p_versions text[], p_pinned text[]
) RETURNS TABLE (n bigint, fresh boolean, id uuid, function text, input jsonb,
                 idempotency_key text, trace_context jsonb, available_at timestamptz,
                 event_cursor bigint, priority integer, expires_at timestamptz,
                 run_timeout interval, parent_id uuid, concurrency_key text,
                 concurrency_limit integer, slot_while_suspended boolean, rate_limit text,
                 rate_key text, tags jsonb, queue text, segment integer, status text,
                 attempt integer, lease_owner text, versions text[], pinned boolean,
                 started_at timestamptz, deadline_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT g.n, g.fresh, w.*
      FROM durable.given_runs(p_runs) g
      LEFT JOIN durable.open_segments() o ON o.retention IS NOT DISTINCT FROM g.retention,
           LATERAL durable.new_run(g.id, g.function, g.input, g.idempotency_key,
                                   g.trace_context, g.priority, g.available_at, g.delay,
                                   g.start_timeout, g.run_timeout, g.parent_id,
                                   g.concurrency_key, g.concurrency_limit,
                                   g.slot_while_suspended, g.rate_limit, g.rate_key, g.tags,
                                   g.queue, o.id, p_now, p_worker, p_lease,
                                   p_functions, p_versions, p_pinned) w;
$$;

-- Starts runs (App.start, App.start_many, Context.start): one JSON object per run with its id,
-- function, input, idempotency_key, trace_context and options (priority, available_at, delay,
-- start_timeout and run_timeout in seconds, parent_id, concurrency_key, concurrency_limit,
-- concurrency_strategy, slot_while_suspended, rate_limit, rate_key, tags, queue, retention in
-- seconds; absent ones take their defaults). Returns one row per given run, in order: its id (an
-- existing run's when the id or idempotency key is taken) and whether it was created. A run goes
-- to the open segment of its retention class; its id and idempotency key are looked for in every
-- segment first (a segment's keys are unique only within it), under a lock per idempotency key;
-- a fresh run's id is not (see durable.given_runs).
-- The strategies act on the active runs of the same concurrency key:
-- 'cancel_newest' cancels the new run when its key is already at its limit;
-- 'cancel_in_progress' cancels the oldest runs of the key so that the newest stay within it.
-- Given p_worker (durable.start_claimed), a run due at once with no concurrency key or rate
-- limit is inserted claimed by that worker (durable.new_runs). Workers are told (durable_work)
-- unless every run created was inserted claimed.
CREATE FUNCTION durable.create_runs(
    p_runs jsonb, p_worker text DEFAULT NULL,
    p_lease interval DEFAULT NULL, p_functions text[] DEFAULT NULL,
    p_versions text[] DEFAULT NULL, p_pinned text[] DEFAULT NULL
) RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := durable.clock();
    v_ids uuid[];
    v_queued boolean;
    v_new record;
    v_old uuid;
    v_classes interval[];
    v_class interval;
BEGIN
    -- Each statement costs its executor's start-up, which for a single start is most of the
    -- time: the common case (no retention, no concurrency strategy) skips what it does not need.
    IF p_runs @? '$[*].retention' THEN
        SELECT coalesce(array_agg(DISTINCT g.retention), '{}') INTO v_classes
          FROM durable.given_runs(p_runs) g;
    ELSE
        v_classes := ARRAY[NULL::interval];
    END IF;
    FOREACH v_class IN ARRAY v_classes LOOP
        PERFORM durable.open_segment(v_class);
    END LOOP;
    -- A key, and the id of a run that is not fresh (a child's, a run named by App.start's
    -- caller), is locked until the commit, so that two starts of it in two segments see each
    -- other.
    IF p_runs @? '$[*] ? (@.idempotency_key != null || !(@.fresh == true))' THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(k.key, 17))
           FROM (SELECT DISTINCT u.key
                   FROM durable.given_runs(p_runs) g,
                        LATERAL (VALUES (g.idempotency_key),
                                        (CASE WHEN NOT g.fresh THEN g.id::text END)) u (key)
                  WHERE u.key IS NOT NULL ORDER BY 1) k;
    END IF;
    WITH inserted AS (
        INSERT INTO durable.runs (id, function, input, idempotency_key, trace_context,
                                  available_at, event_cursor, priority, expires_at, run_timeout,
                                  parent_id, concurrency_key, concurrency_limit,
                                  slot_while_suspended, rate_limit, rate_key, tags, queue,
                                  segment, status, attempt, lease_owner, versions, pinned,
                                  started_at, deadline_at)
        SELECT w.id, w.function, w.input, w.idempotency_key, w.trace_context, w.available_at,
               w.event_cursor, w.priority, w.expires_at, w.run_timeout, w.parent_id,
               w.concurrency_key, w.concurrency_limit, w.slot_while_suspended, w.rate_limit,
               w.rate_key, w.tags, w.queue, w.segment, w.status, w.attempt, w.lease_owner,
               w.versions, w.pinned, w.started_at, w.deadline_at
          FROM durable.new_runs(p_runs, v_now, p_worker, p_lease, p_functions, p_versions,
                                p_pinned) w
         -- Scalar subqueries, one index probe per run and segment: as NOT EXISTS, the planner
         -- may hash every run of the table to check one.
         WHERE (w.fresh OR (SELECT 1 FROM durable.runs r WHERE r.id = w.id LIMIT 1) IS NULL)
           AND (w.idempotency_key IS NULL
                OR (SELECT 1 FROM durable.runs r
                     WHERE r.idempotency_key = w.idempotency_key LIMIT 1) IS NULL)
         ORDER BY w.n
        ON CONFLICT DO NOTHING
        RETURNING durable.runs.id, durable.runs.status
    )
    SELECT coalesce(array_agg(i.id), '{}'), coalesce(bool_or(i.status = 'pending'), true)
      INTO v_ids, v_queued
      FROM inserted i;
    IF p_runs @? '$[*].concurrency_strategy' THEN
        FOR v_new IN SELECT g.id, g.concurrency_key AS key, g.concurrency_limit AS lim, g.strategy
                       FROM durable.given_runs(p_runs) g
                      WHERE g.strategy IN ('cancel_newest', 'cancel_in_progress')
                        AND g.id = ANY (v_ids)
                      ORDER BY g.n LOOP
            PERFORM durable.lock_slot_key(v_new.key);
            IF v_new.strategy = 'cancel_newest' THEN
                IF (SELECT count(*) FROM durable.runs r
                     WHERE r.concurrency_key = v_new.key AND r.id <> v_new.id
                       AND r.status IN ('pending', 'running', 'suspended', 'paused'))
                   >= v_new.lim THEN
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
    END IF;
    IF jsonb_array_length(p_runs) = 1 AND cardinality(v_ids) = 1 THEN
        run_id := v_ids[1];
        created := true;
        RETURN NEXT;
    ELSE
        RETURN QUERY
        SELECT coalesce(i.id, existing.id), i.id IS NOT NULL
          FROM durable.given_runs(p_runs) g
          LEFT JOIN unnest(v_ids) AS i (id) ON i.id = g.id
          LEFT JOIN LATERAL (
              SELECT r.id FROM durable.runs r
               WHERE i.id IS NULL
                 AND (r.id = g.id OR (g.idempotency_key IS NOT NULL
                                      AND r.idempotency_key = g.idempotency_key))
               LIMIT 1
          ) existing ON true
         ORDER BY g.n;
    END IF;
    IF v_queued THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
END
$$;

-- Forks run p_source as run p_new (durable runs fork, durable runs retry): a new pending run of
-- the same function with the same options, input p_input when p_replace_input (else the
-- source's), the source's event cursor (the events it received are in the copied journal;
-- later ones count as they would have for the source), and a copy of the source's journal
-- entries at positions p_keep, as attempt 0 (written by no claim of the new run). The fork
-- records its lineage: forked_from = p_source, fork_position = p_position (where the copy
-- stops). The source is untouched and the journal stays append-only. Returns 'forked', or
-- 'not_found' when there is no run p_source.
CREATE FUNCTION durable.fork_run(
    p_source uuid, p_new uuid, p_keep text[], p_position text, p_input jsonb,
    p_replace_input boolean
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := durable.clock();
    v_retention interval;
    v_segment integer;
BEGIN
    SELECT s.retention INTO v_retention
      FROM durable.runs r JOIN durable.segments s ON s.id = r.segment
     WHERE r.id = p_source;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    v_segment := durable.open_segment(v_retention);
    INSERT INTO durable.runs (id, function, input, trace_context, available_at, event_cursor,
                              priority, run_timeout, concurrency_key, concurrency_limit,
                              slot_while_suspended, rate_limit, rate_key, forked_from,
                              fork_position, tags, queue, segment)
    SELECT p_new, r.function, CASE WHEN p_replace_input THEN p_input ELSE r.input END,
           r.trace_context, v_now, r.event_cursor, r.priority, r.run_timeout,
           r.concurrency_key, r.concurrency_limit, r.slot_while_suspended, r.rate_limit,
           r.rate_key, p_source, p_position, r.tags, r.queue, v_segment
      FROM durable.runs r
     WHERE r.id = p_source;
    INSERT INTO durable.journal (run_id, position, kind, name, value, error, attempt, created_at,
                                 started_at, duration_ms, timing, segment)
    SELECT p_new, j.position, j.kind, j.name, j.value, j.error, 0, j.created_at, j.started_at,
           j.duration_ms, j.timing, v_segment
      FROM durable.journal j
     WHERE j.run_id = p_source AND j.position = ANY (p_keep);
    PERFORM pg_notify('durable_work', '');
    RETURN 'forked';
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

-- Claiming runs and keeping them
-- ------------------------------

-- Whether a worker whose versions of p_functions are p_versions (aligned) may claim a run of
-- p_function that has run on r_versions: any run, unless it is pinned and started on another
-- version of its function's code.
CREATE FUNCTION durable.claimable_by(
    p_pinned boolean, r_versions text[], p_function text, p_functions text[],
    p_versions text[]
) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT NOT p_pinned OR cardinality(r_versions) = 0
           OR r_versions[1] = p_versions[array_position(p_functions, p_function)];
$$;

-- Claims up to p_limit due runs of p_functions, which this worker runs at p_versions (aligned
-- with p_functions; each claim records the version it runs on): the highest priority first,
-- then the earliest due. Each priority present is visited through the index (a loose scan), so
-- runs that are not due are never read. Along the way a claim ends runs that were cancelled
-- while their worker was gone, that expired before starting or that passed their deadline;
-- parks a run whose concurrency key is at its limit until a slot is handed to it; and delays a
-- run whose start rate limit has no budget left. A run's first claim pins it when its function
-- is one of p_pinned (declared versioning="pinned" in the code it starts on); a pinned run that
-- started on another version is left to the workers of that version. A caller that passes no
-- p_versions claims no pinned run that has started, and records its attempts as version ''.
-- With p_ahead, a run due within p_ahead is claimed too (its claim's due_at says when it is
-- due; the worker waits until then, so that a timer is not late by the claim's round trip).
-- Each claim is the run's next attempt, recorded with the version the worker runs of its
-- function; durable.new_run makes a run claimed the same way, and queries.sql's
-- start_run_claimed too (change the three together).
CREATE FUNCTION durable.claim_runs(
    p_functions text[], p_limit integer, p_worker text, p_lease interval,
    p_versions text[] DEFAULT NULL, p_pinned text[] DEFAULT NULL,
    p_ahead interval DEFAULT '0 s'
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz, deadline_at timestamptz, forked boolean,
                 created_at timestamptz, due_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := durable.clock();
    v_priority integer;
    v_take uuid[] := '{}';
    v_due timestamptz[] := '{}';
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
                       r.rate_key, r.started_at, r.expires_at, r.deadline_at, r.cancel_requested,
                       r.available_at
                  FROM durable.runs r
                 WHERE r.status IN ('pending', 'suspended', 'running')
                   AND r.priority = v_priority AND r.available_at <= v_now + p_ahead
                   AND r.function = ANY (p_functions) AND NOT r.id = ANY (v_take)
                   AND durable.claimable_by(r.pinned, r.versions, r.function, p_functions,
                                            p_versions)
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
                        v_due := v_due || v_run.available_at;
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
           versions = r.versions
                      || coalesce(p_versions[array_position(p_functions, r.function)], ''),
           pinned = CASE WHEN cardinality(r.versions) = 0
                         THEN r.function = ANY (coalesce(p_pinned, '{}')) ELSE r.pinned END,
           available_at = v_now + p_lease, wakeup = false,
           started_at = coalesce(r.started_at, v_now),
           deadline_at = coalesce(r.deadline_at, v_now + r.run_timeout), updated_at = v_now
      FROM unnest(v_take, v_due) AS was (id, due_at)
     WHERE r.id = was.id
    RETURNING r.id, r.function, r.input, r.attempt, r.trace_context, v_now, r.deadline_at,
              r.forked_from IS NOT NULL, r.created_at, was.due_at;
END
$$;

-- The earliest time a run of p_functions becomes claimable by a worker of p_versions: per
-- priority present, the first entry of the claim index that is of one of p_functions (and not
-- pinned to another version).
CREATE FUNCTION durable.next_due(p_functions text[], p_versions text[] DEFAULT NULL)
RETURNS timestamptz
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
           AND durable.claimable_by(r.pinned, r.versions, r.function, p_functions, p_versions)
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
    p_functions text[], p_limit integer, p_worker text, p_lease interval,
    p_versions text[] DEFAULT NULL, p_pinned text[] DEFAULT NULL,
    p_ahead interval DEFAULT '0 s'
) RETURNS TABLE (id uuid, function text, input jsonb, attempt integer, trace_context jsonb,
                 db_now timestamptz, next_due timestamptz, deadline_at timestamptz,
                 forked boolean, created_at timestamptz, due_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
        SELECT c.id, c.function, c.input, c.attempt, c.trace_context, c.db_now,
               NULL::timestamptz, c.deadline_at, c.forked, c.created_at, c.due_at
          FROM durable.claim_runs(p_functions, p_limit, p_worker, p_lease, p_versions,
                                  p_pinned, p_ahead) c;
    RETURN QUERY
        SELECT NULL::uuid, NULL::text, NULL::jsonb, NULL::integer, NULL::jsonb, durable.clock(),
               durable.next_due(p_functions, p_versions), NULL::timestamptz, NULL::boolean,
               NULL::timestamptz, NULL::timestamptz;
END
$$;

-- Starts run p_run (a durable.create_runs object) and, when it is created and nothing stands
-- between it and a worker (it is due now and has no concurrency key, rate limit or start
-- timeout already passed), inserts it claimed by worker p_worker, which runs p_functions at
-- p_versions: the worker of the process that started it runs it at once, with no notification
-- and no claim round trip (App.start beside a worker with a free slot). Otherwise the run waits
-- for a claim as any other, and workers are told (by durable.create_runs). Returns the run's id,
-- whether it was created, and the claim's columns (NULL when not claimed).
CREATE FUNCTION durable.start_claimed(
    p_run jsonb, p_worker text, p_lease interval, p_functions text[], p_versions text[],
    p_pinned text[]
) RETURNS TABLE (run_id uuid, created boolean, id uuid, function text, input jsonb,
                 attempt integer, trace_context jsonb, db_now timestamptz,
                 deadline_at timestamptz, forked boolean, created_at timestamptz,
                 due_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    SELECT c.run_id, c.created INTO run_id, created
      FROM durable.create_runs(jsonb_build_array(p_run), p_worker, p_lease, p_functions,
                               p_versions, p_pinned) c;
    IF created THEN
        -- By its id alone, so that the primary key is the plan whatever the statistics say
        -- (with the status among the conditions, a stale estimate once chose the claim index).
        SELECT r.function, r.input, r.attempt, r.trace_context, r.started_at, r.deadline_at,
               r.created_at, r.status, r.lease_owner
          INTO v_run
          FROM durable.runs r
         WHERE r.id = run_id;
        IF v_run.status = 'running' AND v_run.lease_owner = p_worker AND v_run.attempt = 1 THEN
            id := run_id;
            function := v_run.function;
            input := v_run.input;
            attempt := 1;
            trace_context := v_run.trace_context;
            db_now := v_run.started_at;
            deadline_at := v_run.deadline_at;
            forked := false;
            created_at := v_run.created_at;
            due_at := v_run.started_at;
        END IF;
    END IF;
    RETURN NEXT;
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

-- The journal and events
-- ----------------------

-- Appends the journal entries of many runs in one statement (group commit: engine._group_commit
-- collects the appends that arrive while the previous statement commits). One row per entry, in
-- order: 'written', 'fenced' (the caller no longer holds the claim) or 'conflict' (the position
-- already holds an entry). Run rows are locked FOR SHARE in id order, like every multi-row lock.
-- JSON values arrive as text[] here and in finish_runs: an array parameter of JSON lists would be
-- read by the driver as a multidimensional array. p_started, p_ms and p_timings: when a step's
-- last try began, how long it ran, and its failed tries before it (migration 0003; NULL for
-- other entries, and p_timings for a step that passed at once).
CREATE FUNCTION durable.append_entries(
    p_runs uuid[], p_attempts integer[], p_positions text[], p_kinds text[], p_names text[],
    p_values text[], p_errors text[], p_started timestamptz[], p_ms double precision[],
    p_timings text[]
) RETURNS TABLE (outcome text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH given AS (
        SELECT g.* FROM unnest(p_runs, p_attempts, p_positions, p_kinds, p_names, p_values,
                               p_errors, p_started, p_ms, p_timings)
               WITH ORDINALITY AS g (run_id, attempt, position, kind, name, value, error,
                                     started_at, duration_ms, timing, n)
    ), held AS (
        SELECT r.id, r.attempt, r.segment FROM durable.runs r
         WHERE r.id = ANY (p_runs) AND r.status = 'running'
         ORDER BY r.id
           FOR SHARE
    ), inserted AS (
        INSERT INTO durable.journal (run_id, position, kind, name, value, error, attempt,
                                     started_at, duration_ms, timing, segment)
        SELECT g.run_id, g.position, g.kind, g.name, g.value::jsonb, g.error::jsonb, g.attempt,
               g.started_at, g.duration_ms, g.timing::jsonb, h.segment
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
END
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
    v_segment integer := durable.held_segment(p_run, p_attempt);
BEGIN
    IF v_segment IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, segment)
    VALUES (p_run, p_position, 'sleep', p_name,
            jsonb_build_object('wake_at', v_wake), p_attempt, v_segment);
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
    v_since timestamptz;
    v_waited jsonb;
    v_segment integer;
BEGIN
    PERFORM durable.lock_event_key(p_name, p_key);
    v_segment := durable.held_segment(p_run, p_attempt);
    IF v_segment IS NULL THEN
        RETURN QUERY SELECT 'fenced'::text, NULL::jsonb, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT greatest(r.event_cursor,
                    (SELECT max((j.value ->> 'event_id')::bigint) FROM durable.journal j
                      WHERE j.run_id = p_run AND j.kind = 'event' AND j.name = p_name
                        AND j.value ->> 'key' = p_key))
      INTO v_after FROM durable.runs r WHERE r.id = p_run;
    -- Since when the run waited, and until when, for the journal (none when the event was
    -- there at once).
    SELECT w.created_at, jsonb_build_object('deadline', w.timeout_at)
      INTO v_since, v_waited FROM durable.waits w
     WHERE w.run_id = p_run AND w.position = p_position;
    SELECT * INTO v_event FROM durable.events e
     WHERE e.name = p_name AND e.key = p_key AND e.id > v_after
     ORDER BY e.id LIMIT 1;
    IF FOUND THEN
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, started_at,
                                     timing, segment)
        VALUES (p_run, p_position, 'event', p_name,
                jsonb_build_object('event_id', v_event.id, 'key', p_key,
                                   'payload', v_event.payload),
                p_attempt, v_since, v_waited, v_segment);
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
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, started_at,
                                     timing, segment)
        VALUES (p_run, p_position, 'event', p_name,
                jsonb_build_object('timeout', true, 'key', p_key), p_attempt, v_since, v_waited,
                v_segment);
        DELETE FROM durable.waits w WHERE w.run_id = p_run AND w.position = p_position;
        RETURN QUERY SELECT 'timeout'::text, NULL::jsonb, v_deadline;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'waiting'::text, NULL::jsonb, v_deadline;
END
$$;

-- Stores an event on (name, key) and returns its id. Runs waiting on (name, key) get wakeup,
-- and a suspended one among them is due at once: it finds the event when it claims again. The
-- event goes to the open segment of retention class p_retention (the sender's App's).
CREATE FUNCTION durable.send_event(
    p_name text, p_key text, p_payload jsonb, p_retention interval DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_segment integer := durable.open_segment(p_retention);
BEGIN
    PERFORM durable.lock_event_key(p_name, p_key);
    INSERT INTO durable.events (name, key, payload, segment)
    VALUES (p_name, p_key, p_payload, v_segment)
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

-- Suspending, ending and resuming runs
-- ------------------------------------

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
    v_children uuid[];
    v_keys text[];
BEGIN
    WITH given AS (
        SELECT g.* FROM unnest(p_runs, p_attempts, p_statuses, p_results, p_errors)
               AS g (run_id, attempt, status, result, error)
    ), locked AS (
        -- r.id = ANY: found by primary key whatever the statistics say (planned on those of a
        -- table that was empty, the join read every running run, and slowed as they grew).
        SELECT r.id, r.holds_slot, r.concurrency_key FROM durable.runs r
          JOIN given g ON g.run_id = r.id AND g.attempt = r.attempt
         WHERE r.id = ANY (p_runs) AND r.status = 'running'
         ORDER BY r.id
           FOR UPDATE OF r
    ), finished AS (
        UPDATE durable.runs r
           SET status = g.status, result = g.result::jsonb,
               error = CASE WHEN g.status = 'cancelled' AND r.cancel_requested
                            THEN coalesce(r.error, g.error::jsonb) ELSE g.error::jsonb END,
               lease_owner = NULL, available_at = NULL, updated_at = durable.clock(),
               holds_slot = false, awaiting_slot = false, cancel_requested = false,
               finished_at = CASE WHEN g.status = 'paused' THEN NULL ELSE durable.clock() END,
               paused_versions = CASE WHEN g.status = 'paused'
                                      THEN r.paused_versions
                                           || coalesce(r.versions[cardinality(r.versions)], '')
                                      ELSE r.paused_versions END
          FROM given g JOIN locked l ON l.id = g.run_id
         WHERE r.id = g.run_id
        RETURNING r.id, g.status, l.holds_slot AS held, l.concurrency_key AS key, r.parent_id
    )
    SELECT coalesce(array_agg(f.id), '{}'),
           coalesce(array_agg(f.id) FILTER (WHERE f.status <> 'paused'), '{}'),
           coalesce(array_agg(f.id) FILTER (WHERE f.status <> 'paused'
                                              AND f.parent_id IS NOT NULL), '{}'),
           coalesce(array_agg(f.key) FILTER (WHERE f.held), '{}')
      INTO v_done, v_ended, v_children, v_keys
      FROM finished f;
    DELETE FROM durable.waits w WHERE w.run_id = ANY (v_ended);
    IF cardinality(v_keys) > 0 THEN
        PERFORM durable.hand_over_slots(v_keys);
    END IF;
    IF cardinality(v_children) > 0 THEN
        PERFORM durable.wake_parents(v_children);
    END IF;
    PERFORM durable.announce_ends(v_done);
    RETURN QUERY
        SELECT g.run_id = ANY (v_done)
          FROM unnest(p_runs) WITH ORDINALITY AS g (run_id, n)
         ORDER BY g.n;
END
$$;

-- A worker that starts with p_versions of p_functions (aligned) tries again, once, the runs of
-- those functions that a non-determinism paused on other versions of their code: a deploy
-- that fixes the code resumes them without an operator. A pinned run is left to the workers of
-- the version it started on, which paused it. Returns how many it made pending.
CREATE FUNCTION durable.retry_paused(p_functions text[], p_versions text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE durable.runs r
       SET status = 'pending', error = NULL, available_at = durable.clock(),
           updated_at = durable.clock()
     WHERE r.status = 'paused' AND r.function = ANY (p_functions)
       AND NOT p_versions[array_position(p_functions, r.function)] = ANY (r.paused_versions)
       AND durable.claimable_by(r.pinned, r.versions, r.function, p_functions, p_versions);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM pg_notify('durable_work', '');
    END IF;
    RETURN v_count;
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

-- Child runs
-- ----------

-- Starts a child run of p_run at journal position p_position and journals it ('start': the
-- child's id), in one transaction. The child's id is derived from the parent and the position,
-- so a parent re-executed after a crash finds the same child instead of starting another.
-- Returns 'written', or 'fenced' when the caller no longer holds the claim.
CREATE FUNCTION durable.start_child(
    p_run uuid, p_attempt integer, p_position text, p_child jsonb
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_segment integer := durable.held_segment(p_run, p_attempt);
BEGIN
    IF v_segment IS NULL THEN
        RETURN 'fenced';
    END IF;
    PERFORM durable.create_runs(jsonb_build_array(p_child));
    INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, segment)
    VALUES (p_run, p_position, 'start', p_child ->> 'function',
            jsonb_build_object('run_id', p_child ->> 'id'), p_attempt, v_segment);
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
    v_segment integer := durable.held_segment(p_run, p_attempt);
BEGIN
    IF v_segment IS NULL THEN
        RETURN QUERY SELECT 'fenced'::text, NULL::text, NULL::jsonb, NULL::jsonb;
        RETURN;
    END IF;
    SELECT c.status, c.result, c.error INTO v_child FROM durable.runs c WHERE c.id = p_child;
    IF v_child.status IN ('completed', 'failed', 'cancelled') THEN
        INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, segment)
        VALUES (p_run, p_position, 'join', p_name,
                jsonb_build_object('run_id', p_child, 'status', v_child.status,
                                   'result', v_child.result, 'error', v_child.error),
                p_attempt, v_segment);
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

-- Schedules
-- ---------

-- Declares (or redeclares) a schedule. Its next tick is kept unless its cron expression or its
-- time zone changed, so a restart or a second worker neither skips nor repeats a tick.
CREATE FUNCTION durable.define_schedule(
    p_name text, p_function text, p_cron text, p_timezone text, p_input jsonb, p_catch_up text,
    p_next_tick timestamptz
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO durable.schedules (name, function, cron, timezone, input, catch_up, next_tick)
    VALUES (p_name, p_function, p_cron, p_timezone, p_input, p_catch_up, p_next_tick)
    ON CONFLICT (name) DO UPDATE
       SET next_tick = CASE WHEN durable.schedules.cron <> excluded.cron
                              OR durable.schedules.timezone <> excluded.timezone
                            THEN excluded.next_tick ELSE durable.schedules.next_tick END,
           function = excluded.function, cron = excluded.cron, timezone = excluded.timezone,
           input = excluded.input, catch_up = excluded.catch_up, updated_at = now();
$$;

-- Fires tick p_tick of schedule p_name if its next tick is still p_expected (compare and set:
-- of the workers that race for a tick, one moves it on), moving it to p_next and starting the
-- run p_run (a durable.create_runs object; its idempotency key names the tick). Returns the
-- run's id, or NULL when another worker fired the tick first.
CREATE FUNCTION durable.fire_schedule(
    p_name text, p_expected timestamptz, p_tick timestamptz, p_next timestamptz, p_run jsonb
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_run uuid;
BEGIN
    UPDATE durable.schedules s
       SET next_tick = p_next, last_tick = p_tick, updated_at = durable.clock()
     WHERE s.name = p_name AND s.next_tick = p_expected;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT c.run_id INTO v_run FROM durable.create_runs(jsonb_build_array(p_run)) c;
    UPDATE durable.schedules s SET last_run_id = v_run WHERE s.name = p_name;
    RETURN v_run;
END
$$;

-- Retention
-- ---------
-- A segment of a retention class is dropped once the class's retention has passed since it
-- closed. What it holds that must stay is carried forward first, by copy, into the class's open
-- segment: the runs durable.segment_keepers names, with their journal entries, and the events
-- durable.segment_event_keepers names. Nothing else is looked at row by row: the rest goes with
-- the partitions, so a drop costs the same whatever it removes.

-- Opens a new segment for each class whose open segment is older than the class's width (a
-- quarter of its retention: a class keeps five or six segments) and holds a run or an event
-- (an idle class keeps its one segment). Returns how many it opened.
CREATE FUNCTION durable.rotate_segments() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_classes interval[];
    v_class interval;
BEGIN
    -- Read whole first: a new partition cannot be made while a query reads the tables.
    SELECT coalesce(array_agg(s.retention ORDER BY s.id), '{}') INTO v_classes
      FROM durable.segments s
     WHERE s.closed_at IS NULL AND s.retention IS NOT NULL
       AND s.opened_at <= durable.clock() - s.retention / 4
       AND (EXISTS (SELECT 1 FROM durable.runs r WHERE r.segment = s.id)
            OR EXISTS (SELECT 1 FROM durable.events e WHERE e.segment = s.id));
    FOREACH v_class IN ARRAY v_classes LOOP
        PERFORM durable.add_segment(v_class);
    END LOOP;
    RETURN cardinality(v_classes);
END
$$;

-- The runs of segment p_segment that must outlive it, each with why: 'unfinished' (pending,
-- running, suspended or paused), 'recent' (finished less than the retention ago), 'family' (an
-- ancestor or a descendant is unfinished: a parent may still join a child, and a child's end
-- wakes its parent), 'forked' (a run that is kept, or in another segment, was forked from it).
CREATE FUNCTION durable.segment_keepers(p_segment integer)
RETURNS TABLE (run_id uuid, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    v_oldest timestamptz := durable.clock()
                            - (SELECT s.retention FROM durable.segments s WHERE s.id = p_segment);
    v_keep uuid[];
    v_more uuid[];
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.durable_keepers (run_id uuid PRIMARY KEY, reason text)
        ON COMMIT DROP;
    TRUNCATE pg_temp.durable_keepers;
    INSERT INTO pg_temp.durable_keepers
    SELECT r.id, CASE WHEN r.status IN ('pending', 'running', 'suspended', 'paused')
                      THEN 'unfinished' ELSE 'recent' END
      FROM durable.runs r
     WHERE r.segment = p_segment
       AND (r.status IN ('pending', 'running', 'suspended', 'paused')
            OR r.finished_at > v_oldest);
    -- Its own ancestors unfinished: walk up from the children of this segment.
    INSERT INTO pg_temp.durable_keepers
    WITH RECURSIVE chain (run_id, ancestor) AS (
        SELECT r.id, r.parent_id FROM durable.runs r
         WHERE r.segment = p_segment AND r.parent_id IS NOT NULL
        UNION
        SELECT c.run_id, p.parent_id
          FROM chain c JOIN durable.runs p ON p.id = c.ancestor
         WHERE p.parent_id IS NOT NULL
           AND p.status IN ('completed', 'failed', 'cancelled')
    )
    SELECT DISTINCT c.run_id, 'family' FROM chain c JOIN durable.runs p ON p.id = c.ancestor
     WHERE p.status IN ('pending', 'running', 'suspended', 'paused')
    ON CONFLICT DO NOTHING;
    -- A descendant unfinished: walk up from every unfinished child.
    INSERT INTO pg_temp.durable_keepers
    WITH RECURSIVE up (id) AS (
        SELECT r.parent_id FROM durable.runs r
         WHERE r.status IN ('pending', 'running', 'suspended', 'paused')
           AND r.parent_id IS NOT NULL
        UNION
        SELECT p.parent_id FROM up JOIN durable.runs p ON p.id = up.id
         WHERE p.parent_id IS NOT NULL
    )
    SELECT r.id, 'family' FROM up JOIN durable.runs r ON r.id = up.id
     WHERE r.segment = p_segment
    ON CONFLICT DO NOTHING;
    -- Forked from: by a run elsewhere, or by one kept here (a chain of forks: until no more).
    LOOP
        SELECT array_agg(k.run_id) INTO v_keep FROM pg_temp.durable_keepers k;
        INSERT INTO pg_temp.durable_keepers
        SELECT DISTINCT f.forked_from, 'forked' FROM durable.runs f
          JOIN durable.runs r ON r.id = f.forked_from AND r.segment = p_segment
         WHERE f.forked_from IS NOT NULL
           AND (f.segment <> p_segment OR f.id = ANY (coalesce(v_keep, '{}')))
        ON CONFLICT DO NOTHING;
        EXIT WHEN NOT FOUND;
    END LOOP;
    RETURN QUERY SELECT k.run_id, k.reason FROM pg_temp.durable_keepers k;
END
$$;

-- The events of segment p_segment that an unfinished run may still receive: sent after it
-- started (past its event cursor) and past every event it received on the same (name, key).
CREATE FUNCTION durable.segment_event_keepers(p_segment integer) RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    WITH open AS (
        SELECT r.id, r.event_cursor FROM durable.runs r
         WHERE r.status IN ('pending', 'running', 'suspended', 'paused')
    )
    SELECT e.id FROM durable.events e
     WHERE e.segment = p_segment
       AND e.id > (SELECT min(o.event_cursor) FROM open o)
       AND EXISTS (
           SELECT 1 FROM open o
            WHERE o.event_cursor < e.id
              AND NOT EXISTS (
                  SELECT 1 FROM durable.journal j
                   WHERE j.run_id = o.id AND j.kind = 'event' AND j.name = e.name
                     AND j.value ->> 'key' = e.key
                     AND (j.value ->> 'event_id')::bigint >= e.id));
$$;

-- Copies the journal entries of runs p_runs and the events p_events from segment p_from into
-- segment p_into, but those copied already (a second call copies what was written since).
CREATE FUNCTION durable.carry_forward(
    p_from integer, p_into integer, p_runs uuid[], p_events bigint[]
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO durable.journal (run_id, position, kind, name, value, error, attempt, created_at,
                                 started_at, duration_ms, timing, segment)
    SELECT j.run_id, j.position, j.kind, j.name, j.value, j.error, j.attempt, j.created_at,
           j.started_at, j.duration_ms, j.timing, p_into
      FROM durable.journal j JOIN unnest(p_runs) k (id) ON k.id = j.run_id
     WHERE j.segment = p_from
       AND NOT EXISTS (SELECT 1 FROM durable.journal c
                        WHERE c.run_id = j.run_id AND c.position = j.position
                          AND c.segment = p_into);
    INSERT INTO durable.events (id, name, key, payload, created_at, segment)
    SELECT e.id, e.name, e.key, e.payload, e.created_at, p_into
      FROM durable.events e JOIN unnest(p_events) k (id) ON k.id = e.id
     WHERE e.segment = p_from
       AND NOT EXISTS (SELECT 1 FROM durable.events c WHERE c.id = e.id AND c.segment = p_into);
$$;

-- The closed segments whose retention has passed since they closed, oldest first.
CREATE FUNCTION durable.due_segments() RETURNS SETOF integer
LANGUAGE sql STABLE AS $$
    SELECT s.id FROM durable.segments s
     WHERE s.dropped_at IS NULL AND s.closed_at IS NOT NULL AND s.retention IS NOT NULL
       AND s.closed_at + s.retention <= durable.clock()
     ORDER BY s.id;
$$;

-- Drops segment p_segment: carries its keepers forward into the open segment of its class, then
-- drops its partitions. The keepers are found, and their journal entries and events copied,
-- before the exclusive lock of the three tables (durable.lock_partitioned_tables; the copies
-- are seen by nobody until the commit); under it, only what changed meanwhile is copied, the
-- keepers' rows are moved (a run moved to another partition while another transaction waits
-- for its row would fail that transaction) and the partitions dropped. Returns what it did.
CREATE FUNCTION durable.drop_segment(p_segment integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_segment durable.segments%ROWTYPE;
    v_open integer;
    v_forks bigint;
    v_keep uuid[];
    v_events bigint[];
    v_runs bigint;
    v_bytes bigint;
    v_table text;
    v_report jsonb;
BEGIN
    SELECT * INTO v_segment FROM durable.segments s WHERE s.id = p_segment;
    IF NOT FOUND OR v_segment.dropped_at IS NOT NULL OR v_segment.closed_at IS NULL
       OR v_segment.retention IS NULL THEN
        RETURN NULL;
    END IF;
    v_open := durable.open_segment(v_segment.retention);
    SELECT count(*) INTO v_forks FROM durable.runs r WHERE r.forked_from IS NOT NULL;
    SELECT coalesce(array_agg(k.run_id), '{}') INTO v_keep
      FROM durable.segment_keepers(p_segment) k;
    SELECT coalesce(array_agg(e), '{}') INTO v_events
      FROM durable.segment_event_keepers(p_segment) e;
    SELECT count(*) INTO v_runs FROM durable.runs r WHERE r.segment = p_segment;
    SELECT sum(pg_total_relation_size(format('durable.%I', t || '_' || p_segment)))
      INTO v_bytes FROM unnest(ARRAY['runs', 'journal', 'events']) t;
    PERFORM durable.carry_forward(p_segment, v_open, v_keep, v_events);
    PERFORM durable.lock_partitioned_tables();
    -- Only a fork, made since the keepers were found, can add one: find them again then.
    IF (SELECT count(*) FROM durable.runs r WHERE r.forked_from IS NOT NULL) <> v_forks THEN
        SELECT coalesce(array_agg(DISTINCT k.id), '{}') INTO v_keep
          FROM (SELECT unnest(v_keep) UNION SELECT run_id FROM durable.segment_keepers(p_segment))
               k (id);
        SELECT coalesce(array_agg(DISTINCT k.id), '{}') INTO v_events
          FROM (SELECT unnest(v_events) UNION SELECT durable.segment_event_keepers(p_segment))
               k (id);
    END IF;
    PERFORM durable.carry_forward(p_segment, v_open, v_keep, v_events);
    UPDATE durable.runs r SET segment = v_open
      FROM unnest(v_keep) k (id)
     WHERE r.segment = p_segment AND r.id = k.id;
    FOREACH v_table IN ARRAY ARRAY['runs', 'journal', 'events'] LOOP
        EXECUTE format('DROP TABLE durable.%I', v_table || '_' || p_segment);
    END LOOP;
    v_report := jsonb_build_object(
        'segment', p_segment, 'into', v_open, 'runs_removed', v_runs - cardinality(v_keep),
        'runs_kept', cardinality(v_keep), 'events_kept', cardinality(v_events),
        'bytes', v_bytes);
    UPDATE durable.segments s SET dropped_at = durable.clock(), removed = v_report
     WHERE s.id = p_segment;
    RETURN v_report;
END
$$;
