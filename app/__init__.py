"""The Streamlit leaderboard dashboard (issue 5)."""
