"""Operator surfaces served by the gateway itself: the live dashboard page (`GET /dashboard`)."""
