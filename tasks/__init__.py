"""Pipeline building blocks: plain typed functions, with thin Prefect task wrappers where they run in flows."""
