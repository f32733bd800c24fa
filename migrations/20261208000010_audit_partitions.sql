-- The audit trail kept seven years (issue 34, item 6): audit_events is
-- partitioned by month of recorded_at; months past a hot window are archived
-- to files (clinflow-audit-sink archive) and, past AUDIT_LOG_RETENTION_DAYS
-- (never less than 2,555 days), dropped, oldest first.
--
-- Why recorded_at: a partition must hold a contiguous run of seq that ends
-- on a head the sink signed, so that an archive verifies on its own and the
-- chain left in the table starts where the archive ended. recorded_at is
-- given by audit_events_recorded_at() below: one value per transaction (a
-- sink's batch never straddles two months), taken after the sink holds the
-- chain's lock and never earlier than the newest row's, so it never goes
-- down as seq goes up. occurred_at is the producer's clock and may.
--
-- The conversion carries every column the table has at this point, whatever
-- migrations before this one added (columns, defaults, CHECK and NOT NULL
-- constraints, comments, non-unique indexes and table grants are read from
-- the catalog, not listed here).
--
-- What changes for uniqueness: a partitioned table's unique keys must hold
-- the partition key, so the primary key is (seq, recorded_at) and event_id
-- is indexed, not unique. Both stay unique as before because only the sink
-- appends, under one advisory lock, skipping event_ids already stored
-- (chain::append), and verify reports any repeated or missing seq.

-- 1. recorded_at, monotonic with seq.
CREATE FUNCTION audit_events_recorded_at() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    cached text := current_setting('clinflow.audit_recorded_at', true);
    at     timestamptz;
BEGIN
    IF cached IS NOT NULL AND cached <> '' THEN
        RETURN cached::timestamptz;
    END IF;
    at := greatest(clock_timestamp(),
                   (SELECT a.recorded_at FROM public.audit_events a ORDER BY a.recorded_at DESC LIMIT 1));
    -- The same value for every later row of this transaction (is_local).
    PERFORM set_config('clinflow.audit_recorded_at', at::text, true);
    RETURN at;
END
$$;
COMMENT ON FUNCTION audit_events_recorded_at() IS
    'Default of audit_events.recorded_at: the clock at the first row of the transaction, never earlier than the newest row';

-- 2. The partitioned table, shaped like the old one.
ALTER TABLE audit_events RENAME TO audit_events_unpartitioned;
CREATE TABLE audit_events (LIKE audit_events_unpartitioned INCLUDING ALL EXCLUDING INDEXES)
    PARTITION BY RANGE (recorded_at);
ALTER TABLE audit_events ALTER COLUMN recorded_at SET DEFAULT audit_events_recorded_at();

-- 3. Append-only, on the table and on every partition. Statement triggers on
-- a partitioned table fire only for statements naming it, not for those
-- naming a partition, so each partition gets its own (created with it, by
-- audit_events_create_partition); the row triggers are cloned by PostgreSQL
-- onto every partition however it was created, so UPDATE and DELETE of a
-- row are refused even on a partition made by hand (TRUNCATE has no row
-- trigger: audit_events_ensure_partitions() adds the statement trigger to
-- any partition lacking it).
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only;
CREATE TRIGGER audit_events_append_only_rows
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only_rows;

-- 4. One month's partition, named audit_events_YYYY_MM, bounds in UTC, with
-- its statement trigger. No grants: the services reach rows through
-- audit_events only, so a partition named directly refuses them outright.
-- Not callable by the services (see audit_events_ensure_partitions).
CREATE FUNCTION audit_events_create_partition(for_month date) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first timestamptz := make_timestamptz(extract(year FROM for_month)::int, extract(month FROM for_month)::int, 1, 0, 0, 0, 'UTC');
    name  text := 'audit_events_' || to_char(for_month, 'YYYY_MM');
BEGIN
    IF to_regclass('public.' || quote_ident(name)) IS NULL THEN
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.audit_events FOR VALUES FROM (%L) TO (%L)',
                       name, first, first + interval '1 month');
    END IF;
    PERFORM public.audit_events_protect_partition(name);
    RETURN name;
END
$$;
REVOKE ALL ON FUNCTION audit_events_create_partition(date) FROM PUBLIC;

CREATE FUNCTION audit_events_protect_partition(name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = ('public.' || quote_ident(name))::regclass
                     AND tgname = 'audit_events_append_only') THEN
        EXECUTE format('CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON public.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION public.audit_events_refuse_change()', name);
    END IF;
    EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_append_only', name);
    EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_append_only_rows', name);
END
$$;
REVOKE ALL ON FUNCTION audit_events_protect_partition(text) FROM PUBLIC;

