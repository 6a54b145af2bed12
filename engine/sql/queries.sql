-- Named queries, read once by engine._queries and executed only by engine._store (and, for the
-- schema's bookkeeping, by engine._schema).
-- Each block starts with "-- name: <name>" and runs until the next one.

-- The schema's bookkeeping (engine._schema): which migrations and which version of
-- functions.sql a database got, each with the sha256 of the text applied.

-- name: schema_history
SELECT to_regclass('durable.schema_migrations') IS NOT NULL AS recorded,
       EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = to_regclass('durable.schema_migrations')
                  AND a.attname = 'checksum' AND NOT a.attisdropped) AS checksummed;

-- name: bootstrap_migrations
CREATE SCHEMA IF NOT EXISTS durable;
CREATE TABLE IF NOT EXISTS durable.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS durable.schema_functions (
    version     integer PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
SELECT pg_advisory_lock(hashtextextended('durable.migrations', 0));

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtextextended('durable.migrations', 0));

-- The same lock, held until the transaction ends: behind a transaction pooler, where migrate
-- runs in one transaction (engine._schema.migrate_pooled).
-- name: lock_migrations_in_transaction
SELECT pg_advisory_xact_lock(hashtextextended('durable.migrations', 0));

-- name: applied_migrations
SELECT version, name, checksum FROM durable.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO durable.schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: applied_functions
SELECT version, checksum FROM durable.schema_functions ORDER BY version DESC LIMIT 1;

-- name: record_functions
INSERT INTO durable.schema_functions (version, checksum) VALUES ($1, $2);

-- name: drop_functions
-- Every function of schema durable but trigger functions (a table needs those: they belong to
-- the migrations), so that running functions.sql next leaves exactly the functions it defines.
-- No CASCADE: should a table ever depend on a function, the drop fails instead of taking the
-- dependent object with it.
DO $$
DECLARE
    v_routine regprocedure;
BEGIN
    FOR v_routine IN SELECT p.oid::regprocedure FROM pg_proc p
                      WHERE p.pronamespace = 'durable'::regnamespace
                        AND p.prokind IN ('f', 'p')
                        AND p.prorettype <> 'trigger'::regtype LOOP
        EXECUTE format('DROP ROUTINE %s', v_routine);
    END LOOP;
END
$$;

-- name: create_runs
SELECT run_id, created FROM durable.create_runs($1::text::jsonb);

-- name: start_run
-- One fresh run (its id just made: nothing to look for or lock) with no idempotency key or
-- concurrency strategy, started in one statement rather than by durable.create_runs, whose
-- statements each pay their executor's start-up (most of a one-run start's database time): the
-- row durable.new_run makes of its options, given as parameters ($1 to $17: the values of the
-- JSON object create_runs would read, NULL for an option left at its default; durations in
-- seconds, made intervals of seconds as durable.new_run asks) rather than as JSON to parse,
-- in the open segment of its retention class ($18 seconds). No row when
-- that class has no open segment yet (the caller then calls create_runs, which opens one).
-- Given $19 (a worker; $20 to $23: its lease, functions, versions and pinned functions, as for
-- start_claimed), the run is inserted claimed when nothing stands in the way; workers are told
-- unless it was. The clock is read once (a CTE the planner keeps), as create_runs reads it.
WITH clock AS MATERIALIZED (
    SELECT durable.clock() AS now
), started AS (
    INSERT INTO durable.runs (id, function, input, idempotency_key, trace_context, available_at,
                              event_cursor, priority, expires_at, run_timeout, parent_id,
                              concurrency_key, concurrency_limit, slot_while_suspended,
                              rate_limit, rate_key, tags, queue, segment, status, attempt,
                              lease_owner, versions, pinned, started_at, deadline_at)
    SELECT w.id, w.function, w.input, w.idempotency_key, w.trace_context, w.available_at,
           w.event_cursor, w.priority, w.expires_at, w.run_timeout, w.parent_id,
           w.concurrency_key, w.concurrency_limit, w.slot_while_suspended, w.rate_limit,
           w.rate_key, w.tags, w.queue, w.segment, w.status, w.attempt, w.lease_owner,
           w.versions, w.pinned, w.started_at, w.deadline_at
      FROM clock c
      LEFT JOIN durable.open_segments() o
             ON o.retention IS NOT DISTINCT FROM make_interval(secs => $18),
           durable.new_run($1::text::uuid, $2, $3::text::jsonb, NULL, $4::text::jsonb, $5,
                           $6::text::timestamptz, make_interval(secs => $7),
                           make_interval(secs => $8), make_interval(secs => $9),
                           $10::text::uuid, $11, $12, $13, $14, $15, $16::text::jsonb, $17,
                           o.id, c.now, $19, $20, $21, $22, $23) w
     WHERE w.segment IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING id, status, function, input, attempt, trace_context, started_at, deadline_at,
              created_at
)
SELECT s.id, s.status = 'running' AS claimed, s.function, s.input, s.attempt, s.trace_context,
       s.started_at AS db_now, s.deadline_at, false AS forked, s.created_at,
       s.started_at AS due_at,
       CASE WHEN s.status = 'pending' THEN pg_notify('durable_work', '') IS NULL END AS told
  FROM started s;

