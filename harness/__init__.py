"""clipkd's harness: configuration, data, model building, the trainer, the CLI."""
