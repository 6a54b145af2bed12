-- Migration 0008: cron schedules (durable.schedules), fired exactly once per tick.

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