-- start_run for the worker $19 that starts a run to run it itself (an eager start), as one flat
-- INSERT: durable.new_run's row as it is when the run is claimed at once, written out without
-- new_run's choice between a claimed and a waiting row, whose projection and nested joins cost
-- a tenth of the start's database time. The same parameters as start_run. No row when the run
-- would not be claimed (then it must not be inserted here) or its retention class has no open
-- segment: the caller then calls start_claimed. The claim's conditions and the row's columns
-- are new_run's: tests/integration/test_one_statement_start.py holds the two to the same row.
-- name: start_run_claimed
WITH clock AS MATERIALIZED (
    SELECT durable.clock() AS now
)
INSERT INTO durable.runs AS r (id, function, input, trace_context, available_at, event_cursor,
                               priority, expires_at, run_timeout, parent_id, concurrency_limit,
                               slot_while_suspended, rate_key, tags, queue, segment, status,
                               attempt, lease_owner, versions, pinned, started_at, deadline_at)
SELECT $1::text::uuid, $2, $3::text::jsonb, $4::text::jsonb, c.now + $20,
       (SELECT coalesce(max(e.id), 0) FROM durable.events e), coalesce($5::integer, 0),
       coalesce($6::text::timestamptz, c.now + make_interval(secs => $7), c.now)
           + make_interval(secs => $8),
       make_interval(secs => $9), $10::text::uuid, $12::integer, coalesce($13::boolean, false),
       coalesce($15, ''), coalesce($16::text::jsonb, '{}'), $17, o.id, 'running', 1, $19::text,
       ARRAY[coalesce(($22::text[])[array_position($21::text[], $2)], '')],
       $2 = ANY (coalesce($23::text[], '{}')), c.now, c.now + make_interval(secs => $9)
  FROM clock c
  JOIN durable.open_segments() o ON o.retention IS NOT DISTINCT FROM make_interval(secs => $18)
 WHERE $19::text IS NOT NULL AND $2 = ANY ($21::text[]) AND $11::text IS NULL
   AND $14::text IS NULL
   AND coalesce($6::text::timestamptz, c.now + make_interval(secs => $7), c.now) <= c.now
   AND (coalesce($6::text::timestamptz, c.now + make_interval(secs => $7), c.now)
            + make_interval(secs => $8) > c.now
        OR $8::float8 IS NULL)
ON CONFLICT DO NOTHING
RETURNING r.id, true AS claimed, r.function, r.input, r.attempt, r.trace_context,
          r.started_at AS db_now, r.deadline_at, false AS forked, r.created_at,
          r.started_at AS due_at;

-- name: start_claimed
SELECT run_id, created, id, function, input, attempt, trace_context, db_now, deadline_at, forked,
       created_at, due_at
  FROM durable.start_claimed($1::text::jsonb, $2, $3, $4, $5, $6);

