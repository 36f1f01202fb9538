from django.urls import path
from orders import views

urlpatterns = [path("orders/<str:order_id>/place", views.place)]
