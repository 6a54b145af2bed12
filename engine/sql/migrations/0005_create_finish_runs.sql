-- Migration 0005: durable.finish_runs, the completions of many runs in one statement.

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
