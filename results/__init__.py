"""The SQL results store (runs, metrics, training curves) and the leaderboard queries over it."""

FORMATS = ("table", "csv", "markdown", "latex")
