-- Migration 0004: durable.append_entries, the journal appends of many runs in one statement.

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
