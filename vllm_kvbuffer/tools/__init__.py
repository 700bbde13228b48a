"""Developer tools: tiny offline checkpoints and project-local cache settings."""
