"""An orders service that keeps its events in meowmx, in the same database as its models.

The database is MEOWMX_DSN (a libpq connection string). Each request runs in one
transaction (ATOMIC_REQUESTS): the events a view appends commit with its model writes.
"""

import os

from psycopg.conninfo import conninfo_to_dict

MEOWMX_DSN = os.environ["MEOWMX_DSN"]
_db = conninfo_to_dict(MEOWMX_DSN)

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3
        "NAME": _db.get("dbname", "postgres"),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
        "ATOMIC_REQUESTS": True,
    }
}
INSTALLED_APPS = ["orders"]
ROOT_URLCONF = "orders_site.urls"
SECRET_KEY = "only-for-the-example"
ALLOWED_HOSTS = ["testserver", "localhost"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
