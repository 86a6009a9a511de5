"""The leaderboard dashboard: a Streamlit app over the results store, read-only (``clipkd app``)."""
