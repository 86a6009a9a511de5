"""Training data: where samples come from (``files``, ``memory``, ``mapstyle``, ``shards``), the views a student
sees (``views``), batches (``batch``), bad samples (``bad``), the loaders a run steps through (``loaders``),
``clipkd data check`` (``check``)."""
