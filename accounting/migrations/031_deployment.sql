-- The deployment's identity: one random id, made when this database is first migrated.
--
-- Redis holds only limit state that can be rebuilt, under a prefix that carries this id
-- (limits/namespace.py), so two deployments sharing one Redis, or a database re-created
-- under the same Redis, never read each other's leases and counters: key 2 of one is not
-- key 2 of the other. One row, never updated.
CREATE TABLE deployment (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO deployment DEFAULT VALUES;
