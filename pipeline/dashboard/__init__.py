"""`moeforge dashboard`: one web page per pipeline run, built from MLflow and Ray (see `data.py`, `app.py`)."""
