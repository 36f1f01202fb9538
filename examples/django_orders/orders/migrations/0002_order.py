from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("orders", "0001_meowmx")]
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("total", models.IntegerField()),
            ],
        )
    ]
