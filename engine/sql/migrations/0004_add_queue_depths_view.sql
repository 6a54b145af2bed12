-- Migration 0004: the autoscaling signal as a view, for the SQL a monitoring system runs.
--
-- durable.queue_depths: one row per queue with runs pending or running (queue NULL: runs
-- started by code that does not declare their function).
--   pending         runs due to start now: what a new worker would take
--   scheduled       runs not due yet (a delay, a start time, a rate limit's reservation)
--   running         runs a worker holds
-- (A run awaiting a concurrency slot counts in none: another worker would not start it.)
--   oldest_pending  when the oldest due run was created (its age is the queue's lag)
-- The same numbers are the worker's metrics durable_queue_pending and
-- durable_queue_oldest_pending_age_seconds, `durable queues` and the dashboard's capacity
-- page. It reads the index runs_status_created only.

CREATE VIEW durable.queue_depths AS
SELECT r.queue,
       count(*) FILTER (WHERE r.status = 'pending' AND r.available_at <= now()) AS pending,
       count(*) FILTER (WHERE r.status = 'pending' AND r.available_at > now()) AS scheduled,
       count(*) FILTER (WHERE r.status = 'running') AS running,
       min(r.created_at) FILTER (WHERE r.status = 'pending' AND r.available_at <= now())
           AS oldest_pending
  FROM durable.runs r
 WHERE r.status IN ('pending', 'running')
 GROUP BY r.queue;
