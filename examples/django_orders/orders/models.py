from django.db import models


class Order(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    total = models.IntegerField()
