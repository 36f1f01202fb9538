"""meowmx's schema, as the printed SQL (`meowmx sql`) of schema version 10. A later
version is a new migration: RunSQL([meowmx.script(after=10, upto=11)])."""

from django.db import migrations

import meowmx


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    # A list of one: Django would split a single string at semicolons, which PL/pgSQL
    # bodies contain.
    operations = [
        migrations.RunSQL([meowmx.script(upto=10)], reverse_sql=["DROP SCHEMA meowmx CASCADE"])
    ]
