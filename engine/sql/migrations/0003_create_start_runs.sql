-- Migration 0003: durable.start_runs, many runs started in one statement (App.start_many).

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
