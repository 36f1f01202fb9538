"""Install meowmx schema version 3 (its migrations 1 to 3).

Pin the versions: a later revision upgrades with meowmx.script(after=3, upto=N),
so replaying history always builds the same schema whatever package is installed.
"""

from alembic import op

import meowmx

revision = "0001"
down_revision = None


def upgrade() -> None:
    # The raw psycopg connection runs the multi-statement script as it is, inside
    # Alembic's transaction, so the install is atomic with the revision.
    op.get_bind().connection.driver_connection.execute(meowmx.script(after=0, upto=3))


def downgrade() -> None:
    op.execute("DROP SCHEMA meowmx CASCADE")
