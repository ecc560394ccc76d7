"""Placement: which members hold which layers, in which order (pure; see ``planner``)."""
