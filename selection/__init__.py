"""Batch selection as plugins: from a super-batch, the examples a step trains on. One file per selector, found
through a registry as the methods are (``selection.registry``: ``@register``, ``get``, ``available``; third-party
selectors through the ``clipkd.selectors`` entry-point group).

A run with ``train.selection: {method: NAME, ratio: r}`` loads ``batch_size / r`` samples a step, embeds them all
with its student (without gradients) and reads its teachers' embeddings of them; the selector scores the
super-batch and the step trains on its ``batch_size`` best (harness/training/selection.py).
"""

# Each built-in registers itself under its name when its module is imported (``@register``).
BUILTIN = ("hard", "learnability", "uniform")
# What a built-in asks of its run, read without importing torch (a config's validation): these score with a teacher.
NEEDS_TEACHER = ("learnability",)
ENTRY_POINT_GROUP = "clipkd.selectors"
