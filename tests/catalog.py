"""The catalog of schema meowmx as comparable rows, and a diff that names what differs.

Each query returns one row per object: its name first, then the attributes that define
it (no OIDs). Privileges are compared as effective ACLs, sorted: a NULL ACL and the
explicit default it stands for are the same grant, and grant order means nothing.
"""

from __future__ import annotations

from typing import Any

import psycopg


def _acl(column: str, kind: str, owner: str) -> str:
    return (
        f"(SELECT array_agg(a::text ORDER BY a::text)"
        f" FROM unnest(coalesce({column}, acldefault('{kind}', {owner}))) AS a)"
    )


QUERIES = {
    "schema": f"""
        SELECT n.nspname, n.nspowner::regrole::text AS owner,
            {_acl("n.nspacl", "n", "n.nspowner")} AS acl
        FROM pg_namespace AS n WHERE n.nspname = 'meowmx'""",
    "default privileges": """
        SELECT d.defaclrole::regrole::text || ' ' || d.defaclobjtype::text,
            (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(d.defaclacl) AS a) AS acl
        FROM pg_default_acl AS d WHERE d.defaclnamespace = 'meowmx'::regnamespace""",
    "relations": f"""
        SELECT c.relname, c.relkind, c.relpersistence, c.reloptions,
            c.relowner::regrole::text AS owner, c.relrowsecurity,
            {_acl("c.relacl", "r", "c.relowner")} AS acl
        FROM pg_class AS c
        WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind <> 'S'""",
    "columns": """
        SELECT c.relname || '.' || a.attname,
            row_number() OVER (PARTITION BY c.relname ORDER BY a.attnum) AS place,
            format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.attidentity,
            a.attgenerated, pg_get_expr(d.adbin, d.adrelid) AS default,
            a.attcollation::regcollation::text AS collation
        FROM pg_attribute AS a
        JOIN pg_class AS c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'meowmx'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": """
        SELECT conrelid::regclass::text || ' ' || conname, contype,
            pg_get_constraintdef(oid) AS definition
        FROM pg_constraint WHERE connamespace = 'meowmx'::regnamespace""",
    "indexes": """
        SELECT indexname, tablename, indexdef FROM pg_indexes WHERE schemaname = 'meowmx'""",
    "sequences": f"""
        SELECT s.sequencename, s.data_type::text, s.start_value, s.min_value, s.max_value,
            s.increment_by, s.cycle, s.cache_size,
            {_acl("c.relacl", "s", "c.relowner")} AS acl
        FROM pg_sequences AS s
        JOIN pg_class AS c ON c.relname = s.sequencename
            AND c.relnamespace = 'meowmx'::regnamespace
        WHERE s.schemaname = 'meowmx'""",
    "triggers": """
        SELECT t.tgrelid::regclass::text || ' ' || t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'meowmx'::regnamespace AND NOT t.tgisinternal""",
    "functions": f"""
        SELECT 'meowmx.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
            pg_get_function_result(p.oid) AS result, l.lanname AS language, p.prokind,
            p.prosecdef AS security_definer, p.proconfig AS settings, p.provolatile,
            p.proparallel, p.proisstrict, p.proleakproof, p.procost, p.prorows,
            p.proowner::regrole::text AS owner, {_acl("p.proacl", "f", "p.proowner")} AS acl,
            p.prosrc AS body, pg_get_functiondef(p.oid) AS definition
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
        WHERE p.pronamespace = 'meowmx'::regnamespace""",
    "types": f"""
        SELECT t.typname, t.typtype, t.typcategory, t.typowner::regrole::text AS owner,
            {_acl("t.typacl", "T", "t.typowner")} AS acl
        FROM pg_type AS t WHERE t.typnamespace = 'meowmx'::regnamespace""",
    "comments": """
        SELECT i.type || ' ' || i.identity, d.description
        FROM pg_description AS d,
            LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) AS i
        WHERE i.schema = 'meowmx'""",
    "migrations": "SELECT version::text, name FROM meowmx.migrations",
    # Data that grants depend on: the role prefix, and which kinds get which function.
    "settings": "SELECT name, value FROM meowmx.settings",
    "function grants": """
        SELECT g.signature || ' to ' || g.kind::text FROM meowmx.function_grants AS g""",
}

Catalog = dict[str, dict[str, dict[str, Any]]]  # part -> object name -> attribute -> value


def catalog_of(target: str) -> Catalog:
    """Every part of the schema: {part: {object: {attribute: value}}}."""
    found: Catalog = {}
    with psycopg.connect(target) as conn:
        for part, query in QUERIES.items():
            cur = conn.execute(query)
            names = [column.name for column in cur.description or ()][1:]
            objects: dict[str, dict[str, Any]] = {}
            for key, *values in cur.fetchall():
                assert key not in objects, f"{part}: {key} listed twice"
                objects[key] = dict(zip(names, values, strict=True))
            found[part] = objects
    return found


def differences(want: Catalog, got: Catalog) -> list[str]:
    """One line per object that is missing, extra, or defined otherwise, naming it."""
    lines = []
    for part, objects in want.items():
        other = got[part]
        for key in sorted(objects.keys() - other.keys()):
            lines.append(f"{part}: {key} is missing")
        for key in sorted(other.keys() - objects.keys()):
            lines.append(f"{part}: {key} is extra")
        for key in sorted(objects.keys() & other.keys()):
            changed = [a for a, v in objects[key].items() if other[key][a] != v]
            if changed:
                lines.append(f"{part}: {key} differs in {', '.join(changed)}")
    return lines
