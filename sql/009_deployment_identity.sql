-- The identity of this event store, which every Redis generation records so that
-- read models built from another store (another deployment, or an earlier life of
-- this database: dropped and re-created, restored from a dump) are never adopted or
-- served (docs/read-models.md, "Identity").
--
-- The deployment id is created once, here. A dump carries it along, so the identity
-- also names the cluster (its system identifier) and the database (its OID), which
-- a restore or a re-creation does not keep.

CREATE TABLE deployment_identity (
	singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	deployment_id uuid NOT NULL DEFAULT gen_random_uuid(),
	created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO deployment_identity DEFAULT VALUES;

REVOKE ALL ON deployment_identity FROM PUBLIC;
GRANT SELECT ON deployment_identity TO daybook_command, daybook_projector, daybook_query;

-- "<system identifier>-<database oid>-<deployment id>". pg_control_system() and
-- pg_database are readable by every role.
CREATE FUNCTION daybook_store_identity() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
	SELECT s.system_identifier::text || '-' || d.oid::text || '-' || i.deployment_id::text
	FROM pg_control_system() s, pg_database d, deployment_identity i
	WHERE d.datname = current_database()
$$;

REVOKE ALL ON FUNCTION daybook_store_identity() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION daybook_store_identity()
	TO daybook_command, daybook_projector, daybook_query;
