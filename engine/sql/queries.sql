-- Named queries, read once by engine._queries and executed only by engine._store.
-- Each block starts with "-- name: <name>" and runs until the next one.

-- name: bootstrap_migrations
CREATE SCHEMA IF NOT EXISTS durable;
CREATE TABLE IF NOT EXISTS durable.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
SELECT pg_advisory_lock(hashtextextended('durable.migrations', 0));

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtextextended('durable.migrations', 0));

-- name: applied_migrations
SELECT version FROM durable.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO durable.schema_migrations (version, name) VALUES ($1, $2);

-- name: start_run
SELECT run_id, created FROM durable.start_run($1, $2, $3, $4, $5);

-- name: start_runs
SELECT run_id, created FROM durable.start_runs($1, $2, $3, $4, $5);

-- name: claim_runs
SELECT id, function, input, attempt, trace_context, db_now
  FROM durable.claim_runs($1, $2, $3, $4);

-- name: claim_due
SELECT id, function, input, attempt, trace_context, db_now, next_due
  FROM durable.claim_due($1, $2, $3, $4);

-- name: next_due
SELECT durable.next_due($1), durable.clock();

-- name: renew_leases
SELECT durable.renew_leases($1, $2, $3, $4);

-- name: load_journal
SELECT position, kind, name, value, error, attempt, created_at
  FROM durable.journal WHERE run_id = $1
 ORDER BY created_at, position;

-- name: append_entries
SELECT outcome FROM durable.append_entries($1, $2, $3, $4, $5, $6, $7);

-- name: append_sleep
SELECT durable.append_sleep($1, $2, $3, $4, $5, $6);

-- name: await_event
SELECT outcome, payload, timeout_at FROM durable.await_event($1, $2, $3, $4, $5, $6);

-- name: send_event
SELECT durable.send_event($1, $2, $3);

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
       result, error, created_at, started_at, updated_at, finished_at
  FROM durable.runs WHERE id = $1;

-- name: list_runs
SELECT id, function, input, status, idempotency_key, attempt, available_at, lease_owner,
       result, error, created_at, started_at, updated_at, finished_at
  FROM durable.runs
 WHERE ($1::text IS NULL OR status = $1)
 ORDER BY created_at DESC
 LIMIT $2;

-- name: list_waits
SELECT position, name, key, timeout_at FROM durable.waits WHERE run_id = $1 ORDER BY position;

-- name: set_fake_time
SELECT set_config('durable.fake_now', $1, false);

-- The two calls a caller may make on its own connection, inside its own transaction. JSON goes
-- as text: the caller's connection has no codec of ours.
-- name: start_run_on
SELECT run_id, created FROM durable.start_run($1, $2, $3::text::jsonb, $4, $5::text::jsonb);

-- name: send_event_on
SELECT durable.send_event($1, $2, $3::text::jsonb);
