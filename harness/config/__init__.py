"""Configuration: a run's YAML file as typed models (``specs``) and the whole run with its id (``run_config``)."""
