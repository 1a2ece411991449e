"""Training: data pipeline, loop, checkpointing and logging as separate pieces with narrow inputs."""
