"""The Django example's manage.py: MEOWMX_DSN=postgresql://... python manage.py test orders"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
