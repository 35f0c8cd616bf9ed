"""Single-owner actors: the scheduler (queue, limits, job status) and the allocator (GPUs)."""
