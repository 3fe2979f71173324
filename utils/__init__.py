"""Layer 1: leaf helpers (registry, checkpoints, logging, seeding, schedules, run directories)."""