-- name: claim_runs
SELECT id, function, input, attempt, trace_context, db_now, deadline_at, forked, created_at,
       due_at
  FROM durable.claim_runs($1, $2, $3, $4, $5, $6);

-- name: claim_due
SELECT id, function, input, attempt, trace_context, db_now, next_due, deadline_at, forked,
       created_at, due_at
  FROM durable.claim_due($1, $2, $3, $4, $5, $6, $7);

-- name: next_due
SELECT durable.next_due($1, $2), durable.clock();

-- name: retry_paused
SELECT durable.retry_paused($1, $2);

-- name: fork_run
SELECT durable.fork_run($1, $2, $3, $4, $5::text::jsonb, $6);

-- The journals of many runs at once (runs resumed together; durable check), each in the order
-- it was written.
-- name: load_journals
SELECT run_id, position, kind, name, value, error, attempt, created_at
  FROM durable.journal WHERE run_id = ANY ($1)
 ORDER BY run_id, created_at, position;

-- Runs to retry in bulk (durable runs retry --status): of the statuses $1, optionally of one
-- function ($2), created within $3 of now, and forked from by some run or not ($6), in id order
-- after $5 (NULL: from the first), at most $4.
-- name: select_runs
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at, priority, parent_id,
       concurrency_key, cancel_requested, deadline_at, expires_at, versions, pinned,
       forked_from, fork_position, tags, queue
  FROM durable.runs
 WHERE status = ANY ($1)
   AND ($2::text IS NULL OR function = $2)
   AND ($3::interval IS NULL OR created_at >= durable.clock() - $3)
   AND ($5::uuid IS NULL OR id > $5)
   AND ($6::boolean IS NULL
        OR $6 = EXISTS (SELECT 1 FROM durable.runs f WHERE f.forked_from = runs.id))
 ORDER BY id
 LIMIT $4;

-- Runs for durable check: of the statuses $1 in id order after $2 (NULL: from the first), at
-- most $3. Only columns of the first migration: the check runs before a deploy, against a
-- database the new code may not have migrated yet.
-- name: runs_to_check
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at
  FROM durable.runs
 WHERE status = ANY ($1) AND ($2::uuid IS NULL OR id > $2)
 ORDER BY id
 LIMIT $3;

-- The runs completed last (durable check --include-completed), as runs_to_check: at most $1
-- after the first $2 of them.
-- name: recent_completed
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at
  FROM durable.runs
 WHERE status = 'completed'
 ORDER BY finished_at DESC, id
 LIMIT $1 OFFSET $2;

-- What each version of each function has in flight: runs by function, the version they
-- started on (NULL: not started yet) and status, unfinished ones and the rest.
-- name: list_versions
SELECT function, versions[1] AS version, status, count(*) AS runs, max(updated_at) AS latest
  FROM durable.runs
 GROUP BY function, versions[1], status
 ORDER BY function, version NULLS FIRST, status;

-- name: renew_claims
SELECT id, cancel_requested FROM durable.renew_claims($1, $2, $3, $4);

-- name: load_journal
SELECT position, kind, name, value, error, attempt, created_at
  FROM durable.journal WHERE run_id = $1
 ORDER BY created_at, position;

-- The journal as people read it: load_journal with when each step ran and each wait began.
-- name: read_journal
SELECT position, kind, name, value, error, attempt, created_at, started_at, duration_ms, timing
  FROM durable.journal WHERE run_id = $1
 ORDER BY created_at, position;

