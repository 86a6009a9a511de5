"""Zero-shot classification and retrieval through clip_benchmark; teacher-student feature similarity."""
