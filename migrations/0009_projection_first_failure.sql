-- A projection's first recorded failure, read with a snapshot of its own. A batch locks its
-- projection's checkpoint and reads this in one statement; when the lock was held by another
-- runner that recorded a failure and committed, the statement's own snapshot (taken before it
-- waited) would not show that failure, and the batch would apply the event past it. A
-- VOLATILE SQL function is not inlined and takes a new snapshot for its query (READ
-- COMMITTED), which the lateral join runs only once the checkpoint is locked.
CREATE FUNCTION projection_first_failure(projection text)
    RETURNS TABLE ("position" bigint, error text, failed_at timestamptz)
    LANGUAGE sql VOLATILE
AS
$$
SELECT f.position, f.error, f.failed_at
FROM public.projection_failures f
WHERE f.name = projection
ORDER BY f.position
LIMIT 1 FOR SHARE
$$;