-- name: append_entries
SELECT outcome FROM durable.append_entries($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: append_sleep
SELECT durable.append_sleep($1, $2, $3, $4, $5, $6);

-- name: await_event
SELECT outcome, payload, timeout_at FROM durable.await_event($1, $2, $3, $4, $5, $6);

-- name: send_event
SELECT durable.send_event($1, $2, $3, $4);

-- name: suspend_run
SELECT durable.suspend_run($1, $2, $3);

-- name: finish_runs
SELECT finished FROM durable.finish_runs($1, $2, $3, $4, $5);

-- name: release_run
SELECT durable.release_run($1, $2);

-- name: resume_run
SELECT durable.resume_run($1);

-- name: get_run
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at, priority, parent_id,
       concurrency_key, cancel_requested, deadline_at, expires_at, versions, pinned,
       forked_from, fork_position, tags, queue
  FROM durable.runs WHERE id = $1;

-- get_run for a caller that will await the run's end, recording its process $2 in
-- durable.result_waiters in the same statement (at most every 20 s while it awaits:
-- durable.announce_ends announces ends while a waiter was seen in the last minute).
-- name: get_run_recording_waiter
WITH recorded AS (
    INSERT INTO durable.result_waiters (id, seen) VALUES ($2, now())
    ON CONFLICT (id) DO UPDATE SET seen = excluded.seen
)
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at, priority, parent_id,
       concurrency_key, cancel_requested, deadline_at, expires_at, versions, pinned,
       forked_from, fork_position, tags, queue
  FROM durable.runs WHERE id = $1;

-- Runs matching a filter, newest first, a page of at most $12 after the keyset ($10, $11):
-- status $1, function $2, queue $3, version started on $4, tags containing $5, created in
-- [$6, $7), and $8/$9 a search: run id $8, or idempotency key or any tag value (jsonpath $9).
-- NULL leaves a condition out. (The planner folds each NULL away: a custom plan per call, as
-- PostgreSQL keeps for statements whose generic plan would be costlier.) tags <> '{}' lets
-- the tag conditions use the partial index runs_tags.
-- name: find_runs
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at, priority, parent_id,
       concurrency_key, cancel_requested, deadline_at, expires_at, versions, pinned,
       forked_from, fork_position, tags, queue
  FROM durable.runs
 WHERE ($1::text IS NULL OR status = $1)
   AND ($2::text IS NULL OR function = $2)
   AND ($3::text IS NULL OR queue = $3)
   AND ($4::text IS NULL OR versions[1] = $4)
   AND ($5::jsonb IS NULL OR (tags <> '{}' AND tags @> $5))
   AND ($6::timestamptz IS NULL OR created_at >= $6)
   AND ($7::timestamptz IS NULL OR created_at < $7)
   AND ($8::uuid IS NULL OR id = $8)
   AND ($9::text IS NULL OR idempotency_key = $9 OR (tags <> '{}' AND tags @@ $13::jsonpath))
   AND ($10::timestamptz IS NULL OR (created_at, id) < ($10, $11::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $12;

-- How many runs match a filter (find_runs' $2-$9 and $13 as $1-$9), by status, counting at
-- most $10 of each status: the counts stay cheap at any size ("10,000+").
-- name: count_runs
SELECT s.status, (SELECT count(*) FROM (
           SELECT 1 FROM durable.runs
            WHERE status = s.status
              AND ($1::text IS NULL OR function = $1)
              AND ($2::text IS NULL OR queue = $2)
              AND ($3::text IS NULL OR versions[1] = $3)
              AND ($4::jsonb IS NULL OR (tags <> '{}' AND tags @> $4))
              AND ($5::timestamptz IS NULL OR created_at >= $5)
              AND ($6::timestamptz IS NULL OR created_at < $6)
              AND ($7::uuid IS NULL OR id = $7)
              AND ($8::text IS NULL OR idempotency_key = $8
                   OR (tags <> '{}' AND tags @@ $9::jsonpath))
            LIMIT $10) c) AS runs
  FROM unnest(ARRAY['pending', 'running', 'suspended', 'paused', 'completed', 'failed',
                    'cancelled']) AS s (status);

-- What each queue holds (the view durable.queue_depths, migration 0004), and now.
-- name: queue_depths
SELECT queue, pending, scheduled, running, oldest_pending, now() AS now
  FROM durable.queue_depths
 ORDER BY pending DESC, queue NULLS FIRST;

-- Retention (functions.sql, "Retention"): one cleaner at a time across every process, each
-- step in a transaction of its own that takes this lock first and gives up when it is taken.
-- name: try_cleanup_lock
SELECT pg_try_advisory_xact_lock(hashtextextended('durable.retention', 19));

-- The open segments of the retention classes $1 (NULL: for ever), opened when missing: a
-- connecting app opens its own, so that no start has to.
-- name: open_segments
SELECT durable.open_segment(r) FROM unnest($1::interval[]) r;

-- name: rotate_segments
SELECT durable.rotate_segments();

-- name: due_segments
SELECT coalesce(array_agg(d), '{}') FROM durable.due_segments() d;

-- name: drop_segment
SELECT durable.drop_segment($1)::text;

-- Every segment not dropped yet (its size, what it holds, what keeps a closed one of a class
-- with retention), then the last $1 dropped (what each removed), newest first.
-- name: retention_status
SELECT s.id, s.retention, s.opened_at, s.closed_at, s.dropped_at,
       s.closed_at + s.retention AS due_at,
       (SELECT sum(pg_total_relation_size(format('durable.%I', t || '_' || s.id)::regclass))
          FROM unnest(ARRAY['runs', 'journal', 'events']) t)::bigint AS bytes,
       (SELECT count(*) FROM durable.runs r WHERE r.segment = s.id) AS runs,
       (SELECT count(*) FROM durable.events e WHERE e.segment = s.id) AS events,
       CASE WHEN s.closed_at IS NOT NULL AND s.retention IS NOT NULL THEN
           (SELECT coalesce(jsonb_object_agg(k.reason, k.n), '{}')::text
              FROM (SELECT reason, count(*) AS n FROM durable.segment_keepers(s.id)
                     GROUP BY reason) k)
       END AS kept,
       CASE WHEN s.closed_at IS NOT NULL AND s.retention IS NOT NULL THEN
           (SELECT count(*) FROM durable.segment_event_keepers(s.id))
       END AS events_kept,
       NULL::text AS removed
  FROM durable.segments s
 WHERE s.dropped_at IS NULL
UNION ALL
(SELECT s.id, s.retention, s.opened_at, s.closed_at, s.dropped_at,
        s.closed_at + s.retention, NULL, NULL, NULL, NULL, NULL, s.removed::text
   FROM durable.segments s
  WHERE s.dropped_at IS NOT NULL
  ORDER BY s.id DESC
  LIMIT $1)
 ORDER BY 1;

-- name: count_suspended
SELECT count(*) FROM durable.runs WHERE status = 'suspended';

-- Concurrency keys holding or awaiting slots, the busiest first, at most $1.
-- name: busy_keys
SELECT concurrency_key AS key, max(concurrency_limit) AS "limit",
       count(*) FILTER (WHERE holds_slot) AS holding,
       count(*) FILTER (WHERE awaiting_slot) AS awaiting
  FROM durable.runs
 WHERE concurrency_key IS NOT NULL AND (holds_slot OR awaiting_slot)
 GROUP BY concurrency_key
 ORDER BY count(*) DESC, concurrency_key
 LIMIT $1;

-- Each rate limit and the units granted in its current window (all keys together).
-- name: rate_usage
SELECT l.name, l.budget, l.period,
       (SELECT coalesce(sum(g.weight), 0) FROM durable.rate_grants g
         WHERE g.name = l.name AND g.granted_at > durable.clock() - l.period
           AND g.granted_at <= durable.clock()) AS used
  FROM durable.rate_limits l
 ORDER BY l.name;

-- The events sent last, newest first, at most $1, with the start of each payload.
-- name: recent_events
SELECT id, name, key, left(payload::text, 200) AS payload, created_at
  FROM durable.events
 ORDER BY id DESC
 LIMIT $1;

-- A process watching runs live says it still is (every 20 s; durable.notify_journal announces
-- appends while one was seen in the last minute), or that it stopped.
-- name: touch_watcher
INSERT INTO durable.watchers (id, seen) VALUES ($1, now())
ON CONFLICT (id) DO UPDATE SET seen = excluded.seen;

-- name: end_watcher
DELETE FROM durable.watchers WHERE id = $1 OR seen < now() - interval '1 hour';

-- A process with a caller awaiting a run's end closed (get_run_recording_waiter records it).
-- name: end_result_waiter
DELETE FROM durable.result_waiters WHERE id = $1 OR seen < now() - interval '1 hour';

-- name: list_children
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at, priority, parent_id,
       concurrency_key, cancel_requested, deadline_at, expires_at, versions, pinned,
       forked_from, fork_position, tags, queue
  FROM durable.runs WHERE parent_id = $1
 ORDER BY created_at, id;

-- name: start_child
SELECT durable.start_child($1, $2, $3, $4);

-- name: await_child
SELECT outcome, status, result, error FROM durable.await_child($1, $2, $3, $4, $5);

-- name: cancel_run
SELECT durable.cancel_run($1, $2);

-- name: define_rate_limit
SELECT durable.define_rate_limit($1, $2, $3);

-- name: take_rate
SELECT durable.take_rate($1, $2, $3, $4);

-- name: define_schedule
SELECT durable.define_schedule($1, $2, $3, $4, $5::text::jsonb, $6, $7);

-- name: list_schedules
SELECT name, function, cron, timezone, input, catch_up, next_tick, last_tick, last_run_id
  FROM durable.schedules
 WHERE $1::text[] IS NULL OR name = ANY ($1)
 ORDER BY name;

-- name: fire_schedule
SELECT durable.fire_schedule($1, $2, $3, $4, $5);

-- name: now
SELECT durable.clock();

-- name: list_waits
SELECT position, name, key, timeout_at, created_at
  FROM durable.waits WHERE run_id = $1 ORDER BY position;

-- name: load_waits
SELECT run_id, position, name, key, timeout_at
  FROM durable.waits WHERE run_id = ANY ($1) ORDER BY run_id, position;

-- name: set_fake_time
SELECT set_config('durable.fake_now', $1, false);

-- The call a caller may make on its own connection, inside its own transaction, besides
-- create_runs (which takes its JSON as text too): the caller's connection has no codec of ours.
-- name: send_event_on
SELECT durable.send_event($1, $2, $3::text::jsonb, $4);

-- The databases of a server whose names match $1 (a LIKE pattern): the simulation databases
-- durable.testing made (engine._server).
-- name: list_databases
SELECT datname FROM pg_database WHERE datname LIKE $1 ORDER BY datname;

-- Empties a database of durable's, for a simulation to start over, in one round trip, whatever
-- tables the migrations made: every row of every table of schema durable but the schema's own
-- records (schema_migrations, schema_functions) and its segments (each one a partition of the
-- tables, which stay, emptied) is deleted, referencing tables first; a table
-- whose trigger refuses DELETE (the append-only journal) is truncated instead; every sequence
-- starts again at 1, so that event ids repeat from one simulation to the next. DELETE, not
-- TRUNCATE, for the rest: the tables are small, and a TRUNCATE makes new files for each table
-- and index (4-9 ms this way, 15-60 ms truncating every table, on PostgreSQL 15 and 18 alike).
-- Only durable.testing calls it (PostgresStore.empty), on databases it made.
-- name: empty_database
DO $$
DECLARE
    v_table regclass;
    v_sequence regclass;
BEGIN
    FOR v_table IN
        SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'durable' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND c.relname NOT LIKE 'schema\_%' AND c.relname <> 'segments'
         ORDER BY EXISTS (SELECT 1 FROM pg_constraint f
                           WHERE f.conrelid = c.oid AND f.contype = 'f') DESC
    LOOP
        IF EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = v_table AND NOT g.tgisinternal)
        THEN
            EXECUTE format('TRUNCATE %s', v_table);
        ELSE
            EXECUTE format('DELETE FROM %s', v_table);
        END IF;
    END LOOP;
    FOR v_sequence IN
        SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'durable' AND c.relkind = 'S'
    LOOP
        PERFORM setval(v_sequence, 1, false);
    END LOOP;
END
$$;
