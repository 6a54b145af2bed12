-- Migration 0006: durable.claim_due, a claim and the next due time in one round trip.

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
