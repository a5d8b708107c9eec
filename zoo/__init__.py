"""mambazoo model zoo: registry, variants, tasks and data."""
