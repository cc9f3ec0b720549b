"""Several models and versions in one server: config, routing, lifecycle, admin API."""