-- 5. What the sink calls, ahead of need (at start and hourly): this month's
-- and next month's partitions (UTC, by the database's clock), and the
-- statement trigger on any partition lacking it. SECURITY DEFINER so that
-- the sink needs no DDL right; it takes no argument, so whoever holds the
-- sink's role can make it create nothing but those two months.
CREATE FUNCTION audit_events_ensure_partitions() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    this_month date := date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')::date;
    created    integer := 0;
    part       record;
BEGIN
    -- Two sinks at once: one creates, the other then finds them.
    PERFORM pg_advisory_xact_lock(hashtext('clinflow audit partitions'));
    FOR m IN 0..1 LOOP
        IF to_regclass('public.audit_events_' || to_char(this_month + make_interval(months => m), 'YYYY_MM')) IS NULL THEN
            PERFORM public.audit_events_create_partition((this_month + make_interval(months => m))::date);
            created := created + 1;
        END IF;
    END LOOP;
    FOR part IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'public.audit_events'::regclass
                  AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                                  WHERE t.tgrelid = c.oid AND t.tgname = 'audit_events_append_only'
                                    AND t.tgenabled = 'A')
    LOOP
        PERFORM public.audit_events_protect_partition(part.relname);
    END LOOP;
    RETURN created;
END
$$;
REVOKE ALL ON FUNCTION audit_events_ensure_partitions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_events_ensure_partitions() TO clinflow_sink;

-- 6. The rows, month by month. recorded_at was now() (the transaction's
-- start): a batch that waited for the chain's lock could carry an earlier
-- time than the batch before it. Each row takes the latest recorded_at up
-- to its seq, which moves a row later by at most that wait and keeps every
-- batch whole (recorded_at is in no hash or signature).
DO $$
DECLARE
    oldest      date;
    this_month  date := date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')::date;
    columns     text;
    expressions text;
    copied      bigint;
    before      bigint;
    grant_row   record;
    index_row   record;
BEGIN
    SELECT date_trunc('month', min(recorded_at) AT TIME ZONE 'UTC')::date INTO oldest FROM audit_events_unpartitioned;
    oldest := coalesce(least(oldest, this_month), this_month);
    WHILE oldest <= this_month + interval '1 month' LOOP
        PERFORM audit_events_create_partition(oldest);
        oldest := (oldest + interval '1 month')::date;
    END LOOP;

    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum),
           string_agg(CASE WHEN attname = 'recorded_at'
                           THEN 'max(recorded_at) OVER (ORDER BY seq)'
                           ELSE quote_ident(attname) END, ', ' ORDER BY attnum)
      INTO columns, expressions
      FROM pg_attribute
     WHERE attrelid = 'audit_events_unpartitioned'::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format('INSERT INTO audit_events (%s) SELECT %s FROM audit_events_unpartitioned', columns, expressions);
    GET DIAGNOSTICS copied = ROW_COUNT;
    SELECT count(*) INTO before FROM audit_events_unpartitioned;
    IF copied <> before THEN
        RAISE EXCEPTION 'audit_events: % rows copied of %', copied, before;
    END IF;

    -- The table's grants, as they were.
    FOR grant_row IN
        SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
          FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
         WHERE c.oid = 'audit_events_unpartitioned'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON audit_events TO %s', grant_row.privilege_type, grant_row.grantee);
    END LOOP;

    -- Non-unique indexes, as they were (built once the rows are in); the
    -- unique ones are the primary key and event_id, handled here.
    CREATE TEMP TABLE audit_events_index_defs ON COMMIT DROP AS
        SELECT pg_get_indexdef(i.indexrelid) AS def, x.relname AS name, i.indisunique AS is_unique,
               i.indisprimary AS is_primary
          FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
         WHERE i.indrelid = 'audit_events_unpartitioned'::regclass;
    IF EXISTS (SELECT 1 FROM audit_events_index_defs
               WHERE is_unique AND NOT is_primary AND def NOT LIKE '%USING btree (event_id)') THEN
        RAISE EXCEPTION 'audit_events has a unique index this migration does not know how to partition';
    END IF;
    DROP TABLE audit_events_unpartitioned;
    FOR index_row IN SELECT def, name FROM audit_events_index_defs WHERE NOT is_unique LOOP
        EXECUTE replace(index_row.def, '.audit_events_unpartitioned USING', '.audit_events USING');
    END LOOP;
