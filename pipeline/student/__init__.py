"""The trained student as a product: loaded for answering (load.py), as an MLflow pyfunc model (pyfunc.py), and
logged, registered and promoted in the MLflow Model Registry (registry.py). `evaluate`, `register`, serving and
`actors/student.py` all go through here."""

from pipeline.student.load import Answer, Student

__all__ = ["Answer", "Student"]