END
$$;
ALTER TABLE audit_events ADD PRIMARY KEY (seq, recorded_at);
-- The disclosures written with the events (20261208000001) keep the event
-- row's own recorded_at: the same value, cached for the transaction.
ALTER TABLE audit_disclosures ALTER COLUMN recorded_at SET DEFAULT audit_events_recorded_at();
CREATE INDEX audit_events_event_id_idx ON audit_events (event_id);
-- The newest row by recorded_at reads the last partition only.
CREATE INDEX audit_events_recorded_at_idx ON audit_events (recorded_at);

-- 7. What was archived, month by month: written by `clinflow-audit-sink
-- archive` once the archive file verified; the last row's hash and the
-- sink's signature of it (the partition's last row is a signed head) are
-- where the chain left in the table starts once the month is dropped, and
-- verify checks that signature with the public keys.
CREATE TABLE audit_archives (
    month          date PRIMARY KEY CHECK (month = date_trunc('month', month)::date),
    first_seq      bigint NOT NULL,
    last_seq       bigint NOT NULL,
    row_count      bigint NOT NULL CHECK (row_count = last_seq - first_seq + 1),
    last_row_hash  bytea NOT NULL,
    head_key_id    text NOT NULL,
    head_signature bytea NOT NULL,
    file_name      text NOT NULL,
    file_sha256    text NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    -- Set by audit_events_drop_partition only.
    dropped_at     timestamptz
);
CREATE FUNCTION audit_archives_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_archives is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_archives_append_only
    BEFORE DELETE OR TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION audit_archives_refuse_change();
ALTER TABLE audit_archives ENABLE ALWAYS TRIGGER audit_archives_append_only;
GRANT SELECT, INSERT ON audit_archives TO clinflow_sink;
GRANT SELECT ON audit_archives TO clinflow_audit_reader;

-- 8. Dropping a month: only the oldest partition, only once it is archived
-- (its rows exactly those the archive record names; a month without rows
-- needs none) and only when the month
-- ended at least retention_days ago, never fewer than 2,555 (seven years).
-- SECURITY DEFINER, for the sink's `archive --drop`: whoever holds the
-- sink's role could at worst drop the oldest month past seven years that an
-- archive record (which that role may insert) describes.
CREATE FUNCTION audit_events_drop_partition(for_month date, retention_days integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first    timestamptz := make_timestamptz(extract(year FROM for_month)::int, extract(month FROM for_month)::int, 1, 0, 0, 0, 'UTC');
    name     text := 'audit_events_' || to_char(for_month, 'YYYY_MM');
    archived public.audit_archives%ROWTYPE;
    present record;
    older   integer;
BEGIN
    IF retention_days IS NULL OR retention_days < 2555 THEN
        RAISE EXCEPTION 'audit retention must be at least 2555 days (seven years), not %', retention_days
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF first + interval '1 month' + make_interval(days => retention_days) > clock_timestamp() THEN
        RAISE EXCEPTION 'audit month % is younger than % days', to_char(for_month, 'YYYY-MM'), retention_days
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF to_regclass('public.' || quote_ident(name)) IS NULL THEN
        RAISE EXCEPTION 'no audit partition %', name;
    END IF;
    SELECT count(*) INTO older FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'public.audit_events'::regclass AND c.relname < name;
    IF older > 0 THEN
        RAISE EXCEPTION 'audit partition % is not the oldest: drop the older months first', name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('SELECT count(*) AS n, min(seq) AS first_seq, max(seq) AS last_seq, '
                   '(SELECT row_hash FROM public.%I ORDER BY seq DESC LIMIT 1) AS last_row_hash FROM public.%I',
                   name, name)
       INTO present;
    SELECT * INTO archived FROM public.audit_archives a WHERE a.month = date_trunc('month', for_month)::date;
    IF present.n = 0 AND NOT FOUND THEN
        -- A month without events: nothing to archive.
        EXECUTE format('DROP TABLE public.%I', name);
        RETURN 0;
    END IF;
    IF NOT FOUND OR archived.dropped_at IS NOT NULL THEN
        RAISE EXCEPTION 'audit month % has no archive record', to_char(for_month, 'YYYY-MM')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF present.n <> archived.row_count OR present.first_seq IS DISTINCT FROM archived.first_seq
       OR present.last_seq IS DISTINCT FROM archived.last_seq OR present.last_row_hash IS DISTINCT FROM archived.last_row_hash THEN
        RAISE EXCEPTION 'audit partition % does not hold what its archive holds', name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('DROP TABLE public.%I', name);
    UPDATE public.audit_archives a SET dropped_at = clock_timestamp() WHERE a.month = archived.month;
    RETURN present.n;
END
$$;
REVOKE ALL ON FUNCTION audit_events_drop_partition(date, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_events_drop_partition(date, integer) TO clinflow_sink;
